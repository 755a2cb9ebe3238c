"""Shared test helpers (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a non-finite value in `a` (an unwritten, poisoned element) fails."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten / poisoned element?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def trained_lora(transformer, rank, alpha, targets, seed=0):
    """Add a peft LoRA to ``transformer`` with random (seeded) A and B, as after training; return
    its state dict in diffusers' naming."""
    from peft import LoraConfig

    from videoblade.io.lora import transformer_lora_state_dict

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return transformer_lora_state_dict(transformer)

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


# ----------------------------------------------------------------------- trainer test runs
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def subprocess_env(**extra) -> dict:
    """Environment for a child training process: offline, one thread, the repo importable, no
    accelerate or tqdm settings inherited from the caller; ``extra`` added last."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in [k for k in env if k.startswith(("ACCELERATE_", "TQDM_"))]:
        env.pop(k)
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_wan_with_store(tmp_path_factory, prompts) -> tuple:
    """(tiny Wan folder, an fp32 prompt store of ``prompts`` encoded with it)."""
    from videoblade.data import encode_prompts_to_store
    from videoblade.models.tiny import tiny_model_folder

    folder = tiny_model_folder("wan")
    store = encode_prompts_to_store(folder, prompts, tmp_path_factory.mktemp("store") / "wan", dtype="fp32",
                                    progress=False)
    return folder, store


def tiny_train_overrides(folder, store, out, **over) -> list[str]:
    """key=value overrides of a seconds-long tiny Wan run (32x32x5, fp32, dense, rank 4, 4 steps);
    ``over`` replaces or adds keys."""
    base = {"model.path": folder, "train.prompt_store": store, "train.output_dir": out, "model.dtype": "fp32",
            "model.height": 32, "model.width": 32, "model.frames": 5, "train.mixed_precision": "'no'",
            "train.report_to": "none", "train.train_batch_size": 1, "train.gradient_accumulation_steps": 1,
            "train.max_train_steps": 4, "train.checkpointing_steps": 2, "train.validation_steps": 0,
            "train.gradient_checkpointing": "false", "lora.rank": 4, "lora.lora_alpha": 4, "asa.enabled": "false",
            "tdm.k_step": 2}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]

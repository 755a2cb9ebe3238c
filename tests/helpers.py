"""Shared test helpers (imported as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a non-finite value in `a` (an unwritten, poisoned element) fails."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten / poisoned element?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

"""Sample quality against the toy dataset: precision (closeness to the data) and coverage.

Clips are compared as flat vectors of pixels in [0, 1] with the Euclidean distance.

* precision = mean over generated clips of the distance to the nearest training clip, divided
  by the mean over training clips of the distance to the nearest *other* training clip (the
  data's own spacing). Lower is better: a sample that is an exact training clip scores 0, one
  that is as far from the data as neighbouring data clips are from each other scores about 1,
  and a blur of several positions scores well above 1.
* coverage = fraction of training clips that are the nearest neighbour of at least one
  generated clip, divided by the same fraction for a reference of as many clips drawn from the
  data distribution itself (same prompts). 1 means the samples spread over the data as widely as
  real draws do; mode collapse lowers it.
"""

from __future__ import annotations

import torch

__all__ = ["to_unit", "nearest", "data_spacing", "precision", "coverage_fraction", "evaluate"]


def to_unit(clips: torch.Tensor) -> torch.Tensor:
    """[N, C, F, H, W] in [-1, 1] (any float) -> float64 [N, D] in [0, 1] (values clamped)."""
    return ((clips.detach().double().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).flatten(1)


def nearest(samples: torch.Tensor, data: torch.Tensor, exclude_self: bool = False,
            chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each sample's nearest data clip; inputs are to_unit() vectors."""
    dists, idxs = [], []
    for i in range(0, samples.shape[0], chunk):
        d = torch.cdist(samples[i:i + chunk], data, compute_mode="donot_use_mm_for_euclid_dist")  # exact
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + i] = float("inf")
        v, j = d.min(dim=1)
        dists.append(v)
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)


def data_spacing(data: torch.Tensor) -> float:
    """Mean distance from each training clip to its nearest other training clip."""
    d, _ = nearest(data, data, exclude_self=True)
    if not bool((d > 0).all()):
        raise ValueError("the training set holds duplicate clips: the precision unit would be 0")
    return float(d.mean())


def precision(samples: torch.Tensor, data: torch.Tensor, spacing: float | None = None) -> float:
    d, _ = nearest(samples, data)
    return float(d.mean()) / (spacing if spacing is not None else data_spacing(data))


def coverage_fraction(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Fraction of data clips that are the nearest neighbour of at least one sample."""
    _, j = nearest(samples, data)
    return float(torch.unique(j).numel()) / data.shape[0]


def evaluate(samples: torch.Tensor, data: torch.Tensor, reference: torch.Tensor) -> dict:
    """precision, coverage and their raw parts for clips in [-1, 1] ([N, C, F, H, W])."""
    s, d, r = to_unit(samples), to_unit(data), to_unit(reference)
    if s.shape[0] != r.shape[0]:
        raise ValueError(f"coverage needs as many reference clips as samples, got {r.shape[0]} and {s.shape[0]}")
    spacing = data_spacing(d)
    dist, _ = nearest(s, d)
    cov, cov_ref = coverage_fraction(s, d), coverage_fraction(r, d)
    return {
        "precision": float(dist.mean()) / spacing,
        "coverage": cov / cov_ref,
        "mean_nn_distance": float(dist.mean()),
        "data_spacing": spacing,
        "covered_fraction": cov,
        "reference_covered_fraction": cov_ref,
        "n_samples": int(s.shape[0]),
    }

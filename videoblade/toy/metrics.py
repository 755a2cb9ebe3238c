"""Sample quality against the toy dataset: precision (closeness to the data) and coverage.

Clips are compared as flat vectors of pixels in [0, 1] (generated values clamped, as when they are
written as video) with the exact Euclidean distance, in float64. Nearest neighbours are searched
over all training clips, whatever the prompt (the issue names no per-prompt restriction); a tie
goes to the training clip of the lowest index.

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

__all__ = ["to_unit", "nearest", "data_spacing", "precision", "coverage_fraction", "evaluate", "prompt_following"]


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


def prompt_following(samples: torch.Tensor, prompts: list[str], cfg) -> dict:
    """Colour and motion of each sample [N, 3, F, H, W] in [-1, 1] against its prompt, for clips of
    the toy data config `cfg` (its background and speed).

    Foreground = pixels farther from the background than half the smallest distance between a
    shape colour and any background pixel. colour_ok: the mean foreground colour (all frames)
    is nearest to the prompt's colour. motion_ok: every frame has foreground and the mean
    per-frame step of its centroid, (c[F-1] - c[0]) / (F-1), is nearest to the prompt's
    direction x speed among the four directions x speed and (0, 0). A sample without foreground
    fails both. motion_still: every frame has foreground and that step is nearest to (0, 0) (the
    shape stands still: the teacher's usual failure on the demo data). motion_reversed: every
    frame has foreground and the step is nearest to the opposite of the prompt's direction. A
    model blind to the order of frames moves a shape the prompt's way and the opposite way
    equally often, so motion_reversed ~ motion_ok.
    """
    from videoblade.toy.data import COLOURS, DIRECTIONS, background, parse_prompt

    if samples.ndim != 5 or samples.shape[1] != 3 or samples.shape[0] != len(prompts):
        raise ValueError(f"need [N, 3, F, H, W] samples with one prompt each; got {tuple(samples.shape)} "
                         f"and {len(prompts)} prompts")
    u = ((samples.detach().double().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    N, _, F, H, W = u.shape
    bg = torch.from_numpy(background(cfg)).double()  # [3, F, H, W]
    if tuple(bg.shape[1:]) != (F, H, W):
        raise ValueError(f"samples are {F}x{H}x{W} (frames x height x width), the data config {tuple(bg.shape[1:])}")
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in names], dtype=torch.float64)  # [C, 3]
    threshold = 0.5 * float(torch.cdist(palette, bg.flatten(1).T).min())
    fg = (u - bg[None]).norm(dim=1) > threshold  # [N, F, H, W]
    wfg = fg.double()

    n_px = wfg.sum((1, 2, 3))  # [N]
    mean_rgb = (u * wfg[:, None]).sum((2, 3, 4)) / n_px.clamp(min=1)[:, None]  # [N, 3]
    colour_idx = torch.cdist(mean_rgb, palette).argmin(1)

    per_frame = wfg.sum((2, 3))  # [N, F]
    ys = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1)
    xs = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W)
    cy = (wfg * ys).sum((2, 3)) / per_frame.clamp(min=1)
    cx = (wfg * xs).sum((2, 3)) / per_frame.clamp(min=1)
    step = torch.stack([cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0]], 1) / max(F - 1, 1)  # [N, 2]
    moves = list(DIRECTIONS)
    candidates = torch.tensor([DIRECTIONS[d] for d in moves] + [(0, 0)], dtype=torch.float64) * cfg.speed
    move_idx = torch.cdist(step, candidates).argmin(1)

    opposite = {d: next(e for e in moves if tuple(-c for c in DIRECTIONS[d]) == tuple(DIRECTIONS[e]))
                for d in moves}
    colour_ok, motion_ok, still, reversed_ = [], [], [], []
    for i, p in enumerate(prompts):
        _, colour, direction = parse_prompt(p)
        colour_ok.append(bool(n_px[i] > 0) and names[int(colour_idx[i])] == colour)
        whole = bool((per_frame[i] > 0).all())
        moved = moves[int(move_idx[i])] if whole and int(move_idx[i]) < len(moves) else None
        motion_ok.append(moved == direction)
        reversed_.append(moved == opposite[direction])
        still.append(whole and int(move_idx[i]) == len(moves))
    return {"colour_ok": sum(colour_ok) / N, "motion_ok": sum(motion_ok) / N, "motion_still": sum(still) / N,
            "motion_reversed": sum(reversed_) / N}

"""Block mask policy: which (query block, key block) pairs the sparse attention computes.

Input is a block-level attention map ``P`` [B, H, NQ, NK] (float32; ``P[b, h, i, j]`` is how
much attention mass query block i puts on key block j, e.g. from
``videoblade.kernels.estimate_block_importance``).  Output is a bool mask [B, H, NQ, NK].

Rules (SPEC section 1, step 3):

* **energy** mode: sort each row descending and keep the smallest prefix whose cumulative
  mass reaches ``energy_threshold`` of the row total; the prefix length is clamped to
  ``[min_retain, max_retain]`` fractions of NK (and is at least one block).  With
  ``min_retain >= 1`` every block is kept.
* **topk** mode: keep the ``ceil(topk * NK)`` largest blocks of every row (at least one).
* ties in mass go to the lower block id; a NaN or negative mass counts as 0 (masses are >= 0),
  so the torch policy and the Triton selection keep the same blocks.
* the diagonal block (query block i, key block i) is always kept;
* text blocks (the first ``text_blocks`` blocks, CogVideoX's prompt tokens) are kept in both
  directions: every row keeps the text key blocks and text query blocks keep every block.

Everything is batched tensor code (sort, cumsum, scatter): no Python loop over heads or
blocks, and no host synchronisation, so it runs inside the attention hot path on the GPU.
``block_lists`` goes straight to the kernels' block lists: on CUDA one Triton launch
(``videoblade.kernels.select``), elsewhere ``mask_to_block_lists(block_mask(...))``, the
reference the tests compare the kernel with.

Multi-level (SPEC 1.6, ``block_levels``): instead of keep/skip every key block of a row gets a
level by its rank in P: the top ``fractions[0]`` of the blocks exact, the next ``fractions[1]`` at
the first pooled level, and so on; the rest skipped. Diagonal and text blocks are exact.
``level_lists`` turns the level map into the kernels' lists (exact + one list per pooled level).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "retain_bounds",
    "energy_keep_counts",
    "mask_from_counts",
    "force_blocks",
    "block_mask",
    "block_lists",
    "num_blocks",
    "level_band_counts",
    "block_levels",
    "level_lists",
    "level_density",
]


def num_blocks(length: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` covering ``length`` tokens (the last may be partial)."""
    return -(-int(length) // int(block_size))


def retain_bounds(nk: int, min_retain: float, max_retain: float) -> tuple[int, int]:
    """(lo, hi) number of key blocks the energy prefix may keep: lo = ceil(min_retain * nk),
    hi = floor(max_retain * nk), both at least 1, and hi >= lo (min_retain wins a conflict)."""
    eps = 1e-9
    lo = max(1, math.ceil(min_retain * nk - eps))
    hi = max(1, math.floor(max_retain * nk + eps))
    lo = min(lo, nk)
    hi = min(max(hi, lo), nk)
    return lo, hi


def energy_keep_counts(p_sorted: torch.Tensor, threshold: float) -> torch.Tensor:
    """Length of the smallest prefix of each descending-sorted row reaching ``threshold`` of
    the row total: int64 [..., ] in [1, NK]."""
    csum = p_sorted.cumsum(-1)
    total = csum[..., -1:]
    # blocks strictly before the prefix end have cumulative mass < threshold * total
    n = (csum < threshold * total).sum(-1) + 1
    return n.clamp_(max=p_sorted.shape[-1])


def mask_from_counts(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping, per row, the first ``counts`` entries of ``order`` (the indices of a
    descending sort)."""
    nk = order.shape[-1]
    rank = torch.arange(nk, device=order.device)
    keep_sorted = rank < counts.unsqueeze(-1)
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(-1, order, keep_sorted)


def force_blocks(mask: torch.Tensor, text_blocks: int = 0, diagonal: bool = True) -> torch.Tensor:
    """Set the always-kept blocks in place: the diagonal and text rows/columns."""
    nq, nk = mask.shape[-2], mask.shape[-1]
    if diagonal:
        n = min(nq, nk)
        idx = torch.arange(n, device=mask.device)
        mask[..., idx, idx] = True
    if text_blocks > 0:
        mask[..., :, : min(text_blocks, nk)] = True
        mask[..., : min(text_blocks, nq), :] = True
    return mask


def _masses(P: torch.Tensor) -> torch.Tensor:
    """P as float32 with NaN and negative masses counted as none (as the Triton selection): a sort
    would otherwise rank NaN above every real mass."""
    P = P.float()
    return torch.where(P > 0, P, 0.0)


def _mode_bounds(nk: int, mode: str, min_retain: float, max_retain: float, topk: float) -> tuple[int, int]:
    """(lo, hi) kept blocks per row before the forced ones: energy clamps to the retain bounds,
    top-k keeps exactly k."""
    if mode == "energy":
        return retain_bounds(nk, min_retain, max_retain)
    if mode == "topk":
        k = min(nk, max(1, math.ceil(topk * nk - 1e-9)))
        return k, k
    raise ValueError(f"unknown mask mode {mode!r}: use 'energy' or 'topk'")


def block_mask(
    P: torch.Tensor,
    mode: str = "energy",
    energy_threshold: float = 0.95,
    min_retain: float = 0.05,
    max_retain: float = 0.15,
    topk: float = 0.10,
    text_blocks: int = 0,
    diagonal: bool = True,
) -> torch.Tensor:
    """Bool mask [B, H, NQ, NK] from the block importance map ``P`` (see module docstring)."""
    if P.dim() != 4:
        raise ValueError(f"block_mask expects P of shape [B, H, NQ, NK], got {tuple(P.shape)}")
    nk = P.shape[-1]
    P = _masses(P)
    lo, hi = _mode_bounds(nk, mode, min_retain, max_retain, topk)
    if mode == "energy":
        if lo >= nk:
            mask = torch.ones(P.shape, dtype=torch.bool, device=P.device)
        else:
            p_sorted, order = P.sort(dim=-1, descending=True, stable=True)  # ties to the lower id
            counts = energy_keep_counts(p_sorted, energy_threshold).clamp_(lo, hi)
            mask = mask_from_counts(order, counts)
    else:  # topk
        if hi >= nk:
            mask = torch.ones(P.shape, dtype=torch.bool, device=P.device)
        else:
            idx = P.sort(dim=-1, descending=True, stable=True).indices[..., :hi]  # ties to the lower id
            mask = torch.zeros(P.shape, dtype=torch.bool, device=P.device).scatter_(-1, idx, True)
    return force_blocks(mask, text_blocks=text_blocks, diagonal=diagonal)


def block_lists(
    P: torch.Tensor,
    mode: str = "energy",
    energy_threshold: float = 0.95,
    min_retain: float = 0.05,
    max_retain: float = 0.15,
    topk: float = 0.10,
    text_blocks: int = 0,
    diagonal: bool = True,
    use_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks of :func:`block_mask` as the kernels' block lists
    (kv_indices int32 [B, H, NQ, NK], ascending; kv_counts int32 [B, H, NQ]).

    ``use_kernel`` None: the one-launch Triton selection on CUDA (square maps up to
    ``MAX_SELECT_BLOCKS`` key blocks), else the torch policy + ``mask_to_block_lists``. Both keep
    the same blocks (ties to the lower id, NaN/negative masses as 0), except that a prefix sum
    within float rounding of the threshold may end one block apart (the kernel sums in another
    order)."""
    from ..kernels import mask_to_block_lists
    from ..kernels.select import MAX_SELECT_BLOCKS, select_block_lists

    if P.dim() != 4:
        raise ValueError(f"block_lists expects P of shape [B, H, NQ, NK], got {tuple(P.shape)}")
    nq, nk = P.shape[-2:]
    if use_kernel is None:
        use_kernel = P.is_cuda and nq == nk and nk <= MAX_SELECT_BLOCKS
    if not use_kernel:
        mask = block_mask(P, mode, energy_threshold, min_retain, max_retain, topk, text_blocks, diagonal)
        return mask_to_block_lists(mask)
    lo, hi = _mode_bounds(nk, mode, min_retain, max_retain, topk)
    return select_block_lists(P, lo, hi, energy_threshold if mode == "energy" else None, text_blocks, diagonal)


# ---------------------------------------------------------------------------- multi-level


def level_band_counts(nk: int, fractions) -> list[int]:
    """Key blocks per rank band of a row: ceil(fraction * nk) each (the exact band at least one),
    cut where the bands run out of blocks."""
    out, used = [], 0
    for i, f in enumerate(fractions):
        c = math.ceil(float(f) * nk - 1e-9)
        c = min(max(c, 1 if i == 0 else 0), nk - used)
        out.append(c)
        used += c
    return out


def block_levels(P: torch.Tensor, fractions, text_blocks: int = 0, diagonal: bool = True) -> torch.Tensor:
    """Level map int8 [B, H, NQ, NK] from the block importance map ``P``: 0 skipped, 1 exact,
    1 + i the i-th pooled level. Per row, blocks sorted by descending mass (ties to the lower id;
    NaN and negative masses count as 0, as in :func:`block_mask`) fill the bands of
    ``level_band_counts(NK, fractions)`` in order; the diagonal block and text blocks (both
    directions) are exact. Batched tensor code, no host sync."""
    if P.dim() != 4:
        raise ValueError(f"block_levels expects P of shape [B, H, NQ, NK], got {tuple(P.shape)}")
    nq, nk = P.shape[-2:]
    counts = level_band_counts(nk, fractions)
    ends = torch.tensor(counts, device=P.device).cumsum(0)
    band = torch.searchsorted(ends, torch.arange(nk, device=P.device), right=True)  # band of each rank
    lev_by_rank = torch.where(band < len(counts), band + 1, 0).to(torch.int8)
    order = _masses(P).sort(dim=-1, descending=True, stable=True).indices  # ties to the lower id
    levels = torch.empty(P.shape, dtype=torch.int8, device=P.device)
    levels.scatter_(-1, order, lev_by_rank.expand(P.shape).contiguous())
    if diagonal:
        idx = torch.arange(min(nq, nk), device=P.device)
        levels[..., idx, idx] = 1
    if text_blocks > 0:
        levels[..., :, : min(text_blocks, nk)] = 1
        levels[..., : min(text_blocks, nq), :] = 1
    return levels


def level_lists(levels: torch.Tensor, n_pooled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv_indices, kv_counts) of the exact blocks and the pooled levels' stacked lists
    (int32 [n_pooled, B, H, NQ, NK], [n_pooled, B, H, NQ]) of a level map."""
    from ..kernels import mask_to_block_lists

    kvi, kvc = mask_to_block_lists(levels == 1)
    pooled = [mask_to_block_lists(levels == 2 + i) for i in range(n_pooled)]
    return kvi, kvc, torch.stack([a for a, _ in pooled]), torch.stack([c for _, c in pooled])


def level_density(kv_counts: torch.Tensor, level_counts: torch.Tensor, pools, num_key_blocks: int) -> torch.Tensor:
    """Realised density per head (float32 [H]) of a level map's lists (``level_lists``): kept blocks /
    all blocks over batch and query blocks, a block at a pooled level counting 1/pool, its cost."""
    B, _, NQ = kv_counts.shape
    cost = kv_counts.sum(dim=(0, 2), dtype=torch.float32)
    for counts, p in zip(level_counts, pools):
        cost = cost + counts.sum(dim=(0, 2), dtype=torch.float32) / int(p)
    return cost / (B * NQ * num_key_blocks)

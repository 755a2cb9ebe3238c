"""Block lists, the transposed index, and compensation summaries (pure torch, no sync).

Conventions used by every kernel in this package (see CLAUDE.md "Kernels"):

* ``kv_indices`` int32 [B, H, NQ, MAXK]: for query block ``i`` the kept key-block ids in
  ascending order; only the first ``kv_counts[b, h, i]`` entries are read.
* ``kv_counts`` int32 [B, H, NQ].
* A query/key block is ``block_size`` consecutive tokens; the last one may be partial
  (``NQ = NK = ceil(L / block_size)``).
* ``Summary`` holds the compensation tokens of SPEC 1.5: for each key block,
  ``block_size // pool`` summary keys/values (the mean of ``pool`` consecutive tokens) and
  a float32 logit bias ``log(#tokens averaged)`` (-inf for a group with no token, which
  only happens in a partial last block).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Summary(NamedTuple):
    """Compensation tokens, as made by :func:`pool_summaries`.

    k, v: [B, H, NK * (block_size // pool), D] (dtype of the input keys), bias: float32
    [NK * (block_size // pool)], pool: tokens per summary.
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    pool: int


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


def block_lists_to_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """Block lists -> bool mask [B, H, NQ, NK] (True = key block kept). No host sync."""
    maxk = kv_indices.shape[-1]
    valid = torch.arange(maxk, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    # invalid slots are sent to a dump column NK that is cut off afterwards
    idx = torch.where(valid, kv_indices.long(), num_key_blocks)
    mask = torch.zeros(*kv_indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :num_key_blocks]


def mask_to_block_lists(mask: torch.Tensor, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask [B, H, NQ, NK] -> (kv_indices int32 [B, H, NQ, MAXK], kv_counts int32 [B, H, NQ]).

    ``max_blocks`` None keeps the full width NK (no host sync); pass an int >= the largest
    row count to get a narrower index. Unused slots hold 0 and are never read.
    """
    mask = mask.bool()
    nk = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    pos = torch.cumsum(mask, -1, dtype=torch.int64) - 1  # slot of each kept block in its row
    width = nk if max_blocks is None else int(max_blocks)
    slot = torch.where(mask, pos, width)  # dropped ones go to the dump column `width`
    out = torch.zeros(*mask.shape[:-1], width + 1, dtype=torch.int32, device=mask.device)
    ids = torch.arange(nk, dtype=torch.int32, device=mask.device).expand_as(mask)
    if max_blocks is not None:
        slot = slot.clamp(max=width)
        counts = counts.clamp(max=width)
    out.scatter_(-1, slot, ids)
    return out[..., :width].contiguous(), counts


def transpose_block_lists(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_key_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-block-major view of the same mask: (q_indices [B,H,NK,NQ], q_counts [B,H,NK], mask).

    Used by the backward's dk/dv pass (each key block walks the query blocks that keep it).
    """
    mask = block_lists_to_mask(kv_indices, kv_counts, num_key_blocks)
    q_indices, q_counts = mask_to_block_lists(mask.transpose(-1, -2))
    return q_indices, q_counts, mask


def pool_summaries(k: torch.Tensor, v: torch.Tensor, block_size: int, pool: int) -> Summary:
    """Mean of every ``pool`` consecutive keys/values (per key block), with log(count) bias.

    Differentiable (plain torch) so gradients reaching the summaries flow back to k and v.
    The sums are taken in float32; the result has the dtype of ``k``.
    """
    if block_size % pool != 0:
        raise ValueError(f"pool ({pool}) must divide block_size ({block_size})")
    B, H, L, D = k.shape
    nk = num_blocks(L, block_size)
    ns = nk * (block_size // pool)
    n_full = L // pool
    rem = L - n_full * pool

    def pooled(x: torch.Tensor) -> torch.Tensor:
        parts = []
        if n_full:
            parts.append(x[:, :, : n_full * pool].reshape(B, H, n_full, pool, D).sum(3, dtype=torch.float32))
        if rem:
            parts.append(x[:, :, n_full * pool :].sum(2, keepdim=True, dtype=torch.float32))
        s = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
        n_have = s.shape[2]
        if n_have < ns:  # groups past the end of a partial last block: no token
            s = torch.nn.functional.pad(s, (0, 0, 0, ns - n_have))
        return s

    counts = torch.full((ns,), float(pool), dtype=torch.float32, device=k.device)
    if rem:
        counts[n_full] = float(rem)
    counts[n_full + (1 if rem else 0) :] = 0.0
    denom = counts.clamp(min=1.0)[:, None]
    sk = (pooled(k) / denom).to(k.dtype)
    sv = (pooled(v) / denom).to(v.dtype)
    bias = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
    return Summary(sk, sv, bias, pool)

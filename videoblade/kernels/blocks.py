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


def _pool_geometry(L: int, block_size: int, pool: int, device) -> tuple[int, int, int, torch.Tensor]:
    nk = num_blocks(L, block_size)
    ns = nk * (block_size // pool)
    n_full = L // pool
    rem = L - n_full * pool
    counts = torch.full((ns,), float(pool), dtype=torch.float32, device=device)
    if rem:
        counts[n_full] = float(rem)
    counts[n_full + (1 if rem else 0) :] = 0.0
    return ns, n_full, rem, counts


def _pool_fwd(x: torch.Tensor, ns: int, n_full: int, rem: int, pool: int, denom: torch.Tensor) -> torch.Tensor:
    B, H, L, D = x.shape
    parts = []
    if n_full:
        parts.append(x[:, :, : n_full * pool].reshape(B, H, n_full, pool, D).sum(3, dtype=torch.float32))
    if rem:
        parts.append(x[:, :, n_full * pool :].sum(2, keepdim=True, dtype=torch.float32))
    s = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    if s.shape[2] < ns:  # groups past the end of a partial last block: no token
        s = torch.nn.functional.pad(s, (0, 0, 0, ns - s.shape[2]))
    return (s / denom).to(x.dtype)


def _pool_bwd(g: torch.Tensor, L: int, pool: int, denom: torch.Tensor, dtype) -> torch.Tensor:
    # token t belongs to group t // pool: grad_x[t] = g[t // pool] / count; one expand + copy
    B, H, _, D = g.shape
    ng = -(-L // pool)
    gs = (g[:, :, :ng].float() / denom[:ng]).to(dtype)
    return gs[:, :, :, None, :].expand(B, H, ng, pool, D).reshape(B, H, ng * pool, D)[:, :, :L]


class _PoolFn(torch.autograd.Function):
    """Mean pooling of k and v with a hand-written backward.

    Autograd of the plain torch version (slice, reshape, float32 sum, cat, pad, divide,
    cast) materialises several full-size [B, H, L, D] intermediates in the backward
    (zero-filled slice gradient, float32 expand, cast); this writes the gradient once.
    """

    @staticmethod
    def forward(ctx, k, v, block_size, pool):
        L = k.shape[2]
        ns, n_full, rem, counts = _pool_geometry(L, block_size, pool, k.device)
        denom = counts.clamp(min=1.0)[:, None]
        sk = _pool_fwd(k, ns, n_full, rem, pool, denom)
        sv = _pool_fwd(v, ns, n_full, rem, pool, denom)
        bias = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
        ctx.save_for_backward(denom)
        ctx.L, ctx.pool, ctx.kdt, ctx.vdt = L, pool, k.dtype, v.dtype
        ctx.mark_non_differentiable(bias)
        return sk, sv, bias

    @staticmethod
    def backward(ctx, gsk, gsv, gbias):
        (denom,) = ctx.saved_tensors
        gk = _pool_bwd(gsk, ctx.L, ctx.pool, denom, ctx.kdt) if gsk is not None and ctx.needs_input_grad[0] else None
        gv = _pool_bwd(gsv, ctx.L, ctx.pool, denom, ctx.vdt) if gsv is not None and ctx.needs_input_grad[1] else None
        return gk, gv, None, None


def pool_summaries(k: torch.Tensor, v: torch.Tensor, block_size: int, pool: int) -> Summary:
    """Mean of every ``pool`` consecutive keys/values (per key block), with log(count) bias.

    Differentiable (custom autograd function) so gradients reaching the summaries flow back
    to k and v. The sums are taken in float32; the result has the dtype of ``k``.
    """
    if block_size % pool != 0:
        raise ValueError(f"pool ({pool}) must divide block_size ({block_size})")
    sk, sv, bias = _PoolFn.apply(k, v, block_size, pool)
    return Summary(sk, sv, bias, pool)

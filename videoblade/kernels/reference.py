"""Pure-torch float32 reference of block-sparse attention (+ compensation).

This is the specification the Triton kernels are tested against, and the CPU backend of
``AdaptiveSparseAttention``: it is differentiable (plain autograd) and processes the
queries in chunks under activation checkpointing, so memory stays at one chunk's score
matrix (a few tens of MB for L <= 4096) in forward and backward alike.

Semantics (SPEC 1.4/1.5): query block i attends exactly to the tokens of the key blocks
listed in ``kv_indices[b, h, i, :kv_counts[b, h, i]]``; with ``summary`` it also attends
to the summary tokens of every key block it does *not* keep, each with logit
``q . k_s * scale + log(count)``; both parts form one softmax. With ``levels`` (SPEC 1.6) it
attends the key blocks listed at a pooled level through their pooled tokens (same logit rule),
in the same softmax, and the summaries stand only for the blocks attended at no level. Rows with
nothing to attend to give out 0 and lse -inf.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .blocks import (
    PooledLevels,
    Summary,
    block_lists_to_mask,
    check_levels_geometry,
    check_summary,
    num_blocks,
)


def _chunk(qc, k, v, kept_rows, kblk, scale, pooled):
    # qc [B,H,R,D] fp32; kept_rows bool [B,H,R,NK] (the row's query-block mask); pooled: per
    # pooled partition (summaries, multi-level blocks) (keys, values, bias [S], block of each
    # pooled token [S], bool [B,H,R,NK]: the blocks the row attends through this partition)
    s = torch.matmul(qc, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~kept_rows[..., kblk], float("-inf"))
    scores, values = [s], [v]
    for pk, pv, pbias, pblk, attend_rows in pooled:
        sp = torch.matmul(qc, pk.transpose(-1, -2)) * scale + pbias
        scores.append(sp.masked_fill(~attend_rows[..., pblk], float("-inf")))
        values.append(pv)
    if pooled:
        s = torch.cat(scores, -1)
        v = torch.cat(values, -2)
    mx = s.amax(-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.matmul(e, v) / safe
    lse = torch.where(nonempty, mx + torch.log(safe), torch.full_like(mx, float("-inf")))
    return out, lse.squeeze(-1)


def _pooled_part(summ: Summary, block_size: int, attend: torch.Tensor, dtype) -> tuple:
    """(keys, values, bias, block of each pooled token, block mask) of one pooled partition."""
    dev = attend.device
    blk = torch.arange(summ.k.shape[2], device=dev) // (block_size // summ.pool)
    return summ.k.to(dtype), summ.v.to(dtype), summ.bias.to(device=dev, dtype=dtype), blk, attend


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_size: int = 128,
    sm_scale: float | None = None,
    summary: Summary | None = None,
    max_chunk_elems: int = 1 << 24,
    compute_dtype: torch.dtype = torch.float32,
    levels: PooledLevels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense attention in float32. Returns (out in q.dtype [B,H,L,D], lse float32 [B,H,L]).

    ``levels`` (SPEC 1.6): key blocks a query block attends at reduced resolution, through their
    pooled tokens (logit q . k_p * scale + log(count)); the compensation ``summary`` then stands
    only for the blocks the row attends at no level.
    ``max_chunk_elems`` bounds one chunk's score matrix (B*H*rows*cols elements).
    ``compute_dtype`` other than float32 gives the "naive same-dtype implementation" that
    the GPU tests use as the error yardstick (flash-attention rule).
    """
    B, H, L, D = q.shape
    nk = num_blocks(L, block_size)
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    # summaries / pooled levels made for other keys or another block size: refused, not misread
    if summary is not None:
        check_summary(summary, q.shape, block_size)
    if levels is not None:
        check_levels_geometry(levels, q.shape, block_size)
    mask = block_lists_to_mask(kv_indices, kv_counts, nk)  # [B,H,NQ,NK]
    dev = q.device
    kblk = torch.arange(L, device=dev) // block_size
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    parts = []  # (pooled partition, its block mask [B,H,NQ,NK])
    attended = mask
    for lev, summ in enumerate(levels.summaries if levels is not None else ()):
        lmask = block_lists_to_mask(levels.indices[lev], levels.counts[lev], nk)
        parts.append(_pooled_part(summ, block_size, lmask, compute_dtype))
        attended = attended | lmask
    if summary is not None:
        parts.append(_pooled_part(summary, block_size, ~attended, compute_dtype))
    ncols = L + sum(p[0].shape[2] for p in parts)
    rows = max(block_size, (max_chunk_elems // max(1, B * H * ncols)) // block_size * block_size)
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, *(x for p in parts for x in p[:2]))
    )
    outs, lses = [], []
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        qblk = torch.arange(r0, r1, device=dev) // block_size
        pooled = [(*p[:4], p[4][:, :, qblk]) for p in parts]
        args = (qf[:, :, r0:r1], kf, vf, mask[:, :, qblk], kblk, scale, pooled)
        if need_grad and r1 - r0 < L:
            o, lse = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            o, lse = _chunk(*args)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
    lse = torch.cat(lses, 2) if len(lses) > 1 else lses[0]
    return out.to(q.dtype), lse.float()


def dense_attention_ref(q, k, v, sm_scale=None, max_chunk_elems: int = 1 << 26):
    """Plain softmax attention in float32 (chunked over queries, no grad); for GPU-tier checks."""
    B, H, L, D = q.shape
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    rows = max(1, max_chunk_elems // max(1, B * H * k.shape[2]))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    kf, vf = k.float(), v.float()
    with torch.no_grad():
        for r0 in range(0, L, rows):
            s = torch.matmul(q[:, :, r0 : r0 + rows].float(), kf.transpose(-1, -2)) * scale
            out[:, :, r0 : r0 + rows] = torch.matmul(torch.softmax(s, -1), vf)
    return out

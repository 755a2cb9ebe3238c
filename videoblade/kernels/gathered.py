"""Block-sparse attention for CPUs: gather the kept key blocks, attend with one SDPA call.

Same semantics as `reference.block_sparse_attention_ref` (SPEC 1.4/1.5): query block i attends
exactly to the tokens of the key blocks it keeps and, with `summary`, to the summary tokens of
every key block it skips (logit q.k_s * scale + log(count)); both form one softmax. The reference
materialises a token-level [L, L] mask and scores every key; here each query block scores only
its kept blocks (padded to the largest kept count in the batch) plus the summaries (scored once
per query, never copied per block), so the work is
about density x dense + the compensation, which is what makes ASA usable on CPU at the demo's
sizes. Differentiable through plain autograd (gather + SDPA). Returns the output only (no LSE):
it backs `AdaptiveSparseAttention`'s CPU path, which does not use the LSE.

Rows are never empty under ASA's mask policy (the diagonal block is always kept); a caller's mask
that keeps nothing for a row gives out 0 there, with zero gradients, as the reference. A query row
of the last, partial block that is padding is computed and dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import Summary, check_summary, num_blocks

__all__ = ["block_sparse_attention_gathered"]


def block_sparse_attention_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                    block_size: int, sm_scale: float | None = None,
                                    summary: Summary | None = None) -> torch.Tensor:
    """q, k, v [B, H, L, D]; mask bool [B, H, NQ, NK] (kept key blocks per query block).
    Returns out [B, H, L, D] in q.dtype (computed in float32 for half inputs)."""
    B, H, L, D = q.shape
    nb = num_blocks(L, block_size)
    if tuple(mask.shape) != (B, H, nb, nb):
        raise ValueError(f"mask must be [B, H, {nb}, {nb}] for L={L}, block {block_size}; got {tuple(mask.shape)}")
    if summary is not None:
        check_summary(summary, q.shape, block_size)
    dt = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    scale = float(sm_scale) if sm_scale is not None else D**-0.5
    pad = nb * block_size - L
    qf, kf, vf = (t.to(dt) for t in (q, k, v))
    if pad:
        qf, kf, vf = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, vf))
    G = B * H
    mask = mask.reshape(G, nb, nb)
    counts = mask.sum(-1)  # [G, NQ]
    M = max(1, int(counts.max()))
    # kept block ids first (ascending), padding slots after: a stable sort of ~mask does it
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :M]  # [G, NQ, M]
    valid = torch.arange(M, device=q.device).view(1, 1, M) < counts.unsqueeze(-1)  # [G, NQ, M]

    kb = kf.reshape(G, nb, block_size, D)
    vb = vf.reshape(G, nb, block_size, D)
    flat = (order + torch.arange(G, device=q.device).view(G, 1, 1) * nb).reshape(-1)
    ksel = kb.reshape(G * nb, block_size, D).index_select(0, flat).reshape(G, nb, M * block_size, D)
    vsel = vb.reshape(G * nb, block_size, D).index_select(0, flat).reshape(G, nb, M * block_size, D)
    tok_ok = valid.unsqueeze(-1).expand(G, nb, M, block_size)
    if pad:  # tokens past L inside the last block are not keys
        in_range = (order.unsqueeze(-1) * block_size + torch.arange(block_size, device=q.device)) < L
        tok_ok = tok_ok & in_range
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=q.device)
    zero = torch.zeros((), dtype=dt, device=q.device)
    bias = torch.where(tok_ok.reshape(G, nb, 1, M * block_size), zero, neg_inf)

    qb = qf.reshape(G, nb, block_size, D)
    s1 = torch.matmul(qb, ksel.transpose(-1, -2)) * scale + bias  # [G, NQ, bs, M*bs]
    mx = s1.amax(-1, keepdim=True)
    s2 = None
    if summary is not None:
        # the summaries are shared by every query block: score them once per query, no per-block copy
        S = summary.k.shape[2]
        per = block_size // summary.pool
        sblk = torch.arange(S, device=q.device) // per
        skipped = ~mask[..., sblk]  # [G, NQ, S]
        sbias = torch.where(skipped, summary.bias.to(device=q.device, dtype=dt).view(1, 1, S), neg_inf)
        sk = summary.k.to(dt).reshape(G, 1, S, D)
        sv = summary.v.to(dt).reshape(G, 1, S, D)
        s2 = torch.matmul(qb, sk.transpose(-1, -2)) * scale + sbias.unsqueeze(2)  # [G, NQ, bs, S]
        mx = torch.maximum(mx, s2.amax(-1, keepdim=True))
    mx = mx.detach()
    mx = torch.where(torch.isfinite(mx), mx, zero)
    e1 = torch.exp(s1 - mx)
    den = e1.sum(-1, keepdim=True)
    out = torch.matmul(e1, vsel)
    if s2 is not None:
        e2 = torch.exp(s2 - mx)
        den = den + e2.sum(-1, keepdim=True)
        out = out + torch.matmul(e2, sv)
    # a row with nothing to attend to (a caller's mask that keeps no block, no compensation) gives 0,
    # as the reference, not 0 / 0
    out = out / torch.where(den > 0, den, torch.ones_like(den))
    out = out.reshape(B, H, nb * block_size, D)[:, :, :L]
    return out.to(q.dtype)

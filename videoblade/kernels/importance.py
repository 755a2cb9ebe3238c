"""Block-importance estimate (SPEC 1.2): a cheap block-level attention map, no grad.

``estimate_block_importance(q, k, block_size, samples_per_block=16, mode="sample")``
returns float32 [B, H, NQ, NK] with rows summing to 1: P[b, h, i, j] estimates the
attention mass query block i puts on key block j.

* ``mode="sample"``: ``samples_per_block`` evenly spaced tokens of every block (the
  partial last block is sampled over its own tokens). For each sampled query the softmax
  over all sampled keys is taken (each key sample carries a ``log(n_j / S)`` logit bias,
  so a partial block counts by its real size), sum-pooled over the key samples of each
  block and averaged over the query samples of each block. One Triton kernel, two passes
  over the sampled keys (row max/sum, then the normalised pooled mass); no [L, L] matrix.
* ``mode="mean"``: mean-pooled q and k per block, softmax over blocks (with a
  ``log(n_j)`` bias), in torch. Cheapest; blurrier.

``estimate_block_importance_ref`` is the same computation in plain torch (float32).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .blocks import num_blocks


@functools.lru_cache(maxsize=64)
def _block_sizes(L: int, block_size: int, device) -> torch.Tensor:
    # cached: a pure function of the geometry (saves tiny launches on every call)
    nb = num_blocks(L, block_size)
    n = torch.full((nb,), block_size, dtype=torch.int64, device=device)
    n[-1] = L - (nb - 1) * block_size
    return n


@functools.lru_cache(maxsize=64)
def _sample_plan(L: int, block_size: int, samples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = sample_positions(L, block_size, samples, device)
    kbias = (_block_sizes(L, block_size, device).to(torch.float32) / samples).log2().repeat_interleave(samples)
    return pos, kbias


def sample_positions(L: int, block_size: int, samples: int, device) -> torch.Tensor:
    """Evenly spaced token positions, ``samples`` per block: long [NB * samples]."""
    nb = num_blocks(L, block_size)
    n = _block_sizes(L, block_size, device)
    j = torch.arange(samples, device=device)
    pos = torch.arange(nb, device=device)[:, None] * block_size + (j[None, :] * n[:, None]) // samples
    return pos.reshape(-1)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block of tokens (partial last block over its own tokens): fp32 [B,H,NB,D]."""
    B, H, L, D = x.shape
    nf = L // block_size
    parts = []
    if nf:
        parts.append(x[:, :, : nf * block_size].reshape(B, H, nf, block_size, D).sum(3, dtype=torch.float32))
    if L > nf * block_size:
        parts.append(x[:, :, nf * block_size :].sum(2, keepdim=True, dtype=torch.float32))
    s = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    return s / _block_sizes(L, block_size, x.device).to(torch.float32)[:, None]


@triton.jit
def _estimate_kernel(
    QS, KS, KB, P, qk_scale, NQ, NK,
    S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    QB: tl.constexpr = BLOCK_Q // S
    KBL: tl.constexpr = BLOCK_K // S
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    NQS = NQ * S
    NKS = NK * S
    offs_r = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_r < NQS
    q = tl.load(QS + bh.to(tl.int64) * NQS * HEAD_DIM + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    Kp = KS + bh.to(tl.int64) * NKS * HEAD_DIM
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    for k0 in range(0, NKS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < NKS
        k = tl.load(Kp + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
        bias = tl.load(KB + offs_k, mask=kmask, other=float("-inf"))
        s = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :]
        m_new = tl.maximum(m, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m = m_new
    inv = tl.where(rmask, 1.0 / (l_i * S), 0.0)  # also averages over the S query samples
    offs_qb = pid * QB + tl.arange(0, QB)
    Pp = P + bh.to(tl.int64) * NQ * NK
    for k0 in range(0, NKS, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < NKS
        k = tl.load(Kp + offs_k[:, None] * HEAD_DIM + offs_d[None, :], mask=kmask[:, None], other=0.0)
        bias = tl.load(KB + offs_k, mask=kmask, other=float("-inf"))
        s = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :]
        p = tl.math.exp2(s - m[:, None]) * inv[:, None]
        mass = tl.sum(tl.sum(tl.reshape(p, (QB, S, KBL, S)), 3), 1)  # [QB, KBL]
        offs_kb = k0 // S + tl.arange(0, KBL)
        tl.store(Pp + offs_qb[:, None] * NK + offs_kb[None, :], mass,
                 mask=(offs_qb[:, None] < NQ) & (offs_kb[None, :] < NK))


_EST_CONFIGS = [
    triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bq, bk, w, st in [(64, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 4, 3)]
]


def _est_prune(configs, named_args, **kwargs):
    S = {**named_args, **kwargs}["S"]
    return [c for c in configs if c.kwargs["BLOCK_Q"] >= S and c.kwargs["BLOCK_K"] >= S] or [
        triton.Config({"BLOCK_Q": S, "BLOCK_K": S}, num_warps=4, num_stages=2)
    ]


_estimate_tuned = triton.autotune(_EST_CONFIGS, key=["S", "HEAD_DIM"], prune_configs_by={"early_config_prune": _est_prune})(
    _estimate_kernel
)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@torch.no_grad()
def estimate_block_importance(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 128,
    samples_per_block: int = 16,
    mode: str = "sample",
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Block attention-mass estimate, float32 [B, H, NQ, NK], rows sum to 1 (no grad)."""
    B, H, L, D = q.shape
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if mode == "mean":
        return _estimate_mean(q, k, block_size, scale)
    if mode != "sample":
        raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
    S = int(samples_per_block)
    if not _pow2(S) or S > block_size:
        raise ValueError(f"samples_per_block must be a power of two <= block_size, got {S}")
    nb = num_blocks(L, block_size)
    pos, kbias = _sample_plan(L, block_size, S, q.device)
    qs = q.index_select(2, pos).contiguous()
    ks = k.index_select(2, pos).contiguous()
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _estimate_sample_torch(qs, ks, kbias, nb, S, scale)
    return _estimate_sampled_op(qs, ks, kbias, nb, S, scale)


# A custom op, so torch.compile treats the launch as one opaque call (inductor's own tracing
# of user Triton kernels re-typed the float scale as fp64 and failed on this kernel's
# loop-carried fp32 state); the samples/bias gathers around it still compile.
@torch.library.custom_op("videoblade::estimate_sampled", mutates_args=())
def _estimate_sampled_op(
    qs: torch.Tensor, ks: torch.Tensor, kbias: torch.Tensor, nb: int, S: int, scale: float
) -> torch.Tensor:
    B, H, _, D = qs.shape
    P = torch.empty((B, H, nb, nb), dtype=torch.float32, device=qs.device)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        t = max(16, S)
        _estimate_kernel[(triton.cdiv(nb * S, t), B * H)](
            qs, ks, kbias, P, scale * 1.4426950408889634, nb, nb, S=S, HEAD_DIM=D, BLOCK_Q=t, BLOCK_K=t
        )
    else:
        _estimate_tuned[lambda M: (triton.cdiv(nb * S, M["BLOCK_Q"]), B * H)](
            qs, ks, kbias, P, scale * 1.4426950408889634, nb, nb, S=S, HEAD_DIM=D
        )
    return P


@_estimate_sampled_op.register_fake
def _(qs, ks, kbias, nb, S, scale):
    return qs.new_empty((qs.shape[0], qs.shape[1], nb, nb), dtype=torch.float32)


def _estimate_mean(q, k, block_size, scale):
    L = q.shape[2]
    qm = block_means(q, block_size)
    km = block_means(k, block_size)
    bias = _block_sizes(L, block_size, q.device).to(torch.float32).log()
    return torch.softmax(torch.matmul(qm, km.transpose(-1, -2)) * scale + bias, -1)


def _estimate_sample_torch(qs, ks, kbias_log2, nb, S, scale):
    B, H = qs.shape[:2]
    s = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale + kbias_log2 * math.log(2.0)
    p = torch.softmax(s, -1)  # [B,H,NB*S,NB*S]
    return p.reshape(B, H, nb, S, nb, S).sum(5).mean(3)


def estimate_block_importance_ref(q, k, block_size=128, samples_per_block=16, mode="sample", sm_scale=None):
    """Plain-torch float32 version of :func:`estimate_block_importance` (for tests)."""
    L, D = q.shape[2], q.shape[3]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if mode == "mean":
        return _estimate_mean(q.float(), k.float(), block_size, scale)
    S = samples_per_block
    pos = sample_positions(L, block_size, S, q.device)
    kb = (_block_sizes(L, block_size, q.device).to(torch.float32) / S).log2().repeat_interleave(S)
    return _estimate_sample_torch(q.index_select(2, pos), k.index_select(2, pos), kb, num_blocks(L, block_size), S, scale)

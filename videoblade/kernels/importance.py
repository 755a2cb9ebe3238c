"""Block-importance estimate (SPEC 1.2): a cheap block-level attention map, no grad.

``estimate_block_importance(q, k, block_size, samples_per_block=16, mode="sample")``
returns float32 [B, H, NQ, NK] with rows summing to 1: P[b, h, i, j] estimates the
attention mass query block i puts on key block j.

* ``mode="sample"``: ``samples_per_block`` evenly spaced tokens of every block (the
  partial last block is sampled over its own tokens). For each sampled query the softmax
  over all sampled keys is taken (each key sample carries a ``log(n_j / S)`` logit bias,
  so a partial block counts by its real size), sum-pooled over the key samples of each
  block and averaged over the query samples of each block. Two Triton kernels, one pass over
  the sampled keys (read in place from k, as the sampled queries from q): the first keeps the
  online softmax state per sampled query and writes each row's mass per key block relative
  to the running max of its key tile (a float32 scratch of [NQ*S, NK] per head, ~50 MB at
  Wan); the second rescales those by the final max and row sum and averages the S rows of
  every query block. No [L, L] matrix; half the
  logits and exponentials of a two-pass version.
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

from .blocks import _last_unit, _pow2, dot_precision, num_blocks, tile_head_dim


def _last_block(L: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, tokens in the last one). Python ints, so callers traced by torch.compile
    build no tensors for the geometry (the partial last block is the only one that differs)."""
    nb = num_blocks(L, block_size)
    return nb, L - (nb - 1) * block_size


def _key_bias_log2(L: int, block_size: int, samples: int, device) -> torch.Tensor:
    """log2(tokens per sampled key) for the NB * samples sampled keys: each stands for its block's
    tokens / samples (so a partial last block weighs less)."""
    nb, last = _last_block(L, block_size)
    kb = torch.cat([torch.full((nb - 1,), math.log2(block_size / samples), dtype=torch.float32, device=device),
                    torch.full((1,), math.log2(last / samples), dtype=torch.float32, device=device)])
    return kb.repeat_interleave(samples)


@functools.lru_cache(maxsize=64)
def _sample_plan(L: int, block_size: int, samples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_positions(L, block_size, samples, device), _key_bias_log2(L, block_size, samples, device)


def sample_positions(L: int, block_size: int, samples: int, device) -> torch.Tensor:
    """Evenly spaced token positions, ``samples`` per block: long [NB * samples]."""
    nb, last = _last_block(L, block_size)
    j = torch.arange(samples, device=device)
    full = torch.arange(nb - 1, device=device)[:, None] * block_size + (j[None, :] * block_size) // samples
    tail = (nb - 1) * block_size + (j * last) // samples
    return torch.cat([full.reshape(-1), tail])


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block of tokens (partial last block over its own tokens): fp32 [B,H,NB,D]."""
    B, H, L, D = x.shape
    nf = L // block_size
    parts = []
    if nf:
        parts.append(x[:, :, : nf * block_size].reshape(B, H, nf, block_size, D).sum(3, dtype=torch.float32)
                     / block_size)
    if L > nf * block_size:
        parts.append(x[:, :, nf * block_size :].sum(2, keepdim=True, dtype=torch.float32) / (L - nf * block_size))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


@triton.jit
def _estimate_kernel(
    Q, K, POS, KB, R, M, MF, LF, qk_scale, H, NQ, NK,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one pass over the sampled keys: online softmax state (m, l) per sampled query row, and per
    # key tile the row's mass on each key block relative to the running max at that tile, R[row, kb],
    # with that max in M[row, tile]; _estimate_fix_kernel rescales and pools the rows afterwards.
    # The samples are read in place: row r of the sampled q (k) is token POS[r] of head (b, h), so
    # no gathered copy of q and k is written first (any [B, H, L, D] strides, unit last stride)
    KBL: tl.constexpr = BLOCK_K // S
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    NQS = NQ * S
    NKS = NK * S
    NT = tl.cdiv(NKS, BLOCK_K)
    offs_r = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_r < NQS
    pos_q = tl.load(POS + offs_r, mask=rmask, other=0).to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + pos_q[:, None] * stride_ql + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    Kp = K + b * stride_kb + h * stride_kh
    Rp = R + bh * NQS * NK + offs_r[:, None] * NK
    Mp = M + bh * NQS * NT + offs_r * NT
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    for it in range(0, NT):
        offs_k = it * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < NKS
        pos_k = tl.load(POS + offs_k, mask=kmask, other=0).to(tl.int64)
        k = tl.load(Kp + pos_k[:, None] * stride_kl + offs_d[None, :], mask=kmask[:, None], other=0.0)
        bias = tl.load(KB + offs_k, mask=kmask, other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias[None, :]
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile's first key sample is real
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * tl.math.exp2(m - m_new) + tl.sum(p, 1)
        m = m_new
        mass = tl.sum(tl.reshape(p, (BLOCK_Q, KBL, S)), 2)  # [BLOCK_Q, KBL]
        offs_kb = it * KBL + tl.arange(0, KBL)
        tl.store(Rp + offs_kb[None, :], mass, mask=rmask[:, None] & (offs_kb[None, :] < NK))
        tl.store(Mp + it, m, mask=rmask)
    tl.store(MF + bh * NQS + offs_r, m, mask=rmask)
    tl.store(LF + bh * NQS + offs_r, l_i, mask=rmask)


@triton.jit
def _estimate_fix_kernel(R, M, MF, LF, P, NQ, NK, NT, S: tl.constexpr, KBL: tl.constexpr, NKP: tl.constexpr):
    # P[qb, kb] = 1/S sum over the S sampled rows r of query block qb of
    #             R[r, kb] * 2^(M[r, tile of kb] - MF[r]) / LF[r]
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    NQS = NQ * S
    rows = qb * S + tl.arange(0, S)
    offs_kb = tl.arange(0, NKP)
    kmask = offs_kb[None, :] < NK
    r = tl.load(R + bh * NQS * NK + rows[:, None] * NK + offs_kb[None, :], mask=kmask, other=0.0)
    mt = tl.load(M + bh * NQS * NT + rows[:, None] * NT + (offs_kb // KBL)[None, :], mask=kmask, other=0.0)
    mf = tl.load(MF + bh * NQS + rows)
    inv = 1.0 / (tl.load(LF + bh * NQS + rows) * S)  # also averages over the S query samples
    mass = tl.sum(r * tl.math.exp2(mt - mf[:, None]) * inv[:, None], 0)
    tl.store(P + (bh * NQ + qb) * NK + offs_kb, mass, mask=offs_kb < NK)


_KEY_TILE = 64  # sampled keys per tile of the first pass on the GPU (module constant for A/B runs)


@functools.lru_cache(maxsize=16)
def _est_launch(S: int, D: int, block_k: int):
    # the key tile is fixed (it sets the scratch layout); the autotuner varies the query tile,
    # warps and stages only
    configs = [triton.Config({"BLOCK_Q": bq, "BLOCK_K": block_k}, num_warps=w, num_stages=st)
               for bq, w, st in [(64, 4, 2), (128, 8, 3), (128, 4, 3), (64, 4, 3), (128, 8, 2)] if bq >= S]
    configs = configs or [triton.Config({"BLOCK_Q": S, "BLOCK_K": block_k}, num_warps=4, num_stages=2)]
    return triton.autotune(configs, key=["S", "HEAD_DIM", "DOT_PREC"])(_estimate_kernel)


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
    if (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1") or not tile_head_dim(D):
        # the torch twin: on the CPU outside the kernel tests, and for head dims the kernel's dot cannot take
        pos, kbias = _sample_plan(L, block_size, S, q.device)
        return _estimate_sample_torch(q.index_select(2, pos), k.index_select(2, pos), kbias,
                                      num_blocks(L, block_size), S, scale)
    return _estimate_sampled_op(_last_unit(q), _last_unit(k), block_size, S, scale)


# A custom op, so torch.compile treats the launch as one opaque call (inductor's own tracing
# of user Triton kernels re-typed the float scale as fp64 and failed on this kernel's
# loop-carried fp32 state). q and k are the full [B, H, L, D] tensors, read by the kernel in
# place at the sampled positions. The sampling plan (positions, key-sample bias) is looked up here,
# inside the op, so a compiled caller neither traces the cached plan into its graph nor rebuilds it.
@torch.library.custom_op("videoblade::estimate_sampled", mutates_args=())
def _estimate_sampled_op(q: torch.Tensor, k: torch.Tensor, block_size: int, S: int, scale: float) -> torch.Tensor:
    B, H, L, D = q.shape
    dev = q.device
    nb = num_blocks(L, block_size)
    pos, kbias = _sample_plan(L, block_size, S, dev)
    nqs = pos.numel()
    P = torch.empty((B, H, nb, nb), dtype=torch.float32, device=dev)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    prec = dot_precision(q.dtype)
    bk = max(16, S) if interpret else max(_KEY_TILE, S)  # key tile of the first pass: sets the scratch layout
    nt = triton.cdiv(nb * S, bk)
    R = torch.empty((B * H, nqs, nb), dtype=torch.float32, device=dev)
    M = torch.empty((B * H, nqs, nt), dtype=torch.float32, device=dev)
    MF = torch.empty((B * H, nqs), dtype=torch.float32, device=dev)
    LF = torch.empty((B * H, nqs), dtype=torch.float32, device=dev)
    args = (q, k, pos, kbias, R, M, MF, LF, scale * 1.4426950408889634, H, nb, nb,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    if interpret:
        _estimate_kernel[(triton.cdiv(nqs, bk), B * H)](*args, S=S, HEAD_DIM=D, BLOCK_Q=bk, BLOCK_K=bk, DOT_PREC=prec)
    else:
        _est_launch(S, D, bk)[lambda M_: (triton.cdiv(nqs, M_["BLOCK_Q"]), B * H)](*args, S=S, HEAD_DIM=D,
                                                                                   DOT_PREC=prec)
    _estimate_fix_kernel[(nb, B * H)](R, M, MF, LF, P, nb, nb, nt, S=S, KBL=bk // S,
                                     NKP=max(16, triton.next_power_of_2(nb)))
    return P


@_estimate_sampled_op.register_fake
def _(q, k, block_size, S, scale):
    nb = num_blocks(q.shape[2], block_size)
    return q.new_empty((q.shape[0], q.shape[1], nb, nb), dtype=torch.float32)


def _estimate_mean(q, k, block_size, scale):
    # each block mean stands for its tokens: logit + log(tokens). Softmax ignores the common
    # log(block_size), so only a partial last block's column moves, by log(last / block_size)
    nb, last = _last_block(q.shape[2], block_size)
    s = torch.matmul(block_means(q, block_size), block_means(k, block_size).transpose(-1, -2)) * scale
    if last != block_size:
        s = torch.cat([s[..., : nb - 1], s[..., nb - 1 :] + math.log(last / block_size)], -1)
    return torch.softmax(s, -1)


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
    kb = _key_bias_log2(L, block_size, S, q.device)
    return _estimate_sample_torch(q.index_select(2, pos), k.index_select(2, pos), kb, num_blocks(L, block_size), S, scale)

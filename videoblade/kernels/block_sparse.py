"""Triton block-sparse attention, forward and backward, with in-kernel compensation.

Layout (flash-linear-attention style): Triton kernels, host launchers
``block_sparse_attention_fwd`` / ``block_sparse_attention_bwd``, torch.library custom ops
with fake (meta) implementations and registered autograd (so ``torch.compile`` traces
through), and one thin public function :func:`block_sparse_attention`.

Algorithm
---------
Forward: one program per (query tile, batch*head). It walks the kept key blocks of its
query block (``kv_indices``), flash-attention style (online softmax in base 2 with the
scale folded into one FMA), then - with compensation - walks all summary tokens (padded to
a multiple of 128, whole unmasked tiles the size of the key tile) with one precomputed float32
bias row per query block (-inf for the summaries of kept blocks and the padding), in the *same*
online softmax, so kept tokens and summaries form one softmax partition (SPEC 1.5). It writes out and the row log-sum-exp (natural log).

Backward: probabilities are recomputed from the LSE (no P matrix is stored).

* dq: query-major, same walk as the forward (kept blocks, then summaries).
* dk, dv: key-major, over the *transposed* block index (for each key block the query
  blocks that keep it). Each program owns one key tile and accumulates its dk/dv in
  registers, then writes them once. We prefer this to the alternative (query-major with
  atomic adds into dk/dv) because (1) it is deterministic - float atomics make the
  result depend on the arrival order, which breaks bitwise reproducibility of training
  runs and of our own tests; (2) it writes dk/dv once instead of once per kept pair
  (fp32 atomics into a [B,H,L,D] buffer plus a final cast cost extra memory traffic);
  (3) the transposed index costs a few tiny torch ops on [B,H,NQ,NK] ints.
  The price is recomputing QK^T and dO V^T in both passes (7 matmuls instead of 5),
  the same trade FlexAttention's backward makes.
* summary dk/dv: key-major over summary tiles, the query axis split into chunks so the grid
  fills the GPU (~4 waves; one program per summary tile walking all of L gave 192 programs at
  Wan); each program writes float32 partial sums per chunk, added on the host in a fixed
  order (deterministic). Query blocks that keep a summary's block read -inf in the bias table.

The walk over a row's block list (``_ids_step``) loads the block id of tile t + 1 in iteration
t, so the K/V (or Q/dO) tile loads of an iteration depend on no load issued in it, and Triton's
pipeliner issues them ``num_stages - 1`` tiles ahead (TTGIR: ``async_wait {num = 2}`` at three
stages). With the id loaded in the tile's own iteration the pipeliner spends a stage on that load
and the tile copies land one stage later: in effect no prefetch (``async_wait {num = 0}``).
On an H100 (benchmarks/results/attention_h100.json, autotuned tiles) the one-ahead walk is 12 %
faster than the per-tile load on the dense Wan forward and 15 % on its forward + backward, and
within noise at density 0.15. ``VIDEOBLADE_KERNEL_IDS=load`` keeps the per-tile load for A/B runs
(``benchmarks/attention.py``): the gain rests on Triton's pipeliner, which may change.

The last block may be partial: loads are masked (zeros) and the forward masks logits of
the padded keys (only in the last key block: the kept list is ascending so that block
is peeled off the main loop; a list that is not ascending is outside the contract, see
``blocks.check_block_lists``). The dq pass zeroes the padded keys' probabilities (their logit
is 0, so exp(-lse) overflowed into inf * 0 = NaN for rows with lse far below 0). Rows past L
read lse=+inf in the backward, so their probabilities vanish without extra masking.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..config import MAX_POOLED_LEVELS, level_pools_error
from .blocks import (
    PooledLevels,
    Summary,
    _last_unit,
    check_block_lists,
    check_levels_geometry,
    check_summary,
    dot_precision,
    num_blocks,
    transpose_block_lists,
)

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)  # the head dims the kernels take
LN2 = 0.6931471805599453


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TMA_MODES = ("auto", "1", "0")  # VIDEOBLADE_KERNEL_TMA


def _tma_wanted(mode: str, head_dim: int, capability: tuple[int, int] | None) -> bool:
    """Whether the streamed tiles go through TMA descriptors, before the layout checks.

    ``capability``: the GPU's compute capability, None under the interpreter. ``auto`` (the default):
    on Hopper and newer at head dim 128; measured on an H100 (benchmarks/results/attention_h100.json,
    c3eaaad, Wan 1x12x32760x128 at density 0.15) it takes the forward from 2.02 to 1.85 ms, with
    compensation from 2.68 to 2.34 ms, forward + backward 3-4 % less, and the compiled Wan2.1
    forward with ASA (benchmarks/results/transformer_h100.json, same commit) to 248.7 ms from
    252.9 ms at f14f233. At head dim 64 (CogVideoX) the same file has it 2-4 % slower, so it stays off.
    ``1`` forces it wherever it can run (the interpreter included, so the CPU tests cover it), ``0``
    turns it off.
    """
    if mode not in _TMA_MODES:
        raise ValueError(f"VIDEOBLADE_KERNEL_TMA must be one of {_TMA_MODES}, got {mode!r}")
    if TensorDescriptor is None or mode == "0":
        return False
    if capability is not None and capability[0] < 9:
        return False
    return mode == "1" or (capability is not None and head_dim >= 128)


def _use_tma(*tensors) -> bool:
    """Tensor-memory-accelerator loads for the streamed K/V (fwd, dq) and Q/dO (dk/dv) tiles
    (``_tma_wanted``). Needs 16-byte aligned base and strides (4-D descriptor [B, H, L, D], any layout).
    """
    t0 = tensors[0]
    if _interpret():
        capability = None
    elif t0.is_cuda:
        capability = torch.cuda.get_device_capability(t0.device)
    else:
        return False
    if not _tma_wanted(os.environ.get("VIDEOBLADE_KERNEL_TMA", "auto"), t0.shape[-1], capability):
        return False
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _desc(t: torch.Tensor, rows: int):
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def _autotune() -> bool:
    # VIDEOBLADE_KERNEL_AUTOTUNE=0: take each kernel's first (default) tile config, no tuning
    return os.environ.get("VIDEOBLADE_KERNEL_AUTOTUNE", "1") != "0"


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _load_rows(X, b, h, start, offs_b, offs_d, L, stride_l, MASK: tl.constexpr, USE_TMA: tl.constexpr,
               ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    # ROWS x HEAD_DIM tile of rows [start, start + ROWS) of head (b, h); rows >= L read as 0.
    # X is a 4-D [B, H, L, D] TMA descriptor (OOB rows zero-filled by the copy engine) or a
    # pointer already offset to head (b, h).
    if USE_TMA:
        x = X.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
    else:
        offs = start + offs_b
        if MASK:
            x = tl.load(X + offs[:, None] * stride_l + offs_d[None, :], mask=offs[:, None] < L, other=0.0)
        else:
            x = tl.load(X + offs[:, None] * stride_l + offs_d[None, :])
    return x


@triton.jit
def _ids_step(ids, idx_ptr, t, cnt, SUB: tl.constexpr, IDS_AHEAD: tl.constexpr):
    # (block id of tile t, the walk's state for tile t + 1); SUB tiles per block; the walk starts
    # from ids = the list's first entry (index 0 always exists). IDS_AHEAD (the default): the id
    # of tile t + 1 is loaded in iteration t, so no tile load waits on a load of its own
    # iteration; else the id is loaded for the tile itself. Why it matters: module docstring.
    if IDS_AHEAD:
        blk = ids
        nxt = tl.load(idx_ptr + tl.minimum((t + 1) // SUB, tl.maximum(cnt - 1, 0)))
    else:
        blk = tl.load(idx_ptr + t // SUB)
        nxt = ids
    return blk, nxt


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, b, h, start_n, offs_nb, offs_d, stride_kl, stride_vl, L, qk_scale,
              MASK: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              DOT_PREC: tl.constexpr):
    k = _load_rows(K, b, h, start_n, offs_nb, offs_d, L, stride_kl, MASK, USE_TMA, BLOCK_N, HEAD_DIM)
    v = _load_rows(V, b, h, start_n, offs_nb, offs_d, L, stride_vl, MASK, USE_TMA, BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASK:
        qk = tl.where((start_n + offs_nb)[None, :] < L, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASK:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_biased_tile(acc, l_i, m_i, q, pk, pv, bias, qk_scale, DOT_PREC: tl.constexpr):
    # one tile of pooled tokens (compensation summaries, multi-level blocks): logits carry a
    # per-token bias in log2 units (log2 of the tokens averaged, -inf for a masked token), so a
    # tile may be all -inf: the row max is guarded. Not shared with _fwd_tile on purpose: that one
    # keeps the scale inside one FMA with the max (qk * qk_scale - m), the bias here needs the
    # scaled logits first
    qk = tl.dot(q, tl.trans(pk), input_precision=DOT_PREC) * qk_scale + bias[None, :]
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(pv.dtype), pv, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _level_tile(ids, idx_ptr, t, cnt, row0, offs_t, PKp, PVp, PB, stride_pl, offs_d, ROWS: tl.constexpr,
                TILE: tl.constexpr, IDS_AHEAD: tl.constexpr):
    # tile t of a row's walk over one level's block list: (pooled keys, values, log2 bias, the
    # walk's state). Rows of the levels' concatenated tensors: ROWS pooled tokens per key block
    # from row0 + block * ROWS, TILE rows per tile
    SUB: tl.constexpr = ROWS // TILE
    blk, ids = _ids_step(ids, idx_ptr, t, cnt, SUB, IDS_AHEAD)
    rows = row0 + blk * ROWS + (t % SUB) * TILE + offs_t
    pk = tl.load(PKp + rows[:, None] * stride_pl + offs_d[None, :])
    pv = tl.load(PVp + rows[:, None] * stride_pl + offs_d[None, :])
    return pk, pv, tl.load(PB + rows), ids


@triton.jit
def _fwd_level(acc, l_i, m_i, q, PKp, PVp, PB, idx_ptr, cnt, row0, stride_pl, qk_scale, offs_d,
               ROWS: tl.constexpr, TILE: tl.constexpr, IDS_AHEAD: tl.constexpr, DOT_PREC: tl.constexpr):
    # the key blocks a query block attends at one pooled level (SPEC 1.6), in the running softmax
    offs_t = tl.arange(0, TILE)
    ids = tl.load(idx_ptr)
    for t in range(0, cnt * (ROWS // TILE)):
        pk, pv, bias, ids = _level_tile(ids, idx_ptr, t, cnt, row0, offs_t, PKp, PVp, PB, stride_pl, offs_d, ROWS,
                                        TILE, IDS_AHEAD)
        acc, l_i, m_i = _fwd_biased_tile(acc, l_i, m_i, q, pk, pv, bias, qk_scale, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KVI, KVC, SK, SV, SBIAS, PK, PV, PB, PI, PC,  # noqa: E741
    qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_sb, stride_sh, stride_sl,
    stride_pb, stride_ph, stride_pl,
    H, L, NQ, NK, MAXK, NSP, MAXP, LEV_STRIDE,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_SUMMARY: tl.constexpr, EVEN_L: tl.constexpr, USE_TMA: tl.constexpr, IDS_AHEAD: tl.constexpr,
    NLEV: tl.constexpr, POOL1: tl.constexpr, POOL2: tl.constexpr, POOL3: tl.constexpr,
    PT1: tl.constexpr, PT2: tl.constexpr, PT3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
):
    SUB: tl.constexpr = BLOCK // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    qblk = start_m // BLOCK
    row = bh * NQ + qblk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    Qp = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if USE_TMA:
        Kp = K
        Vp = V
    else:
        Kp = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        Vp = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(Qp + offs_m[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    cnt = tl.load(KVC + row)
    idx_ptr = KVI + row.to(tl.int64) * MAXK
    ids = tl.load(idx_ptr)
    n_tiles = cnt * SUB
    if not EVEN_L:
        # the partial last key block, if kept, is the last list entry: peel it off
        last = tl.load(idx_ptr + tl.maximum(cnt - 1, 0))
        has_last = (cnt > 0) & (last == NK - 1)
        n_tiles = n_tiles - has_last.to(tl.int32) * SUB
    for t in range(0, n_tiles):
        blk, ids = _ids_step(ids, idx_ptr, t, cnt, SUB, IDS_AHEAD)
        start_n = blk * BLOCK + (t % SUB) * BLOCK_N
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kp, Vp, b, h, start_n, offs_nb, offs_d, stride_kl, stride_vl, L,
                                  qk_scale, False, USE_TMA, BLOCK_N, HEAD_DIM, DOT_PREC)
    if not EVEN_L:
        if has_last:
            last_start = (NK - 1) * BLOCK
            n_sub = tl.cdiv(L - last_start, BLOCK_N)
            for t in range(0, n_sub):
                start_n = last_start + t * BLOCK_N
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, Kp, Vp, b, h, start_n, offs_nb, offs_d, stride_kl,
                                          stride_vl, L, qk_scale, True, USE_TMA, BLOCK_N, HEAD_DIM, DOT_PREC)

    if NLEV > 0:
        # multi-level (SPEC 1.6): up to three pooled levels, each a block list walked like the
        # exact one over its pooled tokens (the levels' tensors concatenated, level after level)
        PKp = PK + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        PVp = PV + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        lrow = row.to(tl.int64)
        acc, l_i, m_i = _fwd_level(acc, l_i, m_i, q, PKp, PVp, PB, PI + lrow * MAXP, tl.load(PC + lrow), 0,
                                   stride_pl, qk_scale, offs_d, BLOCK // POOL1, PT1, IDS_AHEAD, DOT_PREC)
        if NLEV > 1:
            acc, l_i, m_i = _fwd_level(acc, l_i, m_i, q, PKp, PVp, PB, PI + (LEV_STRIDE + lrow) * MAXP,
                                       tl.load(PC + LEV_STRIDE + lrow), NK * (BLOCK // POOL1), stride_pl, qk_scale,
                                       offs_d, BLOCK // POOL2, PT2, IDS_AHEAD, DOT_PREC)
        if NLEV > 2:
            acc, l_i, m_i = _fwd_level(acc, l_i, m_i, q, PKp, PVp, PB, PI + (2 * LEV_STRIDE + lrow) * MAXP,
                                       tl.load(PC + 2 * LEV_STRIDE + lrow), NK * (BLOCK // POOL1 + BLOCK // POOL2),
                                       stride_pl, qk_scale, offs_d, BLOCK // POOL3, PT3, IDS_AHEAD, DOT_PREC)

    if HAS_SUMMARY:
        # summaries padded to a multiple of BLOCK_S (unmasked loads); the per-(query block,
        # summary) bias row already holds -inf for kept blocks' summaries and the padding
        SKp = SK + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        SVp = SV + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        brow = SBIAS + row.to(tl.int64) * NSP
        offs_sb = tl.arange(0, BLOCK_S)
        for s0 in range(0, NSP, BLOCK_S):
            offs_s = s0 + offs_sb
            bias = tl.load(brow + offs_s)
            sk = tl.load(SKp + offs_s[:, None] * stride_sl + offs_d[None, :])
            sv = tl.load(SVp + offs_s[:, None] * stride_sl + offs_d[None, :])
            acc, l_i, m_i = _fwd_biased_tile(acc, l_i, m_i, q, sk, sv, bias, qk_scale, DOT_PREC)

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(nonempty, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    Op = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    rmask = offs_m < L
    tl.store(Op + offs_m[:, None] * stride_ol + offs_d[None, :], acc.to(O.dtype.element_ty), mask=rmask[:, None])
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=rmask)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(O, DO, DELTA,  # noqa: E741
                     stride_ob, stride_oh, stride_ol, stride_db, stride_dh, stride_dl, H, L,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < L
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ol
                + offs_d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dl
                 + offs_d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=rmask)


@triton.jit
def _dq_biased_tile(dq, q, do, pk, pv, bias, lse2, Di, qk_scale, DOT_PREC: tl.constexpr):
    # dq of one tile of pooled tokens (bias in log2 units, as in _fwd_biased_tile)
    qk = tl.dot(q, tl.trans(pk), input_precision=DOT_PREC) * qk_scale + bias[None, :]
    p = tl.math.exp2(qk - lse2[:, None])
    dp = tl.dot(do, tl.trans(pv), input_precision=DOT_PREC)
    ds = p * (dp - Di[:, None])
    return tl.dot(ds.to(pk.dtype), pk, dq, input_precision=DOT_PREC)


@triton.jit
def _dq_level(dq, q, do, lse2, Di, PKp, PVp, PB, idx_ptr, cnt, row0, stride_pl, qk_scale, offs_d,
              ROWS: tl.constexpr, TILE: tl.constexpr, IDS_AHEAD: tl.constexpr, DOT_PREC: tl.constexpr):
    # dq over the key blocks a query block attends at one pooled level (the walk of _fwd_level)
    offs_t = tl.arange(0, TILE)
    ids = tl.load(idx_ptr)
    for t in range(0, cnt * (ROWS // TILE)):
        pk, pv, bias, ids = _level_tile(ids, idx_ptr, t, cnt, row0, offs_t, PKp, PVp, PB, stride_pl, offs_d, ROWS,
                                        TILE, IDS_AHEAD)
        dq = _dq_biased_tile(dq, q, do, pk, pv, bias, lse2, Di, qk_scale, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KVI, KVC, SK, SV, SBIAS, PK, PV, PB, PI, PC,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_sb, stride_sh, stride_sl,
    stride_pb, stride_ph, stride_pl,
    stride_gb, stride_gh, stride_gl,
    H, L, NQ, NK, MAXK, NSP, MAXP, LEV_STRIDE,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_SUMMARY: tl.constexpr, EVEN_L: tl.constexpr, USE_TMA: tl.constexpr, IDS_AHEAD: tl.constexpr,
    NLEV: tl.constexpr, POOL1: tl.constexpr, POOL2: tl.constexpr, POOL3: tl.constexpr,
    PT1: tl.constexpr, PT2: tl.constexpr, PT3: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
):
    SUB: tl.constexpr = BLOCK // BLOCK_N
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    qblk = start_m // BLOCK
    row = bh * NQ + qblk
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    rmask = offs_m < L
    if USE_TMA:
        Kp = K
        Vp = V
    else:
        Kp = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        Vp = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_ql
                + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dl
                 + offs_d[None, :], mask=rmask[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=rmask, other=float("inf")) * 1.4426950408889634
    Di = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    cnt = tl.load(KVC + row)
    idx_ptr = KVI + row.to(tl.int64) * MAXK
    ids = tl.load(idx_ptr)
    for t in range(0, cnt * SUB):
        blk, ids = _ids_step(ids, idx_ptr, t, cnt, SUB, IDS_AHEAD)
        start_n = blk * BLOCK + (t % SUB) * BLOCK_N
        # padded keys load as 0 (and their p is zeroed below)
        k = _load_rows(Kp, b, h, start_n, offs_nb, offs_d, L, stride_kl, not EVEN_L, USE_TMA, BLOCK_N, HEAD_DIM)
        v = _load_rows(Vp, b, h, start_n, offs_nb, offs_d, L, stride_vl, not EVEN_L, USE_TMA, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if not EVEN_L:
            # a padded key (loaded as 0) has logit 0, not -inf: p = exp(-lse) overflows once lse is far
            # below 0 (ds past fp16's range at lse < -11, p past fp32's at lse < -88) and inf * (k = 0)
            # is NaN in dq. Its p must be 0, as in the forward
            p = tl.where((start_n + offs_nb)[None, :] < L, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - Di[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)

    if NLEV > 0:
        PKp = PK + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        PVp = PV + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph
        lrow = row.to(tl.int64)
        dq = _dq_level(dq, q, do, lse2, Di, PKp, PVp, PB, PI + lrow * MAXP, tl.load(PC + lrow), 0, stride_pl,
                       qk_scale, offs_d, BLOCK // POOL1, PT1, IDS_AHEAD, DOT_PREC)
        if NLEV > 1:
            dq = _dq_level(dq, q, do, lse2, Di, PKp, PVp, PB, PI + (LEV_STRIDE + lrow) * MAXP,
                           tl.load(PC + LEV_STRIDE + lrow), NK * (BLOCK // POOL1), stride_pl, qk_scale, offs_d,
                           BLOCK // POOL2, PT2, IDS_AHEAD, DOT_PREC)
        if NLEV > 2:
            dq = _dq_level(dq, q, do, lse2, Di, PKp, PVp, PB, PI + (2 * LEV_STRIDE + lrow) * MAXP,
                           tl.load(PC + 2 * LEV_STRIDE + lrow), NK * (BLOCK // POOL1 + BLOCK // POOL2), stride_pl,
                           qk_scale, offs_d, BLOCK // POOL3, PT3, IDS_AHEAD, DOT_PREC)

    if HAS_SUMMARY:
        SKp = SK + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        SVp = SV + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh
        brow = SBIAS + row.to(tl.int64) * NSP
        offs_sb = tl.arange(0, BLOCK_S)
        for s0 in range(0, NSP, BLOCK_S):
            offs_s = s0 + offs_sb
            bias = tl.load(brow + offs_s)
            sk = tl.load(SKp + offs_s[:, None] * stride_sl + offs_d[None, :])
            sv = tl.load(SVp + offs_s[:, None] * stride_sl + offs_d[None, :])
            dq = _dq_biased_tile(dq, q, do, sk, sv, bias, lse2, Di, qk_scale, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + offs_m[:, None] * stride_gl
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QI, QC, KB,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_gb, stride_gh, stride_gl,
    H, L, LK, NQ, NK, MAXQ,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_L: tl.constexpr, USE_TMA: tl.constexpr,
    IDS_AHEAD: tl.constexpr, KROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # key-major: program = one key tile; walks the query blocks that keep its key block.
    # The exact keys: KROWS = BLOCK, LK = L. A pooled level of SPEC 1.6: K, V are that level's
    # pooled tokens (KROWS = BLOCK // pool per key block, LK = NK * KROWS of them) with their log2
    # bias KB, and QI/QC the query blocks that attend each key block at that level.
    SUB: tl.constexpr = BLOCK // BLOCK_M
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    kblk = start_n // KROWS
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    kmask = offs_n < LK
    if HAS_BIAS:
        kbias = tl.load(KB + offs_n, mask=kmask, other=float("-inf"))
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kl
                + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vl
                + offs_d[None, :], mask=kmask[:, None], other=0.0)
    if USE_TMA:
        Qp = Q
        DOp = DO
    else:
        Qp = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        DOp = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    LSEp = LSE + bh.to(tl.int64) * L
    DELp = DELTA + bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    row = bh * NK + kblk
    cnt = tl.load(QC + row)
    idx_ptr = QI + row.to(tl.int64) * MAXQ
    ids = tl.load(idx_ptr)
    for t in range(0, cnt * SUB):
        qb, ids = _ids_step(ids, idx_ptr, t, cnt, SUB, IDS_AHEAD)
        start_m = qb * BLOCK + (t % SUB) * BLOCK_M
        offs_m = start_m + offs_mb
        q = _load_rows(Qp, b, h, start_m, offs_mb, offs_d, L, stride_ql, not EVEN_L, USE_TMA, BLOCK_M, HEAD_DIM)
        do = _load_rows(DOp, b, h, start_m, offs_mb, offs_d, L, stride_dl, not EVEN_L, USE_TMA, BLOCK_M, HEAD_DIM)
        if EVEN_L:
            lse2 = tl.load(LSEp + offs_m) * 1.4426950408889634
            Di = tl.load(DELp + offs_m)
        else:
            # rows past L: lse = +inf so their p is 0
            rm = offs_m < L
            lse2 = tl.load(LSEp + offs_m, mask=rm, other=float("inf")) * 1.4426950408889634
            Di = tl.load(DELp + offs_m, mask=rm, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        if HAS_BIAS:
            pT = tl.math.exp2(qkT * qk_scale + kbias[:, None] - lse2[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - Di[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)

    dk = dk * sm_scale
    # dk and dv share one (contiguous) layout, given by stride_g*
    goff = b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + offs_n[:, None] * stride_gl + offs_d[None, :]
    tl.store(DK + goff, dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + goff, dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _bwd_dsummary_kernel(
    Q, DO, SK, SV, SBIAS, PDSK, PDSV, LSE, DELTA,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_ql,
    stride_db, stride_dh, stride_dl,
    stride_sb, stride_sh, stride_sl,
    H, L, NQ, NSP, QB_PER_CHUNK,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # key-major over summary tiles, split over query chunks (axis 2) so the grid fills the
    # GPU; each program writes a float32 partial [chunk, bh, NSP, D] that the host sums in a
    # fixed order (deterministic, no atomics). Query blocks that keep a summary's key block
    # see -inf in the bias row (they saw the exact tokens instead).
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    chunk = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    soff = b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + offs_s[:, None] * stride_sl + offs_d[None, :]
    sk = tl.load(SK + soff)
    sv = tl.load(SV + soff)
    Qp = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DOp = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    LSEp = LSE + bh.to(tl.int64) * L
    DELp = DELTA + bh.to(tl.int64) * L
    dsk = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    dsv = tl.zeros([BLOCK_S, HEAD_DIM], tl.float32)
    m_lo = chunk * QB_PER_CHUNK * BLOCK
    m_hi = tl.minimum(m_lo + QB_PER_CHUNK * BLOCK, L)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        qblk = m0 // BLOCK
        b2 = tl.load(SBIAS + (bh * NQ + qblk).to(tl.int64) * NSP + offs_s)
        offs_m = m0 + offs_mb
        rm = offs_m < L
        q = tl.load(Qp + offs_m[:, None] * stride_ql + offs_d[None, :], mask=rm[:, None], other=0.0)
        do = tl.load(DOp + offs_m[:, None] * stride_dl + offs_d[None, :], mask=rm[:, None], other=0.0)
        lse2 = tl.load(LSEp + offs_m, mask=rm, other=float("inf")) * 1.4426950408889634
        Di = tl.load(DELp + offs_m, mask=rm, other=0.0)
        sT = tl.dot(sk, tl.trans(q), input_precision=DOT_PREC) * qk_scale + b2[:, None]
        pT = tl.math.exp2(sT - lse2[None, :])
        dsv = tl.dot(pT.to(do.dtype), do, dsv, input_precision=DOT_PREC)
        dpT = tl.dot(sv, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - Di[None, :])
        dsk = tl.dot(dsT.to(q.dtype), q, dsk, input_precision=DOT_PREC)
    dsk = dsk * sm_scale
    poff = ((chunk * tl.num_programs(1) + bh).to(tl.int64) * NSP + offs_s[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(PDSK + poff, dsk)
    tl.store(PDSV + poff, dsv)


# ----------------------------------------------------------------------------------------
# tile configurations
# ----------------------------------------------------------------------------------------


def _desc_pre_hook(nargs):
    # TMA descriptors carry their box shape: set it from the config being launched
    if TensorDescriptor is None:
        return
    for name, rows in (("K", "BLOCK_N"), ("V", "BLOCK_N"), ("Q", "BLOCK_M"), ("DO", "BLOCK_M")):
        d = nargs.get(name)
        if isinstance(d, TensorDescriptor):
            d.block_shape = [1, 1, nargs[rows], nargs["HEAD_DIM"]]


def _cfg(bm, bn, w, s, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra}, num_warps=w, num_stages=s, pre_hook=_desc_pre_hook)


def _prune(configs, named_args, **kwargs):
    # tiles within one block: query tiles within BLOCK, key tiles within KROWS (the dk/dv pass over a
    # pooled level has BLOCK // pool key rows per block; BLOCK everywhere else)
    args = {**named_args, **kwargs}
    blk = args["BLOCK"]
    rows = args.get("KROWS", blk)
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= blk and c.kwargs["BLOCK_N"] <= rows]
    return keep or [
        triton.Config({**configs[0].kwargs, "BLOCK_M": min(blk, 64), "BLOCK_N": min(rows, 64)},
                      num_warps=4, num_stages=2, pre_hook=_desc_pre_hook)
    ]


# Forward: 128-row query tiles with 8 warps (two warpgroups of wgmma on Hopper), key tiles
# 64/128, 2-4 pipeline stages. D=64 tiles are cheap in smem so deeper pipelines fit.
# The summary tile (BLOCK_S) follows the key tile: the summary loop is the same code shape
# as the main loop (unmasked loads, one bias row), so it runs at the main loop's rate.
_FWD_CONFIGS = [
    _cfg(128, 64, 8, 3, BLOCK_S=64),
    _cfg(128, 128, 8, 3, BLOCK_S=128),
    _cfg(128, 64, 4, 3, BLOCK_S=64),
    _cfg(128, 128, 8, 2, BLOCK_S=128),
    _cfg(128, 64, 8, 4, BLOCK_S=64),
    _cfg(128, 64, 8, 2, BLOCK_S=64),
    _cfg(128, 128, 4, 2, BLOCK_S=128),
    _cfg(64, 64, 4, 4, BLOCK_S=64),
]
_DQ_CONFIGS = [
    _cfg(128, 64, 8, 3, BLOCK_S=64),
    _cfg(128, 32, 4, 3, BLOCK_S=32),
    _cfg(64, 64, 4, 3, BLOCK_S=64),
    _cfg(128, 128, 8, 2, BLOCK_S=128),
    _cfg(128, 64, 8, 2, BLOCK_S=64),
]
_DKV_CONFIGS = [
    _cfg(64, 128, 8, 3),
    _cfg(32, 128, 4, 3),
    _cfg(64, 64, 4, 3),
    _cfg(64, 128, 4, 2),
    _cfg(64, 128, 8, 2),
    _cfg(32, 128, 8, 4),
]
# summary dk/dv: same shape of work as dk/dv (a 128-row key-side tile walking 64-row query tiles)
_DSUM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_S": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_S": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_S": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_S": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_S": 64}, num_warps=8, num_stages=2),
]


def _prune_s(configs, named_args, **kwargs):
    # a query tile never spans two query blocks (it reads one bias row, and chunks end on block
    # boundaries); blocks smaller than every listed tile get a tile of the block's own size
    blk = {**named_args, **kwargs}["BLOCK"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= blk]
    return keep or [triton.Config({"BLOCK_M": blk, "BLOCK_S": 64}, num_warps=4, num_stages=2)]


_KEY = ["HEAD_DIM", "BLOCK", "HAS_SUMMARY", "EVEN_L", "USE_TMA", "DOT_PREC", "NLEV", "POOL1", "POOL2", "POOL3"]


class _Kernel:
    """A kernel with its tile configs: autotuned, or (VIDEOBLADE_KERNEL_AUTOTUNE=0) the first
    config that fits the block size. (Triton's autotuner skips pruning when it has a single
    config, so the no-tuning path picks the config itself.)"""

    def __init__(self, kernel, configs, key, prune):
        self.kernel, self.configs, self.prune = kernel, configs, prune
        self.tuned = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    def launch(self, grid, args, const, named):
        if _autotune():
            self.tuned[grid](*args, **const)
            return
        # the first config that fits the block and compiles within the GPU's resources: shared memory
        # depends on the dtype and head dim (fp32 at D=128 overflows most of the configs, which are
        # sized for 16-bit inputs); the autotuner skips such configs by itself
        cfgs = self.prune(self.configs, {}, **const)
        for i, cfg in enumerate(cfgs):
            if cfg.pre_hook is not None:
                cfg.pre_hook({**named, **const, **cfg.kwargs})
            try:
                self.kernel[grid(cfg.kwargs)](*args, **const, **cfg.kwargs, num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
                return
            except OutOfResources:
                if i == len(cfgs) - 1:
                    raise


_fwd_k = _Kernel(_fwd_kernel, _FWD_CONFIGS, _KEY, _prune)
_dq_k = _Kernel(_bwd_dq_kernel, _DQ_CONFIGS, _KEY, _prune)
_dkv_k = _Kernel(_bwd_dkv_kernel, _DKV_CONFIGS, ["HEAD_DIM", "BLOCK", "EVEN_L", "USE_TMA", "DOT_PREC", "KROWS",
                                                 "HAS_BIAS"], _prune)
_dsum_k = _Kernel(_bwd_dsummary_kernel, _DSUM_CONFIGS, ["HEAD_DIM", "BLOCK", "DOT_PREC"], _prune_s)


def tuned_configs() -> dict:
    """The tile configs the autotuner picked so far, per kernel and key (for benchmark reports)."""
    out = {}
    for name, t in (("fwd", _fwd_k), ("dq", _dq_k), ("dkv", _dkv_k), ("dsummary", _dsum_k)):
        out[name] = {str(k): str(c) for k, c in getattr(t.tuned, "cache", {}).items()}
    return out


def _interp_meta(block_size: int) -> dict:
    # small tiles under the interpreter; with block 32 this exercises 2 sub-tiles per block
    t = min(block_size, 16)
    return {"BLOCK_M": t, "BLOCK_N": t, "BLOCK_S": 16}


# ----------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels' float32 accumulators take


def _check(q, k, v, kv_indices, kv_counts, block_size, summary=None, levels=None):
    """Everything the launch relies on but cannot see, checked on the host before any launch (no
    sync: shapes, dtypes, devices; list values only with ``VIDEOBLADE_KERNEL_CHECK=1``)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported {HEAD_DIMS}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, L, _ = q.shape
    nq = num_blocks(L, block_size)
    if kv_indices.dim() != 4 or tuple(kv_counts.shape) != (B, H, nq) or tuple(kv_indices.shape[:3]) != (B, H, nq):
        raise ValueError(
            f"block lists must be [B,H,NQ,MAXK] and [B,H,NQ] with [B,H,NQ] = [{B},{H},{nq}] (NQ = ceil(L / block_size)"
            f" for L={L}); got {tuple(kv_indices.shape)}, {tuple(kv_counts.shape)}"
        )
    others = [("k", k), ("v", v), ("kv_indices", kv_indices), ("kv_counts", kv_counts)]
    if summary is not None:
        check_summary(summary, q.shape, block_size)
        others += [("summary.k", summary.k), ("summary.v", summary.v)]
    if levels is not None:
        check_levels(levels.pools, block_size)
        check_levels_geometry(levels, q.shape, block_size)
        others += [("levels.indices", levels.indices), ("levels.counts", levels.counts)]
        others += [(f"levels.summaries[{i}].k", s.k) for i, s in enumerate(levels.summaries)]
        others += [(f"levels.summaries[{i}].v", s.v) for i, s in enumerate(levels.summaries)]
    # inside one (batch, head) the kernels index rows in int32 (batch and head offsets are int64); the
    # outputs are [B, L, H, D] memory (row stride H * D)
    row_stride = max(H * D, *(t.stride(2) for t in (q, k, v)))
    if (L - 1) * row_stride + D > 2**31:
        raise ValueError(f"{L} tokens at a row stride of {row_stride} elements reach past 2**31 inside one (batch, "
                         "head), beyond the kernels' int32 row offsets: call the kernel on fewer heads at a time "
                         "(each slice contiguous) or on a shorter sequence")
    for name, t in others:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: every input must be on q's device")
    if os.environ.get("VIDEOBLADE_KERNEL_CHECK", "0") == "1":
        check_block_lists(kv_indices, kv_counts, nq, "kv_indices / kv_counts")
        if levels is not None:
            for lev in range(len(levels.summaries)):
                check_block_lists(levels.indices[lev], levels.counts[lev], nq, f"level {lev} lists")


def _check_kernel_dtypes(q, summary=None, levels=None):
    # the Triton path only (the CPU fallback is the float32 reference, which takes any float dtype):
    # tl.dot takes operands of one dtype, accumulated in float32
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels take q, k, v in {[str(d) for d in KERNEL_DTYPES]}, got {q.dtype}; "
                         "block_sparse_attention_ref computes in float32 from any float dtype")
    parts = [("summary", summary)] if summary is not None else []
    parts += [(f"levels.summaries[{i}]", s) for i, s in enumerate(levels.summaries)] if levels is not None else []
    for name, s in parts:
        if s.k.dtype != q.dtype or s.v.dtype != q.dtype:
            raise ValueError(f"{name} k/v dtype ({s.k.dtype}, {s.v.dtype}) must be q's dtype {q.dtype}: pool this "
                             "call's k and v (the kernels' tl.dot takes operands of one dtype)")


# summaries are padded to a multiple of the largest summary tile, so the kernels' summary
# loops load whole tiles without masks
_S_PAD = 128


@triton.jit
def _summary_table_kernel(KVI, KVC, SB, TAB, MAXK, NS, NSP,
                          SPB: tl.constexpr, SPB_P: tl.constexpr, CHUNK: tl.constexpr, IDS: tl.constexpr,
                          INIT: tl.constexpr):
    # one program per (batch, head, query block) row of the table: first (INIT) every entry gets
    # its summary's log2 count (-inf on the padding), then the summaries of the row's kept key
    # blocks are overwritten with -inf. The barrier orders the two phases' stores to the same
    # addresses across the program's threads. Without INIT only the second phase runs (the
    # blocks of a multi-level list, after the exact list's launch).
    row = tl.program_id(0).to(tl.int64)
    trow = TAB + row * NSP
    if INIT:
        for s0 in range(0, NSP, CHUNK):
            offs = s0 + tl.arange(0, CHUNK)
            b = tl.load(SB + offs, mask=offs < NS, other=float("-inf"))
            tl.store(trow + offs, b * 1.4426950408889634, mask=offs < NSP)
        tl.debug_barrier()
    cnt = tl.load(KVC + row)
    offs_j = tl.arange(0, SPB_P)
    ninf = tl.full([IDS, SPB_P], float("-inf"), tl.float32)
    for i0 in range(0, cnt, IDS):
        offs_i = i0 + tl.arange(0, IDS)
        ok = offs_i < cnt
        ids = tl.load(KVI + row * MAXK + offs_i, mask=ok, other=0)
        tl.store(trow + ids[:, None] * SPB + offs_j[None, :], ninf, mask=ok[:, None] & (offs_j[None, :] < SPB))


def _summary_operands(sk, sv, sbias, kvi, kvc, spb, levels=None):
    """(sk, sv) padded to NSP = ceil(NS / 128) * 128 rows and the float32 bias table
    [B, H, NQ, NSP] in log2 units: log(count) * log2(e), -inf where the query block keeps
    the summary's key block (it sees the exact tokens) and on the padding. The table comes
    from the block lists (int32 ``kvi`` [B, H, NQ, MAXK], ``kvc`` [B, H, NQ]) in one launch
    (``_summary_table_kernel``; no per-element masking left in the attention kernels), plus one
    launch per pooled level of ``levels`` (``_LevelOps``): a block attended at a level is not
    summarised either."""
    B, H, ns, D = sk.shape
    nsp = -(-ns // _S_PAD) * _S_PAD
    sk, sv = sk.contiguous(), sv.contiguous()
    if nsp != ns:
        sk = torch.nn.functional.pad(sk, (0, 0, 0, nsp - ns))
        sv = torch.nn.functional.pad(sv, (0, 0, 0, nsp - ns))
    sb = sbias.to(device=sk.device, dtype=torch.float32).contiguous()
    table = torch.empty((*kvc.shape, nsp), dtype=torch.float32, device=sk.device)
    lists = [(kvi, kvc)] + ([] if levels is None else list(zip(levels.idx, levels.cnt)))
    for n, (ids, cnt) in enumerate(lists):
        _summary_table_kernel[(kvc.numel(),)](ids, cnt, sb, table, ids.shape[-1], ns, nsp, SPB=spb,
                                              SPB_P=max(2, triton.next_power_of_2(spb)), CHUNK=_S_PAD,
                                              IDS=16, INIT=n == 0, num_warps=4)
    return sk, sv, table, nsp


_ID_MODES = ("prefetch", "load")  # VIDEOBLADE_KERNEL_IDS (module docstring, _ids_step)


def _ids_ahead() -> bool:
    """The IDS_AHEAD constexpr: True unless VIDEOBLADE_KERNEL_IDS=load."""
    mode = os.environ.get("VIDEOBLADE_KERNEL_IDS", "prefetch")
    if mode not in _ID_MODES:
        raise ValueError(f"VIDEOBLADE_KERNEL_IDS must be one of {_ID_MODES}, got {mode!r}")
    return mode == "prefetch"


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer of x's shape [B, H, L, D] and dtype, always laid out as [B, L, H, D] memory.

    Both processors turn the attention output back into [B, L, H * D] for the output projection,
    which is then a view: a contiguous [B, H, L, D] output cost a full transpose copy per call (Wan
    forward on an H100: 30 ``clone_transpose`` kernels, 2 ms of 253). The layout is fixed, not taken
    from x, because inductor may hand a custom op inputs with strides other than the traced ones,
    while the fake (meta) impls, which allocate through here too, must predict the real strides."""
    B, H, L, D = x.shape
    return torch.empty((B, L, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if _interpret() or device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


MAX_LEVELS = MAX_POOLED_LEVELS  # pooled levels the kernels walk (SPEC 1.6: 2x, 4x, 8x)
_LEVEL_TILE = 64  # pooled rows per tile of a level's walk (fewer when a block has fewer)


class _LevelOps(NamedTuple):
    """The multi-level operands (SPEC 1.6) as the kernels take them."""

    pk: torch.Tensor  # [B, H, NP, D] contiguous: every level's pooled keys, level after level
    pv: torch.Tensor  # the same for the values
    pb: torch.Tensor  # float32 [NP]: log2 of the tokens each pooled token averages (-inf: none)
    idx: torch.Tensor  # int32 [NLEV, B, H, NQ, MAXP] contiguous
    cnt: torch.Tensor  # int32 [NLEV, B, H, NQ] contiguous
    pools: tuple  # the levels' pooling factors, ascending

    def rows(self, block_size: int) -> list[int]:
        return [block_size // p for p in self.pools]

    def offsets(self, block_size: int, nk: int) -> list[int]:
        """First row of each level in pk / pv / pb."""
        out, o = [], 0
        for r in self.rows(block_size):
            out.append(o)
            o += nk * r
        return out


def _level_ops(pk, pv, pbias, pidx, pcnt, pools) -> _LevelOps | None:
    if pk is None:
        return None
    return _LevelOps(pk.contiguous(), pv.contiguous(), (pbias.float() * LOG2E).contiguous(),
                     pidx.to(torch.int32).contiguous(), pcnt.to(torch.int32).contiguous(), tuple(int(p) for p in pools))


def _level_const(lv: _LevelOps | None, block_size: int) -> dict:
    """The kernels' multi-level constexprs: NLEV, POOLi (1 = unused) and PTi, the rows per tile."""
    pools = list(lv.pools) if lv is not None else []
    const = {"NLEV": len(pools)}
    for i in range(MAX_LEVELS):
        p = pools[i] if i < len(pools) else 1
        const[f"POOL{i + 1}"] = p
        const[f"PT{i + 1}"] = min(block_size // p, _LEVEL_TILE) if i < len(pools) else 16
    return const


def _level_args(lv: _LevelOps | None, placeholder: torch.Tensor) -> tuple:
    """(PK, PV, PB, PI, PC), (stride_pb, stride_ph, stride_pl), (MAXP, LEV_STRIDE) for a launch."""
    if lv is None:
        return (placeholder,) * 5, (0, 0, 0), (1, 0)
    return ((lv.pk, lv.pv, lv.pb, lv.idx, lv.cnt), (lv.pk.stride(0), lv.pk.stride(1), lv.pk.stride(2)),
            (lv.idx.shape[-1], lv.cnt[0].numel()))


def levels_fit_kernels(pools, block_size: int) -> bool:
    """Whether the kernels walk these pooled levels: the config's rule (``level_pools_error``: at most
    MAX_LEVELS ascending powers of two dividing the block) and at least 16 pooled rows per block
    (the smallest tile ``tl.dot`` takes)."""
    return level_pools_error(block_size, pools) is None and all(block_size // int(p) >= 16 for p in pools)


def check_levels(pools, block_size: int) -> None:
    """Raise ValueError, saying why, unless :func:`levels_fit_kernels`."""
    err = level_pools_error(block_size, pools)
    if err:
        raise ValueError(err)
    for p in pools:
        if block_size // int(p) < 16:
            raise ValueError(f"pool {p}: the kernels need block_size / pool >= 16 pooled rows per block "
                             f"(block_size {block_size}); use a larger block or a smaller pool")


def block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, block_size, sm_scale, sk=None, sv=None, sbias=None,
                               out=None, lse=None, levels=None):
    """Launch the forward. Returns (out [B,H,L,D] in q.dtype, lse float32 [B,H,L]).

    ``out``/``lse`` may be given (unit stride on D) to write into; tests pass poisoned buffers.
    ``levels``: the multi-level operands ``(pk, pv, pbias, indices, counts, pools)`` (the pooled
    levels' summaries concatenated along L, their natural-log biases concatenated; see
    :func:`block_sparse_attention`), or None.
    """
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    B, H, L, D = q.shape
    nq = nk = num_blocks(L, block_size)
    kvi = kv_indices.to(torch.int32).contiguous()
    kvc = kv_counts.to(torch.int32).contiguous()
    lv = _level_ops(*levels) if levels is not None else None
    if out is None:
        out = _out_like(q)
    if lse is None:
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    has_s = sk is not None
    if has_s:
        sk, sv, stab, nsp = _summary_operands(sk, sv, sbias, kvi, kvc, sk.shape[2] // nk, lv)
    else:
        sk = sv = stab = kvc  # unused placeholders
        nsp = 0
    sstr = (sk.stride(0), sk.stride(1), sk.stride(2)) if has_s else (0, 0, 0)
    lptr, lstr, lsize = _level_args(lv, kvc)
    tma = _use_tma(k, v)
    meta = _interp_meta(block_size) if _interpret() else None
    kx, vx = (_desc(k, meta["BLOCK_N"] if meta else 64), _desc(v, meta["BLOCK_N"] if meta else 64)) if tma else (k, v)
    args = (
        q, kx, vx, out, lse, kvi, kvc, sk, sv, stab, *lptr,
        float(sm_scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *sstr, *lstr,
        H, L, nq, nk, kvi.shape[-1], nsp, *lsize,
    )
    const = {"BLOCK": block_size, "HEAD_DIM": D, "HAS_SUMMARY": has_s, "EVEN_L": L % block_size == 0, "USE_TMA": tma,
             "IDS_AHEAD": _ids_ahead(), "DOT_PREC": dot_precision(q.dtype), **_level_const(lv, block_size)}
    if meta is not None:
        _fwd_kernel[(triton.cdiv(L, meta["BLOCK_M"]), B * H)](*args, **const, **meta)
    else:
        grid = lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H)
        _fwd_k.launch(grid, args, const, {"K": kx, "V": vx})
    return out, lse


def block_sparse_attention_bwd(do, q, k, v, out, lse, kv_indices, kv_counts, block_size, sm_scale,
                               sk=None, sv=None, sbias=None, dq=None, dk=None, dv=None, dsk=None, dsv=None,
                               levels=None):
    """Launch the backward. Returns (dq, dk, dv, dsk, dsv, dpk, dpv); dsk/dsv are None without
    summaries, dpk/dpv (the gradients of the levels' concatenated pooled keys/values) None without
    ``levels`` (as in :func:`block_sparse_attention_fwd`).

    The gradient buffers may be given (unit stride on D; dk and dv alike) to write into; tests pass poisoned ones.
    """
    q, k, v, out, do = (_last_unit(t) for t in (q, k, v, out, do))
    B, H, L, D = q.shape
    nq = nk = num_blocks(L, block_size)
    kvi = kv_indices.to(torch.int32).contiguous()
    kvc = kv_counts.to(torch.int32).contiguous()
    lv = _level_ops(*levels) if levels is not None else None
    lse = lse.contiguous()
    dq = _out_like(q) if dq is None else dq
    dk = _out_like(k) if dk is None else dk
    dv = _out_like(v) if dv is None else dv
    if dk.stride() != dv.stride() or dq.stride(-1) != 1 or dk.stride(-1) != 1:
        raise ValueError("dq/dk/dv buffers need unit stride on D, and dk and dv the same strides")
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    pre_m = 64 if not _interpret() else 16
    _bwd_preprocess[(triton.cdiv(L, pre_m), B * H)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, L, HEAD_DIM=D, BLOCK_M=pre_m,
    )
    qi, qc, _ = transpose_block_lists(kvi, kvc, nk)
    has_s = sk is not None
    if has_s:
        ns = sk.shape[2]
        skp, svp, stab, nsp = _summary_operands(sk, sv, sbias, kvi, kvc, ns // nk, lv)
        sstr = (skp.stride(0), skp.stride(1), skp.stride(2))
    else:
        skp = svp = stab = kvc  # unused placeholders
        nsp, sstr = 0, (0, 0, 0)
    lptr, lstr, lsize = _level_args(lv, kvc)
    even = L % block_size == 0
    qk_scale = float(sm_scale) * LOG2E
    tma = _use_tma(q, k, v, do)
    meta = _interp_meta(block_size) if _interpret() else None
    if tma:
        kx, vx = _desc(k, meta["BLOCK_N"] if meta else 64), _desc(v, meta["BLOCK_N"] if meta else 64)
        qx, dox = _desc(q, meta["BLOCK_M"] if meta else 64), _desc(do, meta["BLOCK_M"] if meta else 64)
    else:
        kx, vx, qx, dox = k, v, q, do
    dq_args = (
        q, kx, vx, do, dq, lse, delta, kvi, kvc,
        skp, svp, stab, *lptr,
        qk_scale, float(sm_scale),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        *sstr, *lstr,
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, L, nq, nk, kvi.shape[-1], nsp, *lsize,
    )
    ahead, prec = _ids_ahead(), dot_precision(q.dtype)
    dq_const = {"BLOCK": block_size, "HEAD_DIM": D, "HAS_SUMMARY": has_s, "EVEN_L": even, "USE_TMA": tma,
                "IDS_AHEAD": ahead, "DOT_PREC": prec, **_level_const(lv, block_size)}
    if meta is not None:
        _bwd_dq_kernel[(triton.cdiv(L, meta["BLOCK_M"]), B * H)](*dq_args, **dq_const, **meta)
    else:
        _dq_k.launch(lambda M: (triton.cdiv(L, M["BLOCK_M"]), B * H), dq_args, dq_const, {"K": kx, "V": vx})

    def dkv(kk, vv, gk, gv, q_lists, kbias, lk, krows):
        # one key-major pass: the exact keys (kbias None), or one pooled level's tokens (kbias:
        # their log2 counts)
        qi_, qc_ = q_lists
        args = (
            qx, kk, vv, dox, gk, gv, lse, delta, qi_, qc_, kvc if kbias is None else kbias,
            qk_scale, float(sm_scale),
            q.stride(0), q.stride(1), q.stride(2),
            kk.stride(0), kk.stride(1), kk.stride(2),
            vv.stride(0), vv.stride(1), vv.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            gk.stride(0), gk.stride(1), gk.stride(2),
            H, L, lk, nq, nk, qi_.shape[-1],
        )
        const = {"BLOCK": block_size, "HEAD_DIM": D, "EVEN_L": even, "USE_TMA": tma, "IDS_AHEAD": ahead,
                 "DOT_PREC": prec, "KROWS": krows, "HAS_BIAS": kbias is not None}
        if meta is not None:
            _bwd_dkv_kernel[(triton.cdiv(lk, min(meta["BLOCK_N"], krows)), B * H)](
                *args, **const, BLOCK_M=meta["BLOCK_M"], BLOCK_N=min(meta["BLOCK_N"], krows))
        else:
            _dkv_k.launch(lambda M: (triton.cdiv(lk, M["BLOCK_N"]), B * H), args, const, {"Q": qx, "DO": dox})

    dkv(k, v, dk, dv, (qi, qc), None, L, block_size)
    dpk = dpv = None
    if lv is not None:
        dpk, dpv = torch.empty_like(lv.pk), torch.empty_like(lv.pv)
        for i, (off, r) in enumerate(zip(lv.offsets(block_size, nk), lv.rows(block_size))):
            sl = slice(off, off + nk * r)
            dkv(lv.pk[:, :, sl], lv.pv[:, :, sl], dpk[:, :, sl], dpv[:, :, sl],
                transpose_block_lists(lv.idx[i], lv.cnt[i], nk)[:2], lv.pb[sl], nk * r, r)
    if not has_s:
        return dq, dk, dv, None, None, dpk, dpv
    dsk = torch.empty_like(sk) if dsk is None else dsk
    dsv = torch.empty_like(sv) if dsv is None else dsv
    # split the query axis into chunks so that (summary tiles x B*H x chunks) gives ~4 waves
    bhn = B * H
    n_chunks = max(1, min(nq, -(-4 * _sm_count(q.device) // ((nsp // _S_PAD) * bhn))))
    qpc = -(-nq // n_chunks)
    n_chunks = -(-nq // qpc)
    part = torch.empty((2, n_chunks, bhn, nsp, D), dtype=torch.float32, device=q.device)
    s_args = (
        q, do, skp, svp, stab, part[0], part[1], lse, delta,
        qk_scale, float(sm_scale),
        q.stride(0), q.stride(1), q.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        *sstr,
        H, L, nq, nsp, qpc,
    )
    s_const = {"BLOCK": block_size, "HEAD_DIM": D, "DOT_PREC": prec}
    if _interpret():
        meta = _interp_meta(block_size)
        _bwd_dsummary_kernel[(nsp // meta["BLOCK_S"], bhn, n_chunks)](
            *s_args, **s_const, BLOCK_M=meta["BLOCK_M"], BLOCK_S=meta["BLOCK_S"])
    else:
        _dsum_k.launch(lambda M: (nsp // M["BLOCK_S"], bhn, n_chunks), s_args, s_const, {})
    # fixed-order sum over the chunks (deterministic)
    red = part.sum(1) if n_chunks > 1 else part[:, 0]
    red = red.view(2, B, H, nsp, D)[:, :, :, :ns]
    dsk.copy_(red[0])
    dsv.copy_(red[1])
    return dq, dk, dv, dsk, dsv, dpk, dpv


# ----------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("videoblade::block_sparse_attn_fwd", mutates_args=())
def _bsa_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
    block_size: int, sm_scale: float,
    sk: torch.Tensor | None, sv: torch.Tensor | None, sbias: torch.Tensor | None,
    pk: torch.Tensor | None, pv: torch.Tensor | None, pbias: torch.Tensor | None,
    p_indices: torch.Tensor | None, p_counts: torch.Tensor | None, pools: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    lv = (pk, pv, pbias, p_indices, p_counts, pools) if pk is not None else None
    return block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, block_size, sm_scale, sk, sv, sbias, levels=lv)


@_bsa_fwd_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_size, sm_scale, sk, sv, sbias, pk, pv, pbias, p_indices, p_counts, pools):
    B, H, L, _ = q.shape
    return _out_like(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("videoblade::block_sparse_attn_bwd", mutates_args=())
def _bsa_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, block_size: int, sm_scale: float,
    sk: torch.Tensor | None, sv: torch.Tensor | None, sbias: torch.Tensor | None,
    pk: torch.Tensor | None, pv: torch.Tensor | None, pbias: torch.Tensor | None,
    p_indices: torch.Tensor | None, p_counts: torch.Tensor | None, pools: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    lv = (pk, pv, pbias, p_indices, p_counts, pools) if pk is not None else None
    grads = block_sparse_attention_bwd(do, q, k, v, out, lse, kv_indices, kv_counts, block_size, sm_scale,
                                       sk, sv, sbias, levels=lv)
    # custom ops cannot return None: empty placeholders
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


@_bsa_bwd_op.register_fake
def _(do, q, k, v, out, lse, kv_indices, kv_counts, block_size, sm_scale, sk, sv, sbias, pk, pv, pbias, p_indices,
      p_counts, pools):
    def like(t, contiguous=False):  # the summaries' gradients keep their layout (empty_like); the
        # levels' are computed on contiguous copies (_level_ops), so they come out contiguous
        if t is None:
            return q.new_empty(0)
        return t.new_empty(t.shape) if contiguous else torch.empty_like(t)

    return _out_like(q), _out_like(k), _out_like(v), like(sk), like(sv), like(pk, True), like(pv, True)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, block_size, sm_scale, sk, sv, sbias, pk, pv, pbias, p_indices, p_counts, pools = inputs
    out, lse = output
    ctx.block_size = block_size
    ctx.sm_scale = sm_scale
    ctx.pools = list(pools)
    ctx.has_summary = sk is not None
    ctx.has_levels = pk is not None
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts, sk, sv, sbias, pk, pv, pbias, p_indices, p_counts)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_indices, kv_counts, sk, sv, sbias, pk, pv, pbias, p_indices, p_counts = ctx.saved_tensors
    dq, dk, dv, dsk, dsv, dpk, dpv = _bsa_bwd_op(
        dout, q, k, v, out, lse, kv_indices, kv_counts, ctx.block_size, ctx.sm_scale, sk, sv, sbias,
        pk, pv, pbias, p_indices, p_counts, ctx.pools,
    )
    if not ctx.has_summary:
        dsk = dsv = None
    if not ctx.has_levels:
        dpk = dpv = None
    return dq, dk, dv, None, None, None, None, dsk, dsv, None, dpk, dpv, None, None, None, None


torch.library.register_autograd("videoblade::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_size: int = 128,
    sm_scale: float | None = None,
    summary: Summary | None = None,
    levels: PooledLevels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention (Triton), optionally with in-kernel compensation.

    q, k, v: [B, H, L, D] (any strides with unit stride on D), fp16/bf16 on GPU (fp16/fp32
    under ``TRITON_INTERPRET=1``). kv_indices int32 [B, H, NQ, MAXK] ascending kept key
    blocks per query block, kv_counts int32 [B, H, NQ] (NQ = ceil(L / block_size)).
    summary: :func:`videoblade.kernels.pool_summaries` output, or None (exact masked
    attention). levels: :func:`videoblade.kernels.pool_levels` output (SPEC 1.6: key blocks
    attended through their pooled tokens, in the same softmax; at most ``MAX_LEVELS`` levels with
    ``block_size / pool >= 16``), or None; with both, the summaries stand only for the blocks a
    query block attends at no level. Returns (out [B, H, L, D] in q.dtype, lse float32 [B, H, L]); lse is not
    differentiable. out (and q, k, v's gradients) are [B, H, L, D] views of [B, L, H, D] memory,
    so ``out.transpose(1, 2).flatten(2)`` is free; call ``.contiguous()`` for a contiguous
    [B, H, L, D] tensor. Rows with nothing to attend to (count 0, no summary) give out 0, lse -inf
    and zero gradients, as the reference. On CPU without ``TRITON_INTERPRET=1`` it runs
    :func:`block_sparse_attention_ref` instead.

    Checked before any launch (ValueError naming the fix): shapes of q, k, v, the lists, the
    summaries and levels (made for this call's k, v and block size), devices, dtypes. The list
    *values* (ids strictly ascending in [0, NK), counts in [0, MAXK]) are the caller's contract and
    are not checked (a check syncs with the host); ``VIDEOBLADE_KERNEL_CHECK=1`` checks them
    (:func:`videoblade.kernels.check_block_lists`). Lists from ``mask_to_block_lists`` and the
    selection kernel always hold; ``torch.topk`` indices must be sorted first.
    """
    _check(q, k, v, kv_indices, kv_counts, block_size, summary, levels)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not q.is_cuda and not _interpret():
        # no GPU and no Triton interpreter: the float32 torch reference (same semantics)
        from .reference import block_sparse_attention_ref

        return block_sparse_attention_ref(q, k, v, kv_indices, kv_counts, block_size, scale, summary, levels=levels)
    _check_kernel_dtypes(q, summary, levels)
    s_args = (summary.k, summary.v, summary.bias) if summary is not None else (None, None, None)
    if levels is None:
        l_args = (None, None, None, None, None, [])
    else:
        l_args = (torch.cat([s.k for s in levels.summaries], 2), torch.cat([s.v for s in levels.summaries], 2),
                  torch.cat([s.bias for s in levels.summaries]), levels.indices, levels.counts, list(levels.pools))
    return _bsa_fwd_op(q, k, v, kv_indices, kv_counts, block_size, scale, *s_args, *l_args)

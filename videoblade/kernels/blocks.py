"""Block lists, the transposed index, and compensation summaries (no host sync).

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

Block lists and the transposed index are torch. The summaries' forward is one Triton kernel
on CUDA (``_pool_kernel``: k and v read once, both means written in the same launch) and torch
elsewhere (``_pool_fwd``, the reference the tests compare it with); the backward is torch on
every device.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Summary(NamedTuple):
    """Compensation tokens, as made by :func:`pool_summaries`.

    k, v: [B, H, NK * (block_size // pool), D] (dtype of the input keys), bias: float32
    [NK * (block_size // pool)], pool: tokens per summary.
    """

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor
    pool: int


class PooledLevels(NamedTuple):
    """Key blocks attended at reduced resolution (SPEC 1.6, the multi-level variant), as made by
    :func:`pool_levels`.

    summaries: one :class:`Summary` per pooled level, pools ascending (a block at level ``pool``
    is seen as its ``block_size // pool`` pooled tokens, each with logit bias log(count), like the
    compensation summaries); indices: int32 [NLEV, B, H, NQ, MAXK], per level the key blocks each
    query block attends at that level (ascending, the first ``counts`` valid); counts: int32
    [NLEV, B, H, NQ]. A key block sits at most at one level of a row, and never also in the row's
    exact list (``kv_indices``).
    """

    summaries: tuple
    indices: torch.Tensor
    counts: torch.Tensor

    @property
    def pools(self) -> tuple[int, ...]:
        return tuple(s.pool for s in self.summaries)


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


def check_block_lists(kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_key_blocks: int,
                      what: str = "block lists") -> None:
    """Raise ValueError, saying what is wrong, unless the lists' *values* are what the kernels read:
    every count in [0, MAXK], and every row's first ``count`` ids strictly ascending (no duplicate)
    in [0, num_key_blocks). One host sync: a debugging aid (``VIDEOBLADE_KERNEL_CHECK=1`` makes
    :func:`videoblade.kernels.block_sparse_attention` call it), not for the hot path.

    Lists from :func:`mask_to_block_lists` and the selection kernel always pass. Hand-made ones
    may not, e.g. ``torch.topk(P, k).indices`` (ordered by mass, not id: sort them). The kernels walk
    the lists as given: ids out of range read out of bounds, a duplicate counts its block twice in
    the forward and dq but once in dk/dv, and with a partial last block an unsorted list reads that
    block's padding rows unmasked (the forward peels it off the end of the list only).
    """
    maxk = kv_indices.shape[-1]
    counts = kv_counts.long()
    bad_count = (counts < 0) | (counts > maxk)
    if bool(bad_count.any()):
        where = tuple(torch.nonzero(bad_count)[0].tolist())
        raise ValueError(f"{what}: counts must be in [0, MAXK={maxk}]; row {where} has {int(counts[where])}")
    if maxk == 0:
        return
    ids = kv_indices.long()
    valid = torch.arange(maxk, device=ids.device) < counts.unsqueeze(-1)
    out_of_range = valid & ((ids < 0) | (ids >= num_key_blocks))
    if bool(out_of_range.any()):
        where = tuple(torch.nonzero(out_of_range)[0].tolist())
        raise ValueError(f"{what}: block ids must be in range [0, {num_key_blocks}); entry {where} is {int(ids[where])}")
    not_up = valid[..., 1:] & (ids[..., 1:] <= ids[..., :-1])
    if bool(not_up.any()):
        where = tuple(torch.nonzero(not_up)[0].tolist()[:-1])
        raise ValueError(f"{what}: each row's kept ids must be strictly ascending (sorted, no duplicate); row "
                         f"{where} is {ids[where][: int(counts[where])].tolist()} (sort it, e.g. "
                         f"kv_indices.sort(-1) after filling the unused slots with a large id)")


def check_summary(summary: Summary, shape, block_size: int, what: str = "summary",
                  made_by: str = "pool_summaries(k, v, block_size, pool)") -> None:
    """Raise ValueError unless ``summary`` has the geometry of compensation tokens for q, k, v of
    ``shape`` [B, H, L, D] at ``block_size``: k and v [B, H, NK * (block_size // pool), D], bias
    [NK * (block_size // pool)] (what :func:`pool_summaries` makes from this call's k, v and block
    size). The kernels read the summaries as that many tokens per key block: any other geometry
    was misaligned or read out of bounds."""
    B, H, L, D = shape
    pool = int(summary.pool)
    if pool < 1 or block_size % pool:
        raise ValueError(f"{what}: pool {pool} must divide block_size {block_size}")
    ns = num_summaries(L, block_size, pool)
    for name, t in (("k", summary.k), ("v", summary.v)):
        if tuple(t.shape) != (B, H, ns, D):
            raise ValueError(
                f"{what}.{name} must be [B, H, NK * (block_size // pool), D] = {[B, H, ns, D]} for L={L}, "
                f"block_size {block_size}, pool {pool}; got {list(t.shape)}: make it with {made_by} from this "
                f"call's k, v and block_size")
    if tuple(summary.bias.shape) != (ns,):
        raise ValueError(f"{what}.bias must be [NK * (block_size // pool)] = [{ns}] for L={L}, block_size "
                         f"{block_size}, pool {pool}; got {list(summary.bias.shape)}: make it with {made_by}")


def _check_level_lists(indices: torch.Tensor, counts: torch.Tensor, nlev: int, shape, block_size: int) -> None:
    B, H, L, _ = shape
    want = (nlev, B, H, num_blocks(L, block_size))
    if indices.dim() != 5 or tuple(indices.shape[:4]) != want or tuple(counts.shape) != want:
        raise ValueError(f"level lists must be [NLEV, B, H, NQ, MAXK] and [NLEV, B, H, NQ] with [NLEV, B, H, NQ] = "
                         f"{list(want)} (NQ = ceil(L / block_size) for L={L}); got {tuple(indices.shape)}, "
                         f"{tuple(counts.shape)}")


def check_levels_geometry(levels: PooledLevels, shape, block_size: int) -> None:
    """Raise ValueError unless ``levels`` (a :func:`pool_levels` result) fits q, k, v of ``shape``
    [B, H, L, D] at ``block_size``: lists [NLEV, B, H, NQ, MAXK] / [NLEV, B, H, NQ] and every level's
    pooled tokens made from this call's k, v (the kernels index both by query / key block)."""
    _check_level_lists(levels.indices, levels.counts, len(levels.summaries), shape, block_size)
    for lev, summ in enumerate(levels.summaries):
        check_summary(summ, shape, block_size, what=f"levels.summaries[{lev}]",
                      made_by="pool_levels(k, v, block_size, pools, indices, counts)")


def transpose_block_lists(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_key_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key-block-major view of the same mask: (q_indices [B,H,NK,NQ], q_counts [B,H,NK], mask).

    Used by the backward's dk/dv pass (each key block walks the query blocks that keep it).
    """
    mask = block_lists_to_mask(kv_indices, kv_counts, num_key_blocks)
    q_indices, q_counts = mask_to_block_lists(mask.transpose(-1, -2))
    return q_indices, q_counts, mask


def num_summaries(L: int, block_size: int, pool: int) -> int:
    """Summary tokens of a sequence: block_size // pool per (possibly partial) key block."""
    return num_blocks(L, block_size) * (block_size // pool)


def _pool_shape(L: int, block_size: int, pool: int) -> tuple[int, int, int]:
    """(NS, full groups, tokens in the last partial group) for a length."""
    n_full = L // pool
    return num_summaries(L, block_size, pool), n_full, L - n_full * pool


@functools.lru_cache(maxsize=64)
def _pool_geometry(L: int, block_size: int, pool: int, device) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """(NS, full groups, tokens in the last partial group, denominators float32 [NS, 1] (counts,
    at least 1), bias float32 [NS] (log count, -inf for an empty group)).

    Cached per geometry (a pure function of it): the few tiny launches that build the counts and
    the log bias run once, not in every attention call. Callers must not write into them. Never
    inference tensors (a first call under torch.inference_mode would otherwise cache tensors that a
    later training forward cannot save for backward)."""
    ns, n_full, rem = _pool_shape(L, block_size, pool)
    with torch.inference_mode(False):
        counts = torch.full((ns,), float(pool), dtype=torch.float32, device=device)
        if rem:
            counts[n_full] = float(rem)
        counts[n_full + (1 if rem else 0) :] = 0.0
        bias = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
        return ns, n_full, rem, counts.clamp(min=1.0)[:, None], bias


@torch.library.custom_op("videoblade::pool_geometry", mutates_args=())
def _pool_geometry_op(x: torch.Tensor, block_size: int, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    # the cached (denominators, bias) for x's length, as an opaque op (copies: an op returns new
    # tensors), so a compiled caller neither traces the cache nor rebuilds the counts in its graph
    g = _pool_geometry(x.shape[2], block_size, pool, x.device)
    return g[3].clone(), g[4].clone()


@_pool_geometry_op.register_fake
def _(x, block_size, pool):
    ns = num_summaries(x.shape[2], block_size, pool)
    return x.new_empty((ns, 1), dtype=torch.float32), x.new_empty((ns,), dtype=torch.float32)


def _geometry(x: torch.Tensor, block_size: int, pool: int) -> tuple:
    """:func:`_pool_geometry` for x's length: the cached tensors themselves in eager mode (no
    launch), copies through :func:`_pool_geometry_op` while torch.compile traces."""
    if torch.compiler.is_compiling():
        return (*_pool_shape(x.shape[2], block_size, pool), *_pool_geometry_op(x.detach(), block_size, pool))
    return _pool_geometry(x.shape[2], block_size, pool, x.device)


@triton.jit
def _pool_kernel(K, V, SK, SV, L, NS, H,
                 stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                 stride_sb, stride_sh, stride_sl,
                 POOL: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr):
    # one program: G consecutive summary groups (G * POOL token rows) of one (batch, head), for
    # k and v; float32 sums over the group's real tokens divided by their count (rows >= L read
    # as 0; a group with no token writes 0, as the torch version's padding)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid * (G * POOL) + tl.arange(0, G * POOL)
    groups = pid * G + tl.arange(0, G)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = rows[:, None] < L
    cnt = tl.minimum(tl.maximum(L - groups * POOL, 0), POOL).to(tl.float32)
    denom = tl.maximum(cnt, 1.0)[:, None]
    omask = groups[:, None] < NS
    so = b * stride_sb + h * stride_sh + groups[:, None] * stride_sl + offs_d[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + offs_d[None, :], mask=rmask,
                other=0.0).to(tl.float32)
    ks = tl.sum(tl.reshape(k, (G, POOL, HEAD_DIM)), 1) / denom
    tl.store(SK + so, ks.to(SK.dtype.element_ty), mask=omask)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + offs_d[None, :], mask=rmask,
                other=0.0).to(tl.float32)
    vs = tl.sum(tl.reshape(v, (G, POOL, HEAD_DIM)), 1) / denom
    tl.store(SV + so, vs.to(SV.dtype.element_ty), mask=omask)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tile_head_dim(d: int) -> bool:
    """Whether the pooling and estimate kernels take head dim d: tl.arange needs a power of two,
    tl.dot a reduction of at least 16."""
    return _pow2(d) and d >= 16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``. float32 follows torch's own float32
    matmuls (``torch.set_float32_matmul_precision``): "highest", torch's default, gives exact float32
    products ("ieee": no tensor cores, slow), "high" / "medium" TF32. Half types ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _last_unit(x: torch.Tensor) -> torch.Tensor:
    # the kernels read rows through the strides: they need unit stride on the last dim
    return x if x.stride(-1) == 1 else x.contiguous()


def pool_kernel_applies(k: torch.Tensor, v: torch.Tensor, pool: int, backend: str = "auto") -> bool:
    """Whether :func:`pool_summaries` takes the Triton forward: ``backend="auto"`` for CUDA
    tensors, ``"triton"`` also on CPU under ``TRITON_INTERPRET=1`` (kernel tests), ``"torch"``
    never; and only when pool and head dim are powers of two with unit stride on D."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch" or not (k.is_cuda or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return _pow2(pool) and tile_head_dim(k.shape[-1]) and k.stride(-1) == 1 and v.stride(-1) == 1 \
        and k.shape == v.shape


def pool_summaries_triton(k: torch.Tensor, v: torch.Tensor, block_size: int, pool: int,
                          rows: int = 64, num_warps: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the summaries with the Triton kernel: (sk, sv) [B, H, NS, D] in the dtypes of
    k and v (no bias, no autograd: :func:`pool_summaries` wraps it). ``rows``: token rows per
    program (rounded up to a whole group); the defaults are the fastest of an H100 probe
    (benchmarks/NOTES_attention.md)."""
    B, H, L, D = k.shape
    ns = num_summaries(L, block_size, pool)
    sk = torch.empty((B, H, ns, D), dtype=k.dtype, device=k.device)
    sv = torch.empty((B, H, ns, D), dtype=v.dtype, device=v.device)
    g = max(1, rows // pool)
    grid = (triton.cdiv(ns, g), B * H)
    _pool_kernel[grid](k, v, sk, sv, L, ns, H, k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), sk.stride(0), sk.stride(1), sk.stride(2),
                       POOL=pool, G=g, HEAD_DIM=D, num_warps=num_warps)
    return sk, sv


@torch.library.custom_op("videoblade::pool_summaries_fwd", mutates_args=())
def _pool_op(k: torch.Tensor, v: torch.Tensor, block_size: int, pool: int,
             use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # an opaque op for torch.compile (inductor keeps the launch as it is), for the torch forward too:
    # traced as plain ops inside _PoolFn, torch 2.11's dynamo compiled zero k/v gradients
    if use_kernel:
        return pool_summaries_triton(k, v, block_size, pool)
    ns, n_full, rem, denom, _ = _pool_geometry(k.shape[2], block_size, pool, k.device)
    return _pool_fwd(k, ns, n_full, rem, pool, denom), _pool_fwd(v, ns, n_full, rem, pool, denom)


@_pool_op.register_fake
def _(k, v, block_size, pool, use_kernel):
    B, H, L, D = k.shape
    ns = num_summaries(L, block_size, pool)
    return k.new_empty((B, H, ns, D)), v.new_empty((B, H, ns, D))


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

    Forward: the Triton kernel where it applies (k and v read once in one launch; the compiled
    torch version took 0.25 ms per Wan layer, several times what its bytes need), else torch.
    Backward: autograd of the plain torch version (slice, reshape, float32 sum, cat, pad,
    divide, cast) materialises several full-size [B, H, L, D] intermediates (zero-filled slice
    gradient, float32 expand, cast); this writes the gradient once.
    """

    @staticmethod
    def forward(ctx, k, v, block_size, pool, use_kernel, denom):
        L = k.shape[2]
        sk, sv = _pool_op(k, v, block_size, pool, use_kernel)
        ctx.save_for_backward(denom)
        ctx.L, ctx.pool, ctx.kdt, ctx.vdt = L, pool, k.dtype, v.dtype
        return sk, sv

    @staticmethod
    def backward(ctx, gsk, gsv):
        (denom,) = ctx.saved_tensors
        gk = _pool_bwd(gsk, ctx.L, ctx.pool, denom, ctx.kdt) if gsk is not None and ctx.needs_input_grad[0] else None
        gv = _pool_bwd(gsv, ctx.L, ctx.pool, denom, ctx.vdt) if gsv is not None and ctx.needs_input_grad[1] else None
        return gk, gv, None, None, None, None


def pool_levels(k: torch.Tensor, v: torch.Tensor, block_size: int, pools, indices: torch.Tensor,
                counts: torch.Tensor, backend: str = "auto") -> PooledLevels:
    """:class:`PooledLevels` for the pooled levels ``pools`` (ascending) and their block lists
    (int32 [NLEV, B, H, NQ, MAXK] / [NLEV, B, H, NQ]): one :func:`pool_summaries` per level, so
    gradients reach k and v the same way."""
    from ..config import level_pools_error

    pools = tuple(int(p) for p in pools)
    err = level_pools_error(block_size, pools)
    if err:
        raise ValueError(err)
    _check_level_lists(indices, counts, len(pools), k.shape, block_size)
    return PooledLevels(tuple(pool_summaries(k, v, block_size, p, backend) for p in pools), indices, counts)


def pool_summaries(k: torch.Tensor, v: torch.Tensor, block_size: int, pool: int, backend: str = "auto") -> Summary:
    """Mean of every ``pool`` consecutive keys/values (per key block), with log(count) bias.

    Differentiable (custom autograd function) so gradients reaching the summaries flow back
    to k and v. The sums are taken in float32; the results have the dtypes of ``k`` and ``v``.
    The bias is shared by every call with the same geometry: read it, never write into it.
    The forward is the Triton kernel on CUDA (see :func:`pool_kernel_applies` for ``backend``).
    """
    if block_size % pool != 0:
        raise ValueError(f"pool ({pool}) must divide block_size ({block_size})")
    geometry = _geometry(k, block_size, pool)
    sk, sv = _PoolFn.apply(k, v, block_size, pool, pool_kernel_applies(k, v, pool, backend), geometry[3])
    return Summary(sk, sv, geometry[4], pool)

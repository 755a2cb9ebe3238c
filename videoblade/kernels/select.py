"""Block selection in one Triton kernel: importance map -> kept-block lists (SPEC 1.3).

``select_block_lists(P, lo, hi, energy_threshold, text_blocks=0, diagonal=True)`` takes the
block attention-mass map P float32 [B, H, NQ, NK] (NQ == NK) and returns the kernels' block
lists ``(kv_indices int32 [B, H, NQ, NK], kv_counts int32 [B, H, NQ])``: per query block the
smallest descending-mass prefix of key blocks whose cumulative mass reaches
``energy_threshold`` of the row total (``energy_threshold=None``: exactly ``hi`` blocks, the
top-k rule), clamped to ``[lo, hi]`` blocks, plus the diagonal and the text blocks in both
directions; kept ids ascending, unused slots 0. It is what
``mask_to_block_lists(block_mask(P, ...))`` computes (``videoblade.attention.mask`` is the
policy and the torch reference), in one launch instead of a sort, a cumulative sum, two
scatters and their helpers.

One program per (b, h, query block) row. Each entry becomes an int64 key (the float bits of
its mass, which order like the value for mass >= 0, then the complement of its block id), so
one sort gives the descending order with ties broken towards the lower block id; the kept set is
every entry whose key is at least the key at rank count-1, written out in ascending id order
through a cumulative sum of the kept flags. The cumulative mass is summed in the sort's
order by Triton's scan, so a row whose prefix sum lands within float rounding of the threshold
may keep one block more or fewer than torch's sequential cumsum would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["select_block_lists", "MAX_SELECT_BLOCKS"]

MAX_SELECT_BLOCKS = 4096  # key blocks per row the kernel holds in registers (ids need < 2**16 bits)


@triton.jit
def _select_kernel(P, KVI, KVC, NQ, NK, lo, hi, threshold, TEXT,
                   ENERGY: tl.constexpr, DIAGONAL: tl.constexpr, NKP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b, h, query block i, flattened
    i = row % NQ
    offs = tl.arange(0, NKP)
    valid = offs < NK
    p = tl.load(P + row * NK + offs, mask=valid, other=0.0)
    # masses are >= 0: NaN, negatives and -0.0 (whose bits would sort first) become 0.0, as in the
    # torch policy (tl.maximum's NaN result is unspecified)
    p = tl.where(p > 0.0, p, 0.0)
    bits = p.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(valid, (bits << 16) | (65535 - offs), -1)  # padding sorts last
    skey = tl.sort(key, 0, descending=True)  # position in skey = rank
    if ENERGY:
        sval = tl.where(skey >= 0, (skey >> 16).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        csum = tl.cumsum(sval, 0)
        total = tl.max(csum, 0)
        n = tl.sum(((csum < threshold * total) & valid).to(tl.int32), 0) + 1
        n = tl.minimum(tl.maximum(n, lo), hi)  # hi <= NK
    else:
        n = hi
    kth = tl.sum(tl.where(offs == n - 1, skey, 0), 0)  # the key at rank n-1
    keep = valid & (key >= kth)
    if DIAGONAL:
        keep = keep | (offs == i)
    keep = keep | (valid & ((offs < TEXT) | (i < TEXT)))
    k32 = keep.to(tl.int32)
    pos = tl.cumsum(k32, 0) - 1
    tl.store(KVI + row * NK + pos, offs, mask=k32 > 0)
    tl.store(KVC + row, tl.sum(k32, 0))


def select_block_lists(P: torch.Tensor, lo: int, hi: int, energy_threshold: float | None, text_blocks: int = 0,
                       diagonal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept-block lists from the importance map (see the module docstring). P: float32
    [B, H, NQ, NK] with NQ == NK <= MAX_SELECT_BLOCKS, on CUDA (or any device under
    ``TRITON_INTERPRET=1``); ``1 <= lo <= hi <= NK`` as ``mask.retain_bounds`` gives them."""
    if P.dim() != 4 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"P must be [B, H, NQ, NK] with NQ == NK, got {tuple(P.shape)}")
    B, H, nq, nk = P.shape
    if nk > MAX_SELECT_BLOCKS:
        raise ValueError(f"{nk} key blocks exceed the kernel's {MAX_SELECT_BLOCKS}")
    if not 1 <= lo <= hi <= nk:
        raise ValueError(f"need 1 <= lo <= hi <= NK, got lo={lo}, hi={hi}, NK={nk}")
    thr = -1.0 if energy_threshold is None else float(energy_threshold)
    return _select_op(P.float().contiguous(), int(lo), int(hi), thr, int(text_blocks), bool(diagonal))


# a custom op, so torch.compile keeps the launch whole (as for the estimate and the attention)
@torch.library.custom_op("videoblade::select_block_lists", mutates_args=())
def _select_op(P: torch.Tensor, lo: int, hi: int, threshold: float, text_blocks: int,
               diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, nq, nk = P.shape
    kv_indices = torch.zeros((B, H, nq, nk), dtype=torch.int32, device=P.device)
    kv_counts = torch.empty((B, H, nq), dtype=torch.int32, device=P.device)
    nkp = max(16, triton.next_power_of_2(nk))
    _select_kernel[(B * H * nq,)](
        P, kv_indices, kv_counts, nq, nk, lo, hi, max(threshold, 0.0), text_blocks,
        ENERGY=threshold >= 0.0, DIAGONAL=diagonal, NKP=nkp, num_warps=4 if nkp <= 1024 else 8,
    )
    return kv_indices, kv_counts


@_select_op.register_fake
def _(P, lo, hi, threshold, text_blocks, diagonal):
    B, H, nq, nk = P.shape
    return P.new_empty((B, H, nq, nk), dtype=torch.int32), P.new_empty((B, H, nq), dtype=torch.int32)

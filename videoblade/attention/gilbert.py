"""Locality ordering of video tokens along a generalized 3D Hilbert ("Gilbert") curve.

A video transformer sees its tokens in raster order over the (frames, h, w) token grid:
tokens that are neighbours in space-time can lie ``h * w`` positions apart, so a 1-D block
of 128 raster tokens is a thin sliver of a frame.  Walking the grid along a space-filling
curve instead puts tokens that are close in 3D into the same block, which makes block-level
attention maps far more concentrated (SPEC section 1, step 1).

The curve here is a generalized Hilbert curve that works for *any* box size, not only
powers of two.  It recursively cuts the box into sub-boxes (halving the longer sides,
preferring even halves) and visits them in Hilbert order, re-orienting each sub-box so that
it starts next to where the previous one ended.  Whatever the sizes, the sub-boxes of every
cut partition their parent exactly, so the result is always a bijection of the grid; for
most sizes every step moves to a face neighbour, and where parity forbids it the rare
exception is a short jump between adjacent sub-boxes.

Public API
----------
``gilbert_curve(f, h, w)``                -> int64 numpy array [f*h*w, 3] of (t, y, x), curve order
``gilbert_order(grid, text_tokens=0)``    -> (perm, inv) int64 CPU tensors over the whole sequence
``gilbert_order_on(grid, text_tokens, device)`` -> the same, cached on ``device``
``reorder(x, perm, dim)`` / ``restore(x, inv, dim)`` -> ``x.index_select(dim, ...)``

Conventions: the sequence is ``[text tokens (text_tokens of them), video tokens in raster
(t, y, x) order]``.  ``perm[i]`` is the original position of the i-th token of the ordered
sequence, so ``x_ordered = x[..., perm, ...]`` and ``x = x_ordered[..., inv, ...]``.  Text
tokens stay a leading contiguous segment (``perm[:text_tokens] == arange(text_tokens)``).
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch

__all__ = [
    "gilbert_curve",
    "gilbert_order",
    "gilbert_order_on",
    "raster_positions",
    "reorder",
    "restore",
]


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _walk(out: list, p, a, b, c) -> None:
    """Append to ``out`` the points of the box spanned from corner ``p`` by the signed edge
    vectors ``a`` (major axis), ``b`` and ``c``, in generalized-Hilbert order.

    Each vector is a 3-tuple with exactly one non-zero entry (its length and direction along
    one grid axis) or all zeros (an empty box).  The walk starts at ``p`` and, when the
    sizes allow it, ends at ``p + (|a| - 1) * unit(a)``: the far end of the major edge.  The
    recursive cases below keep that invariant so consecutive sub-boxes join up.
    """
    w = abs(sum(a))
    h = abs(sum(b))
    d = abs(sum(c))
    if w == 0 or h == 0 or d == 0:
        return
    da = tuple(_sign(v) for v in a)
    db = tuple(_sign(v) for v in b)
    dc = tuple(_sign(v) for v in c)

    # Lines: walk straight along the one long edge.
    if h == 1 and d == 1:
        out.extend((p[0] + i * da[0], p[1] + i * da[1], p[2] + i * da[2]) for i in range(w))
        return
    if w == 1 and d == 1:
        out.extend((p[0] + i * db[0], p[1] + i * db[1], p[2] + i * db[2]) for i in range(h))
        return
    if w == 1 and h == 1:
        out.extend((p[0] + i * dc[0], p[1] + i * dc[1], p[2] + i * dc[2]) for i in range(d))
        return

    def half(v, dv, n):
        v2 = tuple(x // 2 if x >= 0 else -((-x) // 2) for x in v)
        # prefer even halves (for n > 2) so the sub-walks end on the right parity
        if (abs(sum(v2)) % 2) and n > 2:
            v2 = tuple(x + s for x, s in zip(v2, dv))
        return v2

    a2 = half(a, da, w)
    b2 = half(b, db, h)
    c2 = half(c, dc, d)

    def add(*vs):
        return tuple(sum(x) for x in zip(*vs))

    def neg(v):
        return tuple(-x for x in v)

    def sub(u, v):
        return tuple(x - y for x, y in zip(u, v))

    a_rest = sub(a, a2)
    a_end = sub(a, da)  # offset of the last point along a

    if 2 * w > 3 * h and 2 * w > 3 * d:
        # long box: cut across the major axis only
        _walk(out, p, a2, b, c)
        _walk(out, add(p, a2), a_rest, b, c)
    elif 3 * h > 4 * d:
        # flat in c: cut a and b, keep c whole
        _walk(out, p, b2, c, a2)
        _walk(out, add(p, b2), a, sub(b, b2), c)
        _walk(out, add(p, a_end, sub(b2, db)), neg(b2), c, neg(a_rest))
    elif 3 * d > 4 * h:
        # flat in b: cut a and c, keep b whole
        _walk(out, p, c2, a2, b)
        _walk(out, add(p, c2), a, b, sub(c, c2))
        _walk(out, add(p, a_end, sub(c2, dc)), neg(c2), neg(a_rest), b)
    else:
        # cube-like: the 8 octants, visited as 5 sub-boxes in Hilbert order
        _walk(out, p, b2, c2, a2)
        _walk(out, add(p, b2), c, a2, sub(b, b2))
        _walk(out, add(p, sub(b2, db), sub(c, dc)), a, neg(b2), neg(sub(c, c2)))
        _walk(out, add(p, a_end, b2, sub(c, dc)), neg(c), neg(a_rest), sub(b, b2))
        _walk(out, add(p, a_end, sub(b2, db)), neg(b2), c2, neg(a_rest))


@functools.lru_cache(maxsize=64)
def _curve_cached(f: int, h: int, w: int) -> np.ndarray:
    out: list = []
    # the recursion depth is O(log(max side)); the limit only matters for absurd grids
    if sys.getrecursionlimit() < 10_000:
        sys.setrecursionlimit(10_000)
    # coordinates are (t, y, x); the longest side is the major axis of the whole walk
    sizes = (f, h, w)
    axes = sorted(range(3), key=lambda i: -sizes[i])
    vecs = []
    for ax in axes:
        v = [0, 0, 0]
        v[ax] = sizes[ax]
        vecs.append(tuple(v))
    _walk(out, (0, 0, 0), vecs[0], vecs[1], vecs[2])
    arr = np.asarray(out, dtype=np.int64).reshape(-1, 3)
    arr.setflags(write=False)
    return arr


def gilbert_curve(f: int, h: int, w: int) -> np.ndarray:
    """Points of the (f, h, w) grid as (t, y, x) rows in curve order (read-only array)."""
    f, h, w = int(f), int(h), int(w)
    if min(f, h, w) < 1:
        raise ValueError(f"gilbert_curve: every grid side must be >= 1, got {(f, h, w)}")
    return _curve_cached(f, h, w)


def raster_positions(grid) -> np.ndarray:
    """(t, y, x) of every token of the grid in raster order: [f*h*w, 3]."""
    f, h, w = (int(s) for s in grid)
    t, y, x = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1)


@functools.lru_cache(maxsize=64)
def gilbert_order(grid: tuple, text_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation and inverse (int64 CPU tensors of length text_tokens + f*h*w).

    ``grid`` is the (frames, h, w) token grid; text tokens are a leading segment kept in
    place.  Cached per (grid, text_tokens); the returned tensors must not be modified.
    """
    f, h, w = (int(s) for s in grid)
    text_tokens = int(text_tokens)
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    pts = gilbert_curve(f, h, w)
    video = (pts[:, 0] * h + pts[:, 1]) * w + pts[:, 2]
    perm = np.concatenate([np.arange(text_tokens, dtype=np.int64), video + text_tokens])
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size, dtype=np.int64)
    # cached for the process: never inference tensors (made during a first call under
    # torch.inference_mode they could not index a later forward that autograd records)
    with torch.inference_mode(False):
        return torch.from_numpy(perm), torch.from_numpy(inv)


_DEVICE_CACHE: dict = {}


def gilbert_order_on(grid, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``gilbert_order`` moved to ``device`` once and cached there (per grid, text, device)."""
    grid = tuple(int(s) for s in grid)
    device = torch.device(device)
    key = (grid, int(text_tokens), str(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is None:
        hit = _cache_order(key, grid, int(text_tokens), device)
    return hit


@torch.compiler.disable  # the curve is numpy and recursion: built eagerly when first met inside a compiled graph
def _cache_order(key, grid, text_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    perm, inv = gilbert_order(grid, text_tokens)
    if device.type != "cpu":
        with torch.inference_mode(False):  # cached: normal tensors even when first met in inference mode
            perm = perm.to(device, non_blocking=False)
            inv = inv.to(device, non_blocking=False)
    if len(_DEVICE_CACHE) > 256:  # many distinct grids: forget the oldest
        _DEVICE_CACHE.pop(next(iter(_DEVICE_CACHE)))
    hit = _DEVICE_CACHE[key] = (perm, inv)
    return hit


def reorder(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Tokens of ``x`` along ``dim`` in curve order (``x.index_select(dim, perm)``)."""
    return x.index_select(dim, perm)


def restore(x: torch.Tensor, inv: torch.Tensor, dim: int) -> torch.Tensor:
    """Undo ``reorder`` (``x.index_select(dim, inv)``)."""
    return x.index_select(dim, inv)

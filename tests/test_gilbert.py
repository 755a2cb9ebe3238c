"""Gilbert (generalized 3D Hilbert) ordering: bijection, inverse, odd grids, locality."""

import itertools

import numpy as np
import pytest
import torch

from videoblade.attention.gilbert import (
    gilbert_curve,
    gilbert_order,
    gilbert_order_on,
    raster_positions,
    reorder,
    restore,
)

ODD_GRIDS = [(1, 1, 1), (1, 1, 7), (3, 1, 1), (1, 5, 1), (2, 3, 5), (3, 5, 7), (5, 9, 13), (13, 30, 45), (21, 30, 52)]


@pytest.mark.parametrize("grid", ODD_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_curve_is_a_bijection_of_the_grid(grid):
    pts = gilbert_curve(*grid)
    f, h, w = grid
    assert pts.shape == (f * h * w, 3)
    assert (pts >= 0).all() and (pts < np.array(grid)).all()
    flat = (pts[:, 0] * h + pts[:, 1]) * w + pts[:, 2]
    assert np.array_equal(np.sort(flat), np.arange(f * h * w))


def test_every_small_grid_is_covered_and_steps_stay_local():
    # all grids up to 9^3 (odd, even, flat, line-shaped): a permutation each time, and the
    # walk moves to a neighbour (Manhattan step 1), with at most a diagonal hop (step 2)
    # where parity forbids a unit step
    non_unit = steps = 0
    for grid in itertools.product(range(1, 10), repeat=3):
        pts = gilbert_curve(*grid)
        f, h, w = grid
        flat = (pts[:, 0] * h + pts[:, 1]) * w + pts[:, 2]
        assert len(np.unique(flat)) == f * h * w, grid
        d = np.abs(np.diff(pts, axis=0)).sum(1)
        assert d.max(initial=1) <= 2, grid
        non_unit += int((d != 1).sum())
        steps += len(d)
    assert non_unit < 0.03 * steps


@pytest.mark.parametrize("text", [0, 5, 226])
@pytest.mark.parametrize("grid", [(3, 5, 7), (4, 6, 8), (13, 6, 9)], ids=lambda g: "x".join(map(str, g)))
def test_order_and_inverse_restore_with_text_segment(grid, text):
    perm, inv = gilbert_order(grid, text)
    n = text + int(np.prod(grid))
    assert perm.shape == inv.shape == (n,)
    assert torch.equal(perm[:text], torch.arange(text))  # text stays a leading segment
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    y = reorder(x, perm, 2)
    assert not torch.equal(y, x) or n <= text + 1
    assert torch.equal(restore(y, inv, 2), x)
    # the ordered video tokens follow the curve
    pts = gilbert_curve(*grid)
    f, h, w = grid
    assert torch.equal(perm[text:] - text, torch.from_numpy((pts[:, 0] * h + pts[:, 1]) * w + pts[:, 2]))


def test_permutation_is_cached_per_grid_and_device():
    a = gilbert_order((3, 5, 7), 2)
    b = gilbert_order((3, 5, 7), 2)
    assert a[0] is b[0]
    c = gilbert_order_on((3, 5, 7), 2, "cpu")
    d = gilbert_order_on((3, 5, 7), 2, torch.device("cpu"))
    assert c[0] is d[0]
    assert torch.equal(c[0], a[0])


def _block_spread(pts: np.ndarray, block: int) -> tuple[float, float]:
    """Mean over blocks of (distance of a token to its block's centroid, bounding-box volume)."""
    n = len(pts) // block * block
    b = pts[:n].reshape(-1, block, 3).astype(np.float64)
    spread = np.sqrt(((b - b.mean(1, keepdims=True)) ** 2).sum(-1)).mean()
    vol = np.prod(b.max(1) - b.min(1) + 1, axis=1).mean()
    return float(spread), float(vol)


@pytest.mark.parametrize(
    "grid,block",
    [((21, 30, 52), 128), ((13, 30, 45), 128), ((7, 12, 20), 64), ((5, 9, 13), 64)],
    ids=["wan-480p", "cog-480p", "small", "odd"],
)
def test_gilbert_blocks_are_more_compact_than_raster_blocks(grid, block):
    g_spread, g_vol = _block_spread(gilbert_curve(*grid), block)
    r_spread, r_vol = _block_spread(raster_positions(grid), block)
    # measured: Wan grid 2.74 vs 13.3 tokens from the centroid; odd 5x9x13 2.20 vs 4.07
    assert g_spread < 0.6 * r_spread, (g_spread, r_spread)
    assert g_vol < r_vol

"""Mask policy: energy prefix, min/max retain, top-k, diagonal and text blocks."""

import math

import pytest
import torch

from videoblade.attention.mask import block_levels, block_mask, retain_bounds


def _rand_P(B=2, H=3, NQ=12, NK=12, sharp=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(B, H, NQ, NK, generator=g), -1)


def _expected_energy_row(p, thr, lo, hi):
    """Brute force: the smallest n with (sum of the n largest) >= thr * total, clamped."""
    vals, order = torch.sort(p, descending=True)
    total = float(vals.sum())
    acc = 0.0
    n = len(vals)
    for i, v in enumerate(vals.tolist()):
        acc += v
        if acc >= thr * total:
            n = i + 1
            break
    n = min(max(n, lo), hi)
    return set(order[:n].tolist()), n


@pytest.mark.parametrize("thr", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("min_r,max_r", [(0.0, 1.0), (0.05, 0.15), (0.25, 0.5)])
def test_energy_keeps_smallest_prefix_reaching_threshold(thr, min_r, max_r):
    P = _rand_P(NQ=20, NK=20)
    nk = P.shape[-1]
    lo, hi = retain_bounds(nk, min_r, max_r)
    m = block_mask(P, "energy", energy_threshold=thr, min_retain=min_r, max_retain=max_r, diagonal=False)
    assert m.dtype == torch.bool and m.shape == P.shape
    for b in range(P.shape[0]):
        for h in range(P.shape[1]):
            for i in range(P.shape[2]):
                want, n = _expected_energy_row(P[b, h, i], thr, lo, hi)
                got = set(torch.nonzero(m[b, h, i]).flatten().tolist())
                assert got == want, (b, h, i, n)
                # it is the smallest: one block fewer would miss the threshold (unless clamped at lo)
                if n > lo:
                    vals = torch.sort(P[b, h, i], descending=True).values
                    assert vals[: n - 1].sum() < thr * vals.sum()


def test_retain_bounds_clamp():
    assert retain_bounds(100, 0.05, 0.15) == (5, 15)
    assert retain_bounds(10, 0.0, 0.01) == (1, 1)  # at least one block
    assert retain_bounds(10, 1.0, 0.15) == (10, 10)  # min wins a conflict: keep all
    P = torch.full((1, 1, 40, 40), 1.0 / 40)  # flat rows need every block for 95 %
    m = block_mask(P, "energy", 0.95, 0.05, 0.15, diagonal=False)
    assert (m.sum(-1) == 6).all()  # clamped to max_retain: floor(0.15 * 40)
    P = torch.zeros(1, 1, 40, 40)
    P[..., 3] = 1.0  # one block holds everything: the prefix is 1, raised to min_retain
    m = block_mask(P, "energy", 0.95, 0.1, 0.5, diagonal=False)
    assert (m.sum(-1) == 4).all() and m[..., 3].all()


def test_keep_all_when_min_retain_is_one():
    P = _rand_P()
    assert block_mask(P, "energy", 0.5, 1.0, 0.15).all()


def test_diagonal_and_text_blocks_always_kept():
    P = _rand_P(NQ=16, NK=16, sharp=8.0)
    P[..., torch.arange(16), torch.arange(16)] = 0.0  # diagonal carries no mass
    P = P / P.sum(-1, keepdim=True)
    m = block_mask(P, "energy", 0.5, 0.0, 0.2, text_blocks=2)
    idx = torch.arange(16)
    assert m[..., idx, idx].all()
    assert m[..., :2, :].all()  # text query blocks see everything
    assert m[..., :, :2].all()  # every query block sees the text key blocks
    # and the video-to-video part is still sparse
    assert m[..., 2:, 2:].float().mean() < 0.35
    m0 = block_mask(P, "energy", 0.5, 0.0, 0.2, diagonal=False)
    assert not m0[..., idx, idx].all()


def test_topk_keeps_a_fixed_fraction():
    P = _rand_P(NQ=30, NK=30)
    m = block_mask(P, "topk", topk=0.2, diagonal=False)
    k = math.ceil(0.2 * 30)
    assert (m.sum(-1) == k).all()
    top = P.topk(k, -1).indices
    assert torch.gather(m, -1, top).all()
    m2 = block_mask(P, "topk", topk=0.2)
    assert ((m2.sum(-1) == k) | (m2.sum(-1) == k + 1)).all()


def test_mask_is_batched_over_heads_and_matches_per_row_policy():
    # the vectorised mask for [B, H, ...] equals the mask computed one head at a time
    P = _rand_P(B=2, H=4, NQ=9, NK=11)
    full = block_mask(P, "energy", 0.9, 0.1, 0.4, text_blocks=1)
    for h in range(4):
        one = block_mask(P[:, h : h + 1], "energy", 0.9, 0.1, 0.4, text_blocks=1)
        assert torch.equal(full[:, h : h + 1], one)


def test_bad_mode_raises():
    with pytest.raises(ValueError):
        block_mask(_rand_P(), "random")


# ------------------------------------------------------------------ multi-level (SPEC 1.6)


@pytest.mark.parametrize("fractions", [(0.05, 0.10, 0.15, 0.20), (0.2, 0.0, 0.5), (1.0,), (0.3, 0.9)])
def test_levels_follow_rank_bands(fractions):
    from videoblade.attention.mask import block_levels, level_band_counts

    P = _rand_P(NQ=20, NK=20, seed=3)
    P[0, 0, 4, :] = 0.05  # a row of ties: bands fill in block order
    lev = block_levels(P, fractions, diagonal=False)
    counts = level_band_counts(20, fractions)
    assert lev.dtype == torch.int8 and lev.shape == P.shape and sum(counts) <= 20
    assert counts[0] >= 1 and counts == [min(math.ceil(f * 20 - 1e-9), 20 - sum(counts[:i])) or (i == 0)
                                         for i, f in enumerate(fractions)]
    for b, h, i in [(0, 0, 4), (1, 2, 7), (0, 1, 19)]:
        order = sorted(range(20), key=lambda j: (-P[b, h, i, j].item(), j))
        want, r = [0] * 20, 0
        for band, c in enumerate(counts):
            for j in order[r : r + c]:
                want[j] = band + 1
            r += c
        assert lev[b, h, i].tolist() == want


def test_levels_force_diagonal_and_text_blocks_exact():
    from videoblade.attention.mask import block_levels, level_lists

    P = _rand_P(NQ=10, NK=10, seed=4)
    lev = block_levels(P, (0.1, 0.2, 0.2), text_blocks=2)
    idx = torch.arange(10)
    assert (lev[..., idx, idx] == 1).all()
    assert (lev[..., :, :2] == 1).all() and (lev[..., :2, :] == 1).all()
    kvi, kvc, pidx, pcnt = level_lists(lev, 2)
    assert pidx.shape == (2, *P.shape) and pcnt.shape == (2, *P.shape[:3])
    for i in range(2):
        assert torch.equal(pcnt[i], (lev == 2 + i).sum(-1).int())
    assert torch.equal(kvc, (lev == 1).sum(-1).int())


# ------------------------------------------------------------------ ties and non-finite masses


@pytest.mark.parametrize("mode", ["energy", "topk"])
def test_ties_go_to_the_lower_block_id(mode):
    # equal masses (an all-zero row, an underflowed tail, a flat row): the policy keeps the lowest
    # ids among the tied blocks, on every device, as the Triton selection (kernels/select.py) does
    n = 20
    P = torch.zeros(2, 3, n, n)
    P[..., 1, 7] = 1.0  # one block carries the row, the other 19 tie at 0
    P[..., 2, :] = 1.0 / n  # a flat row
    P[..., 3, 10:] = 0.1  # ten equal blocks, the rest 0
    kw = dict(energy_threshold=0.95, min_retain=0.2, max_retain=0.5) if mode == "energy" else dict(topk=0.2)
    m = block_mask(P, mode, diagonal=False, **kw)
    rows = {i: torch.nonzero(m[1, 2, i]).flatten().tolist() for i in range(4)}
    assert rows[0] == [0, 1, 2, 3]  # lo = 4 (energy) / k = 4 (top-k) of 20 equal zeros
    assert rows[1] == [0, 1, 2, 7]
    if mode == "energy":
        assert rows[2] == list(range(10))  # flat row clamped at hi = 10
        assert rows[3] == list(range(10, 20))  # the ten equal blocks reach 95 %
    else:
        assert rows[2] == [0, 1, 2, 3] and rows[3] == [10, 11, 12, 13]
    assert torch.equal(m, m[:1, :1].expand_as(m))  # the same choice in every (b, h)


@pytest.mark.parametrize("mode", ["energy", "topk"])
def test_nan_and_negative_masses_count_as_zero(mode):
    # masses are >= 0: a NaN (or negative) estimate carries no mass, as in the Triton selection
    # (which clamps to 0); a NaN used to sort first and poison the row's total, keeping it alone
    P = _rand_P(NQ=12, NK=12, seed=5)
    clean = P.clone()
    P[0, 0, 3, 5] = float("nan")
    P[0, 1, :, 0] = float("nan")
    P[1, 2, 7, 2] = -0.5
    P[1, 0, 4, 9] = -0.0
    for t in ((0, 0, 3, 5), (1, 2, 7, 2), (1, 0, 4, 9)):
        clean[t] = 0.0
    clean[0, 1, :, 0] = 0.0
    kw = dict(energy_threshold=0.9, min_retain=0.1, max_retain=0.5) if mode == "energy" else dict(topk=0.3)
    for text in (0, 2):
        assert torch.equal(block_mask(P, mode, text_blocks=text, **kw), block_mask(clean, mode, text_blocks=text, **kw))


def test_levels_count_nan_and_negative_masses_as_zero():
    # the multi-level map ranks blocks like block_mask: a NaN estimate used to sort above every
    # real mass and take an exact slot
    P = _rand_P(NQ=16, NK=16, seed=7)
    clean = P.clone()
    P[0, 0, 3, 9] = float("nan")
    P[1, 1, :, 4] = float("nan")
    P[0, 1, 5, 11] = -1.0
    for t in ((0, 0, 3, 9), (0, 1, 5, 11)):
        clean[t] = 0.0
    clean[1, 1, :, 4] = 0.0
    fr = [0.1, 0.2, 0.2]
    for text in (0, 2):
        assert torch.equal(block_levels(P, fr, text_blocks=text), block_levels(clean, fr, text_blocks=text))
    assert block_levels(P, fr)[0, 0, 3, 9] == 0

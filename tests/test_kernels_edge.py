"""Edge cases of the public kernel API (``videoblade.kernels``), CPU tier.

What a caller can hand the kernels besides ASA's own well-formed inputs: rows whose logits are all
far below zero on a partial last block, masks that keep nothing for a row (gathered CPU path),
summaries or pooled levels built for another geometry, block lists of the wrong rank / device /
order, unsupported dtypes. Each is either computed as the float32 reference computes it, or
refused with a ValueError that says what to change, before any kernel launch (a launch on such
input read out of bounds: NaN, garbage, or a segfault under the interpreter).
Sizes stay tiny (L <= 96, block 16/32), the Triton kernels run under ``TRITON_INTERPRET=1``.
"""

import pytest
import torch
from helpers import rel_err

from videoblade.kernels import (
    block_sparse_attention,
    block_sparse_attention_ref,
    mask_to_block_lists,
    num_blocks,
    pool_levels,
    pool_summaries,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _lists(mask):
    return tuple(t.to(DEV) for t in mask_to_block_lists(mask))


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("dtype,shift", [(torch.float16, 4.5), (torch.float32, 12.0)], ids=["fp16", "fp32"])
def test_dq_finite_when_rows_on_a_partial_block_have_very_negative_lse(dtype, shift):
    # every key is strongly anti-aligned with every query: all logits of a row are near -shift**2
    # (lse about -20 in fp16, -144 in fp32). The dq kernel loads the padded keys of the partial last
    # block as zeros, whose logit is 0 instead of -inf: their p = exp(-lse) overflowed (ds above
    # fp16's 65504 once lse < -11; p itself above fp32's range once lse < -88) and inf * (k = 0)
    # made dq NaN, on every row that keeps the partial block. The reference is finite.
    g = torch.Generator().manual_seed(17)
    B, H, L, D, bs = 2, 2, 40, 16, 16  # blocks of 16, 16, 8 tokens
    n = num_blocks(L, bs)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = (shift * u + 0.1 * torch.randn(B, H, L, D, generator=g)).to(DEV, dtype)
    k = (-shift * u + 0.1 * torch.randn(B, H, L, D, generator=g)).to(DEV, dtype)
    v = torch.randn(B, H, L, D, generator=g).to(DEV, dtype)
    mask = torch.rand(B, H, n, n, generator=g) < 0.5  # a different mask per batch and head
    mask[..., n - 1] = True  # every row keeps the partial last block
    mask[0, 1, 0] = False
    mask[0, 1, 0, n - 1] = True  # one row keeps the partial block only
    kvi, kvc = _lists(mask)
    do = torch.randn(B, H, L, D, generator=g).to(DEV, dtype)

    def run(fn, **kw):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv, kvi, kvc, bs, 1.0, **kw)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), do)), lse

    got, lse = run(block_sparse_attention)
    want, lse_r = run(block_sparse_attention_ref)
    assert lse_r.max().item() < (-11 if dtype == torch.float16 else -88)  # the regime of the bug
    assert (lse - lse_r).abs().max().item() < 1e-3 * lse_r.abs().max().item()
    if dtype == torch.float32:
        bounds = [2e-5] * 4
    else:
        # dq here sums terms of |k| ~ 4.5 that cancel to ~0.1 (a row's ds sums to 0), so fp16 rounding
        # shows more than on random data: the flash-attention rule of DESIGN.md (at most 2x the error of
        # a naive fp16 implementation against the float32 reference), capped
        naive, _ = run(block_sparse_attention_ref, compute_dtype=torch.float16)
        bounds = [min(1e-2, 2 * rel_err(a, b)) for a, b in zip(naive, want)]
    for name, a, b, bound in zip(("out", "dq", "dk", "dv"), got, want, bounds):
        err = rel_err(a, b)  # asserts finiteness first
        assert err < bound, f"{name}: rel err {err:.2e} (bound {bound:.2e})"


def test_gathered_cpu_path_gives_zero_for_rows_that_keep_nothing():
    # the gathered CPU backend (ASA on CPU) on a caller's mask with an empty row and no compensation:
    # the reference's rule is out 0 (lse -inf) for such a row; the gathered path divided 0 by 0 and
    # the NaN reached every k and v gradient through the backward
    from videoblade.kernels.gathered import block_sparse_attention_gathered

    g = torch.Generator().manual_seed(5)
    B, H, L, D, bs = 2, 3, 45, 16, 16
    n = num_blocks(L, bs)
    mask = torch.rand(B, H, n, n, generator=g) < 0.5
    mask[0, 1, 1] = False  # a row that keeps nothing
    mask[1, 2, n - 1] = False  # the partial last query block keeps nothing
    base = [torch.randn(B, H, L, D, generator=g) for _ in range(3)]
    do = torch.randn(B, H, L, D, generator=g)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    got = run(lambda q, k, v: block_sparse_attention_gathered(q, k, v, mask, bs))
    want = run(lambda q, k, v: block_sparse_attention_ref(q, k, v, *mask_to_block_lists(mask), bs)[0])
    assert (got[0][0, 1, bs : 2 * bs] == 0).all() and (got[0][1, 2, (n - 1) * bs :] == 0).all()
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = rel_err(a, b)  # asserts finiteness first
        assert err < 1e-5, f"{name}: rel err {err:.2e}"


# ------------------------------------------------------------------ inputs that do not fit


def _qkv(B=1, H=2, L=72, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(DEV, dtype) for _ in range(3)]


def _gathered(q, k, v, kvi, kvc, bs, summary=None):
    from videoblade.kernels import block_lists_to_mask
    from videoblade.kernels.gathered import block_sparse_attention_gathered

    return block_sparse_attention_gathered(q, k, v, block_lists_to_mask(kvi, kvc, kvi.shape[2]), bs, summary=summary)


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_ref, _gathered],
                         ids=["kernel", "reference", "gathered"])
@pytest.mark.parametrize("case", ["other-block-size", "shorter-keys", "bias-length"])
def test_summary_of_another_geometry_is_refused(fn, case):
    # summaries pooled for another block size or from other keys than this call's: the kernels read
    # them as NK * (block_size // pool) tokens (misaligned, silently wrong, or read out of bounds);
    # the reference and the gathered CPU path failed with an IndexError or computed on the wrong blocks
    q, k, v = _qkv()
    bs = 16
    n = num_blocks(q.shape[2], bs)
    kvi, kvc = _lists(torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(1)) < 0.5)
    if case == "other-block-size":
        summ = pool_summaries(k, v, 32, 8)
    elif case == "shorter-keys":
        summ = pool_summaries(k[:, :, :40], v[:, :, :40], bs, 8)
    else:
        s = pool_summaries(k, v, bs, 8)
        summ = s._replace(bias=s.bias[:-1])
    with pytest.raises(ValueError, match="pool_summaries"):
        fn(q, k, v, kvi, kvc, bs, summary=summ)


def test_summary_dtype_other_than_the_inputs_is_refused():
    # tl.dot takes operands of one dtype: the interpreter asserted, the GPU failed to compile
    q, k, v = _qkv(dtype=torch.float16)
    n = num_blocks(q.shape[2], 16)
    kvi, kvc = _lists(torch.ones(1, 2, n, n, dtype=torch.bool))
    summ = pool_summaries(k.float(), v.float(), 16, 8)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k, v, kvi, kvc, 16, summary=summ)


@pytest.mark.parametrize("fn", [block_sparse_attention, block_sparse_attention_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("case", ["shorter-keys", "other-lists"])
def test_levels_of_another_geometry_are_refused(fn, case):
    # pooled levels from other keys (the kernel read past them: NaN) or with block lists of another
    # query-block count (out-of-bounds reads: a segfault under the interpreter)
    q, k, v = _qkv(L=96)
    bs = 32
    n = num_blocks(96, bs)
    from videoblade.kernels import PooledLevels

    lev = torch.randint(0, 3, (1, 2, n, n), generator=torch.Generator().manual_seed(2))
    kvi, kvc = _lists(lev == 1)
    pidx, pcnt = (t.unsqueeze(0) for t in _lists(lev == 2))
    # built by hand (pool_levels refuses lists of another length itself, see the next test)
    if case == "shorter-keys":
        levels = PooledLevels((pool_summaries(k[:, :, :40], v[:, :, :40], bs, 2),), pidx, pcnt)
        with pytest.raises(ValueError, match="pool_levels"):
            fn(q, k, v, kvi, kvc, bs, levels=levels)
    else:
        levels = PooledLevels((pool_summaries(k, v, bs, 2),), pidx[:, :, :, :2], pcnt[:, :, :, :2])
        with pytest.raises(ValueError, match="NQ"):
            fn(q, k, v, kvi, kvc, bs, levels=levels)


def test_pool_levels_refuses_lists_for_another_length():
    k, v, _ = _qkv(L=96)
    lists = [torch.zeros(1, 1, 2, 2, 3, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)]
    with pytest.raises(ValueError, match="NQ"):
        pool_levels(k, v, 32, (2,), *lists)  # 96 tokens are 3 query blocks of 32, the lists have 2


@pytest.mark.parametrize("case", ["indices-rank", "counts-rank", "indices-device", "counts-device"])
def test_block_lists_of_wrong_rank_or_device_are_refused(case):
    # [B, H, NQ] indices passed the shape check (only the first three dims were compared) and the
    # kernel read MAXK = NQ ids per row past the end of the tensor (a segfault under the
    # interpreter); lists on another device than q handed the kernel a foreign pointer
    q, k, v = _qkv()
    n = num_blocks(q.shape[2], 16)
    kvi, kvc = _lists(torch.ones(1, 2, n, n, dtype=torch.bool))
    other = "meta"
    bad = {
        "indices-rank": (kvi[..., 0], kvc),
        "counts-rank": (kvi, kvc[..., None]),
        "indices-device": (kvi.to(other), kvc),
        "counts-device": (kvi, kvc.to(other)),
    }[case]
    with pytest.raises(ValueError, match="device" if "device" in case else r"\[B,H,NQ,MAXK\]"):
        block_sparse_attention(q, k, v, *bad, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32], ids=["float64", "int32"])
def test_unsupported_dtypes_are_refused(dtype):
    # the kernels take float16 / bfloat16 / float32 (their accumulators are float32): float64 gave a
    # float64 tl.dot into a float32 accumulator (GPU compile error), integers an interpreter assert
    q, k, v = (t.to(dtype) for t in _qkv())
    n = num_blocks(q.shape[2], 16)
    kvi, kvc = _lists(torch.ones(1, 2, n, n, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_sparse_attention_ref"):
        block_sparse_attention(q, k, v, kvi, kvc, 16)


# ------------------------------------------------------------------ block-list values


def test_check_block_lists_accepts_what_the_helpers_make():
    from videoblade.attention.mask import block_lists
    from videoblade.kernels import check_block_lists

    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 3, 7, 7, generator=g) < 0.4
    mask[0, 0, 1] = False  # an empty row
    check_block_lists(*mask_to_block_lists(mask), 7)
    check_block_lists(*mask_to_block_lists(mask, max_blocks=int(mask.sum(-1).max())), 7)
    P = torch.softmax(torch.randn(1, 2, 9, 9, generator=g), -1).to(DEV)
    check_block_lists(*block_lists(P, "energy", 0.9, 0.1, 0.5, use_kernel=True), 9)


@pytest.mark.parametrize("case", ["descending", "duplicate", "id-too-large", "negative-id", "count-too-large",
                                  "negative-count"])
def test_check_block_lists_names_what_is_wrong(case):
    from videoblade.kernels import check_block_lists

    kvi, kvc = mask_to_block_lists(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    kvi, kvc = kvi.clone(), kvc.clone()
    if case == "descending":  # e.g. torch.topk indices, ordered by mass
        kvi[0, 0, 1] = torch.tensor([2, 1, 0])
    elif case == "duplicate":
        kvi[0, 0, 2] = torch.tensor([0, 0, 1])
    elif case == "id-too-large":
        kvi[0, 0, 0, 2] = 3
    elif case == "negative-id":
        kvi[0, 0, 0, 0] = -1
    elif case == "count-too-large":
        kvc[0, 0, 1] = 4
    else:
        kvc[0, 0, 1] = -1
    want = {"descending": "ascending", "duplicate": "ascending", "id-too-large": "range",
            "negative-id": "range", "count-too-large": "counts", "negative-count": "counts"}[case]
    with pytest.raises(ValueError, match=want):
        check_block_lists(kvi, kvc, 3)


def test_kernel_checks_list_values_when_asked(monkeypatch):
    # lists ordered by mass (torch.topk) with a partial last block: the forward peels that block off
    # the end of the list only, so elsewhere its padded rows were read unmasked (garbage out). With
    # VIDEOBLADE_KERNEL_CHECK=1 the public function checks the values first (one host sync)
    q, k, v = _qkv(L=72)  # blocks of 16 and a last one of 8 tokens
    n = num_blocks(72, 16)
    i = torch.arange(n)
    rows = torch.stack([torch.full_like(i, n - 1), (i + 1) % (n - 1), i % (n - 1)], -1)  # 3 distinct ids
    kvi = rows.expand(1, 2, n, 3).int().to(DEV)
    kvc = torch.full((1, 2, n), 3, dtype=torch.int32, device=DEV)
    monkeypatch.setenv("VIDEOBLADE_KERNEL_CHECK", "1")
    with pytest.raises(ValueError, match="ascending"):
        block_sparse_attention(q, k, v, kvi, kvc, 16)
    # sorted, the same lists pass and the kernel equals the reference
    kvi_s = kvi.sort(-1).values
    out = block_sparse_attention(q, k, v, kvi_s, kvc, 16)[0]
    assert rel_err(out, block_sparse_attention_ref(q, k, v, kvi_s, kvc, 16)[0]) < 1e-5


def test_sequences_past_int32_row_offsets_are_refused():
    # inside one (batch, head) the kernels index rows in int32: at 12 heads x 128 a sequence of 1.4M
    # tokens reaches past 2**31 elements and read/wrote wrapped addresses. Meta tensors: no memory needed.
    B, H, D = 1, 12, 128
    n_ok = 32760  # Wan2.1 at 81x480x832 stays far inside
    for L, refused in ((n_ok, False), (1_400_000, True)):
        q = torch.empty(B, L, H, D, device="meta", dtype=torch.bfloat16).transpose(1, 2)
        n = num_blocks(L, 128)
        kvi = torch.empty(B, H, n, 4, dtype=torch.int32, device="meta")
        kvc = torch.empty(B, H, n, dtype=torch.int32, device="meta")
        if refused:
            with pytest.raises(ValueError, match="2\\*\\*31"):
                block_sparse_attention(q, q, q, kvi, kvc, 128)
        else:
            from videoblade.kernels.block_sparse import _check

            _check(q, q, q, kvi, kvc, 128)  # passes the geometry checks

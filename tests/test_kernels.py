"""CPU tier for videoblade.kernels: Triton kernels under TRITON_INTERPRET=1 vs the fp32 reference.

Sizes stay tiny (L <= 256, block 16/32) so the whole file runs in well under two minutes on
two cores. Outputs and gradients are written into NaN-poisoned buffers, so an element the
kernel forgets to write fails the comparison.
"""

import math
import os
import zlib

import pytest
import torch
from helpers import rel_err

from videoblade.kernels import (
    Summary,
    block_lists_to_mask,
    block_sparse_attention,
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
    block_sparse_attention_ref,
    estimate_block_importance,
    estimate_block_importance_ref,
    mask_to_block_lists,
    num_blocks,
    pool_levels,
    pool_summaries,
    transpose_block_lists,
)

on_cpu = not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def compiled_calls(fn):
    """``fn`` compiled with a backend that keeps the traced graphs, and the list of the ops those
    graphs call (filled on the first call)."""
    graphs, calls = [], []

    def record(gm, example_inputs):
        graphs.append(gm)
        calls.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    return torch.compile(fn, backend=record), calls


def test_interpreter_is_on_for_cpu():
    # otherwise these tests would not run the Triton kernels at all
    if on_cpu:
        assert os.environ.get("TRITON_INTERPRET") == "1"


def random_mask(B, H, n, density, gen, empty_rows=True, full_rows=True):
    mask = torch.rand(B, H, n, n, generator=gen) < density
    if empty_rows:
        mask[0, 0, min(1, n - 1)] = False
    if full_rows:
        mask[-1, -1, n - 1] = True
        mask[0, -1, 0] = True
    return mask


def random_levels(B, H, n, nlev, gen, empty_row=True):
    """int8 level map [B, H, n, n]: 0 skip, 1 exact, 2.. the pooled levels; one row all skipped."""
    lev = torch.randint(0, nlev + 2, (B, H, n, n), generator=gen).to(torch.int8)
    ar = torch.arange(n)
    lev[-1, -1] = ((ar[:, None] + ar[None, :]) % (nlev + 2)).to(torch.int8)  # every level present
    if empty_row:
        lev[0, 0, min(1, n - 1)] = 0
    return lev


def level_lists(lev, nlev):
    """The pooled levels' stacked block lists (int32 [NLEV, B, H, NQ, NK], [NLEV, B, H, NQ])."""
    lists = [mask_to_block_lists(lev == 2 + i) for i in range(nlev)]
    return torch.stack([a for a, _ in lists]), torch.stack([c for _, c in lists])


# ------------------------------------------------------------------ block lists / summaries


def test_block_lists_roundtrip():
    g = torch.Generator().manual_seed(0)
    mask = random_mask(2, 3, 7, 0.4, g)
    kvi, kvc = mask_to_block_lists(mask)
    assert kvi.dtype == torch.int32 and kvc.dtype == torch.int32
    assert kvi.shape == (2, 3, 7, 7)
    assert torch.equal(kvc, mask.sum(-1).int())
    for b, h, i in [(0, 0, 0), (1, 2, 6), (0, 1, 3)]:
        want = torch.nonzero(mask[b, h, i]).flatten().int()
        assert torch.equal(kvi[b, h, i, : kvc[b, h, i]], want)  # ascending
    assert torch.equal(block_lists_to_mask(kvi, kvc, 7), mask)
    # narrower index
    w = int(kvc.max())
    kvi2, kvc2 = mask_to_block_lists(mask, max_blocks=w)
    assert kvi2.shape[-1] == w and torch.equal(block_lists_to_mask(kvi2, kvc2, 7), mask)
    # garbage beyond the count is ignored
    kvi3 = kvi.clone()
    kvi3[kvi3 == 0] = 5
    valid = torch.arange(7) < kvc.unsqueeze(-1)
    kvi3 = torch.where(valid, kvi, torch.full_like(kvi, 6))
    assert torch.equal(block_lists_to_mask(kvi3, kvc, 7), mask)


@pytest.mark.parametrize("nk,spb,ns_pad", [(40, 4, 0), (7, 1, 5), (9, 8, 0)])
def test_summary_table_from_block_lists(nk, spb, ns_pad):
    # the kernels' bias table, built from the block lists in one launch, against the same table
    # written out in torch: log2(count) per summary, -inf on the kept blocks' summaries and on
    # the padding. nk=40 walks a row's list in more than one chunk of ids; spb=1 masks the
    # summary lane; a partial last group (ns_pad) gives a different count and -inf groups
    from videoblade.kernels.block_sparse import _S_PAD, _summary_operands

    g = torch.Generator().manual_seed(nk)
    mask = random_mask(2, 3, nk, 0.5, g)
    kvi, kvc = mask_to_block_lists(mask)
    ns = nk * spb
    sk = torch.randn(2, 3, ns, 16, generator=g)
    sv = torch.randn(2, 3, ns, 16, generator=g)
    counts = torch.full((ns,), 8.0)
    if ns_pad:
        counts[-ns_pad:] = 0.0
        counts[-ns_pad - 1] = 3.0
    sbias = torch.where(counts > 0, counts.log(), torch.full_like(counts, float("-inf")))
    skp, svp, table, nsp = _summary_operands(sk.to(DEV), sv.to(DEV), sbias.to(DEV), kvi.to(DEV), kvc.to(DEV), spb)
    assert nsp % _S_PAD == 0 and nsp >= ns and table.shape == (2, 3, nk, nsp)
    want = torch.full((2, 3, nk, nsp), float("-inf"))
    want[..., :ns] = torch.where(mask.repeat_interleave(spb, -1), float("-inf"), sbias * math.log2(math.e))
    assert torch.equal(torch.isinf(table.cpu()), torch.isinf(want))
    torch.testing.assert_close(table.cpu(), want, rtol=1e-6, atol=0)
    assert torch.equal(skp[:, :, :ns].cpu(), sk) and torch.equal(svp[:, :, :ns].cpu(), sv)
    assert not skp[:, :, ns:].any() and not svp[:, :, ns:].any()


def test_transpose_block_lists():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(1, 2, 6, 0.5, g)
    kvi, kvc = mask_to_block_lists(mask)
    qi, qc, m = transpose_block_lists(kvi, kvc, 6)
    assert torch.equal(m, mask)
    assert torch.equal(block_lists_to_mask(qi, qc, 6), mask.transpose(-1, -2))


def test_pool_summaries_partial_block():
    B, H, L, D, bs, pool = 1, 2, 45, 4, 16, 8  # 3 blocks, last has 13 tokens: groups of 8, 5
    k = torch.randn(B, H, L, D).to(DEV)
    v = torch.randn(B, H, L, D).to(DEV)
    s = pool_summaries(k, v, bs, pool)
    assert s.k.shape == (B, H, 6, D) and s.bias.shape == (6,) and s.pool == pool
    torch.testing.assert_close(s.k[:, :, 1], k[:, :, 8:16].mean(2))
    torch.testing.assert_close(s.v[:, :, 4], v[:, :, 32:40].mean(2))
    torch.testing.assert_close(s.k[:, :, 5], k[:, :, 40:45].mean(2))
    torch.testing.assert_close(s.bias, torch.tensor([math.log(8)] * 5 + [math.log(5)], device=s.bias.device))
    # 40 tokens, block 16: last block has 8 tokens -> its second group is empty
    s2 = pool_summaries(k[:, :, :40], v[:, :, :40], bs, pool)
    assert s2.bias[-1].item() == float("-inf") and torch.isfinite(s2.bias[:-1]).all()
    with pytest.raises(ValueError):
        pool_summaries(k, v, 16, 6)


@pytest.mark.parametrize("L,bs,pool,D,dtype", [
    (45, 16, 8, 16, torch.float32),   # partial last block: groups of 8 and 5, one empty group
    (40, 16, 8, 32, torch.float16),   # the last block's second group is empty
    (300, 128, 32, 64, torch.float32),
    (130, 32, 4, 16, torch.float32),  # many groups per program
    (200, 128, 128, 16, torch.float32),  # one group larger than a program's 64 rows
], ids=["partial", "empty-group", "block128", "pool4", "pool128"])
def test_pool_kernel_matches_torch(L, bs, pool, D, dtype):
    # the Triton forward (interpreter on CPU) against the torch one, on a strided [B, L, H, D] view
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, L, 3, 2, D, generator=g).to(DEV, dtype)
    k, v = x[:, :, :, 0].transpose(1, 2), x[:, :, :, 1].transpose(1, 2)
    ref = pool_summaries(k, v, bs, pool, backend="torch")
    tri = pool_summaries(k, v, bs, pool, backend="triton")
    assert tri.k.dtype == dtype and tri.k.shape == ref.k.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(tri.k, ref.k, atol=tol, rtol=tol)
    torch.testing.assert_close(tri.v, ref.v, atol=tol, rtol=tol)
    assert torch.equal(tri.bias, ref.bias)
    # the mean of group 1 is the mean of its tokens (not a copy of the torch path's bug-for-bug output)
    torch.testing.assert_close(tri.k[:, :, 1].float(), k[:, :, pool:2 * pool].float().mean(2), atol=tol, rtol=tol)


def test_pool_kernel_gradients_reach_k_and_v():
    g = torch.Generator().manual_seed(3)
    k0, v0 = (torch.randn(1, 2, 45, 16, generator=g).to(DEV) for _ in range(2))
    w = torch.randn(1, 2, 6, 16, generator=g).to(DEV)
    grads = []
    for backend in ("torch", "triton"):
        k, v = k0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        s = pool_summaries(k, v, 16, 8, backend=backend)
        ((s.k * w).sum() + (s.v * w * 2).sum()).backward()
        grads.append((k.grad, v.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    # token t gets w[t // pool] / count: the partial group (tokens 40..44) divides by 5
    torch.testing.assert_close(grads[1][0][0, 0, 42], w[0, 0, 5] / 5)
    with pytest.raises(ValueError):
        pool_summaries(k0, v0, 16, 8, backend="cuda")


@pytest.mark.parametrize("case", ["energy", "energy-text", "energy-tight", "topk-text", "keep-all"])
def test_select_kernel_equals_policy_lists(case):
    # the one-launch Triton selection (interpreter) keeps exactly the policy's blocks
    from videoblade.attention.mask import block_lists, block_mask

    g = torch.Generator().manual_seed(len(case))
    n = 21 if case != "keep-all" else 12
    P = torch.softmax(torch.randn(1, 2, n, n, generator=g) * 3, -1).to(DEV)
    kw = {
        "energy": dict(mode="energy", energy_threshold=0.9, min_retain=0.1, max_retain=0.5),
        "energy-text": dict(mode="energy", energy_threshold=0.8, min_retain=0.05, max_retain=0.3, text_blocks=2),
        "energy-tight": dict(mode="energy", energy_threshold=0.99, min_retain=0.05, max_retain=0.15),
        "topk-text": dict(mode="topk", topk=0.2, text_blocks=3),
        "keep-all": dict(mode="energy", min_retain=1.0, max_retain=1.0),
    }[case]
    ref_i, ref_c = mask_to_block_lists(block_mask(P, **kw))
    ki, kc = block_lists(P, **kw, use_kernel=True)
    assert ki.dtype == torch.int32 and kc.dtype == torch.int32
    assert torch.equal(kc, ref_c)
    assert torch.equal(ki, ref_i)  # kept ids ascending, unused slots 0
    assert torch.equal(block_lists(P, **kw, use_kernel=False)[0], ref_i)


def test_select_kernel_ties_and_empty_rows():
    # equal masses: the kernel breaks ties towards the lower block id, and keeps the same number
    from videoblade.kernels.select import select_block_lists

    n = 16
    P = torch.full((1, 1, n, n), 1.0 / n, device=DEV)
    P[0, 0, 1] = 0.0  # a row with no mass keeps `lo` blocks (and its diagonal)
    ki, kc = select_block_lists(P, 3, 10, 0.5)
    assert ki[0, 0, 0, : kc[0, 0, 0]].tolist() == list(range(8))  # 8 equal blocks reach half the mass
    assert ki[0, 0, 1, : kc[0, 0, 1]].tolist() == [0, 1, 2]  # lo = 3 lowest ids, diagonal 1 among them
    assert ki[0, 0, 9, : kc[0, 0, 9]].tolist() == [*range(8), 9]  # plus the diagonal
    ki, kc = select_block_lists(P, 3, 5, 0.5)
    assert ki[0, 0, 9, : kc[0, 0, 9]].tolist() == [0, 1, 2, 3, 4, 9]  # clamped to hi = 5, plus the diagonal
    with pytest.raises(ValueError):
        select_block_lists(P, 0, 5, 0.5)


@pytest.mark.parametrize("case", ["ties", "zero-rows", "nan", "inf", "negative"])
def test_select_kernel_equals_policy_on_ties_and_odd_values(case):
    # the kernel and the torch policy keep the same blocks, ties included (both to the lower id),
    # on B*H > 1 and odd block counts; NaN and negative estimates count as no mass in both
    from videoblade.attention.mask import block_lists, block_mask

    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    for n in (5, 13):
        P = torch.softmax(torch.randn(2, 3, n, n, generator=g) * 3, -1)
        if case == "ties":
            P = (P * 8).round() / 8
        elif case == "zero-rows":
            P[0, 1, 0] = 0.0
            P[1, 2, n - 1] = 0.0
            P[1, 0, 1] = 0.0
            P[1, 0, 1, n // 2] = 1.0
        elif case == "nan":
            P[0, 0, 0, n // 2] = float("nan")
            P[1, 2, :, 0] = float("nan")
            P[0, 1, 2] = float("nan")
        elif case == "inf":
            P[0, 0, 0, n // 2] = float("inf")
            P[1, 1, n - 1] = float("inf")
            P[1, 2, 1, :2] = float("inf")
        else:
            P[0, 0, 1, :3] = -0.25
            P[1, 1, 2, n - 1] = -0.0
        P = P.to(DEV)
        for kw in (dict(mode="energy", energy_threshold=0.9, min_retain=0.1, max_retain=0.5),
                   dict(mode="energy", energy_threshold=0.5, min_retain=0.05, max_retain=0.3, text_blocks=2),
                   dict(mode="topk", topk=0.35, diagonal=False)):
            ref_i, ref_c = mask_to_block_lists(block_mask(P, **kw))
            ki, kc = block_lists(P, **kw, use_kernel=True)
            assert torch.equal(kc, ref_c), (n, kw)
            assert torch.equal(ki, ref_i), (n, kw)

# ------------------------------------------------------------------ reference semantics


def test_reference_full_mask_is_dense_attention():
    B, H, L, D, bs = 2, 2, 50, 16, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    n = num_blocks(L, bs)
    kvi, kvc = mask_to_block_lists(torch.ones(B, H, n, n, dtype=torch.bool))
    out, lse = block_sparse_attention_ref(q, k, v, kvi, kvc, bs)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_reference_compensation_is_two_partition_merge():
    # out = (e^lse1 out1 + e^lse2 out2) / (e^lse1 + e^lse2), partition 2 = summaries of skipped blocks
    g = torch.Generator().manual_seed(2)
    B, H, L, D, bs, pool = 1, 2, 70, 8, 16, 4
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for _ in range(3))
    n = num_blocks(L, bs)
    mask = random_mask(B, H, n, 0.4, g, full_rows=False)
    mask[0, 0, 2] = True  # one full row: no summary attended
    kvi, kvc = mask_to_block_lists(mask)
    summ = pool_summaries(k, v, bs, pool)
    out, lse = block_sparse_attention_ref(q, k, v, kvi, kvc, bs, summary=summ)
    out1, lse1 = block_sparse_attention_ref(q, k, v, kvi, kvc, bs)
    scale = 1 / math.sqrt(D)
    spb = bs // pool
    s2 = (q @ summ.k.double().transpose(-1, -2)) * scale + summ.bias.double()
    qblk = torch.arange(L) // bs
    sblk = torch.arange(summ.k.shape[2]) // spb
    kept = mask[:, :, qblk][..., sblk]
    s2 = s2.masked_fill(kept, float("-inf"))
    lse2 = torch.logsumexp(s2, -1)
    out2 = torch.nan_to_num(torch.softmax(s2, -1)) @ summ.v.double()
    lse_m = torch.logaddexp(lse1.double(), lse2)
    w1 = torch.exp(lse1.double() - lse_m).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse_m).unsqueeze(-1)
    torch.testing.assert_close(out.double(), w1 * out1.double() + w2 * out2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), lse_m, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(lse).all()  # the empty row attends summaries only


def test_reference_empty_rows_and_chunking():
    g = torch.Generator().manual_seed(3)
    B, H, L, D, bs = 1, 2, 64, 8, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    mask = random_mask(B, H, 4, 0.5, g)
    kvi, kvc = mask_to_block_lists(mask)
    out, lse = block_sparse_attention_ref(q, k, v, kvi, kvc, bs)
    # chunked + checkpointed path gives the same values and grads
    out_c, lse_c = block_sparse_attention_ref(q, k, v, kvi, kvc, bs, max_chunk_elems=1)
    torch.testing.assert_close(out_c, out)
    torch.testing.assert_close(lse_c, lse)
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), do)
    g2 = torch.autograd.grad(out_c, (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
    assert (out[0, 0, 16:32] == 0).all() and (lse[0, 0, 16:32] == float("-inf")).all()


# ------------------------------------------------------------------ kernels vs reference


CASES = [
    # B, H, L, D, block, dtype, density, pool (0 = no compensation)
    (2, 2, 64, 16, 16, torch.float32, 0.4, 0),
    (2, 3, 77, 32, 16, torch.float32, 0.3, 0),
    (1, 2, 200, 64, 32, torch.float16, 0.3, 0),
    (2, 2, 129, 32, 32, torch.float16, 1.0, 0),
    (2, 2, 99, 32, 16, torch.float32, 0.35, 4),
    (1, 3, 256, 64, 32, torch.float16, 0.25, 8),
    (2, 1, 113, 16, 32, torch.float16, 0.5, 16),
]


def _seed(name: str) -> int:
    # a fixed seed per case (str hash() changes with every interpreter run)
    return zlib.crc32(name.encode())


def _fwd_poisoned(q, k, v, kvi, kvc, bs, scale, s_args, **kw):
    """The forward launcher writing into NaN-poisoned out / lse buffers (an unwritten element fails)."""
    B, H, L, D = q.shape
    out = torch.full((B, H, L, D), float("nan"), dtype=q.dtype, device=DEV)
    lse = torch.full((B, H, L), float("nan"), dtype=torch.float32, device=DEV)
    block_sparse_attention_fwd(q, k, v, kvi, kvc, bs, scale, *s_args, out=out, lse=lse, **kw)
    return out, lse


def _check_fwd(out, lse, out_r, lse_r, tol):
    """out within tol of the reference, lse finite exactly where the reference's is (-inf elsewhere)
    and close there; returns the reference's finite mask."""
    assert rel_err(out, out_r) < tol
    fin = torch.isfinite(lse_r)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[~fin] == float("-inf")).all()
    assert (lse[fin] - lse_r[fin]).abs().max().item() < 10 * tol
    return fin


def _ids(c):
    B, H, L, D, bs, dt, dens, pool = c
    return f"B{B}-H{H}-L{L}-D{D}-blk{bs}-{str(dt).split('.')[-1]}-d{dens}-pool{pool}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kernel_fwd_bwd_matches_reference(case):
    B, H, L, D, bs, dtype, density, pool = case
    g = torch.Generator().manual_seed(_seed(_ids(case)))
    n = num_blocks(L, bs)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEV, dtype) for _ in range(3))
    mask = random_mask(B, H, n, density, g)
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask))
    scale = 1.0 / math.sqrt(D)
    summ = pool_summaries(k, v, bs, pool) if pool else None
    sk, sv, sb = (summ.k, summ.v, summ.bias) if summ else (None, None, None)

    nan = float("nan")
    out, lse = _fwd_poisoned(q, k, v, kvi, kvc, bs, scale, (sk, sv, sb))

    # reference in fp32 on the same (rounded) inputs, summaries as leaves
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    summ_r = Summary(sk.float().requires_grad_(), sv.float().requires_grad_(), sb, pool) if summ else None
    out_r, lse_r = block_sparse_attention_ref(qr, kr, vr, kvi, kvc, bs, scale, summary=summ_r)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    fin = _check_fwd(out, lse, out_r, lse_r, tol)
    if not pool:
        assert (~fin).any()  # the forced empty row is really tested
        assert (out[~fin] == 0).all()

    do = torch.randn(B, H, L, D, generator=g).to(DEV, dtype)
    grads = [torch.full_like(t, nan) for t in (q, k, v)]
    sgrads = [torch.full_like(sk, nan), torch.full_like(sv, nan)] if summ else [None, None]
    res = block_sparse_attention_bwd(do, q, k, v, out, lse, kvi, kvc, bs, scale, sk, sv, sb, *grads, *sgrads)
    leaves = [qr, kr, vr] + ([summ_r.k, summ_r.v] if summ else [])
    ref_grads = torch.autograd.grad(out_r, leaves, do.float())
    for name, got, want in zip(["dq", "dk", "dv", "dsk", "dsv"], res, ref_grads):
        err = rel_err(got, want)
        assert err < 2 * tol, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[_ids(CASES[1]), _ids(CASES[4])])
def test_kernel_tma_descriptor_path(case, monkeypatch):
    # the tensor-descriptor (TMA) loads used on Hopper, run by the interpreter
    monkeypatch.setenv("VIDEOBLADE_KERNEL_TMA", "1")
    test_kernel_fwd_bwd_matches_reference(case)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=[_ids(CASES[1]), _ids(CASES[5])])
def test_kernel_block_id_walks_are_equal(case, monkeypatch):
    # the two ways the kernels walk a row's block list (VIDEOBLADE_KERNEL_IDS: the id loaded one
    # tile ahead, or per tile) visit the same tiles in the same order, so every output is
    # bit-equal. Lists narrower than NK (max_blocks) check the clamp of the look-ahead at the end
    # of each list; an empty row and several tiles per block (block 32, 16-row interpreter
    # tiles) are in the cases.
    from videoblade.kernels import block_sparse as bsmod

    B, H, L, D, bs, dtype, density, pool = case
    g = torch.Generator().manual_seed(7)
    n = num_blocks(L, bs)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEV, dtype) for _ in range(3))
    mask = random_mask(B, H, n, density, g, full_rows=False)
    mask[..., n // 2] = False  # no row is full: the lists are narrower than NK
    mask[0, 0, 0] = False  # an empty row
    width = int(mask.sum(-1).max())
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask, max_blocks=width))
    assert kvi.shape[-1] == width and width < n
    summ = pool_summaries(k, v, bs, pool) if pool else None
    sargs = (summ.k, summ.v, summ.bias) if summ else (None, None, None)
    do = torch.randn(B, H, L, D, generator=g).to(DEV, dtype)

    def run():  # under the VIDEOBLADE_KERNEL_IDS set by the caller
        out, lse = block_sparse_attention_fwd(q, k, v, kvi, kvc, bs, 0.3, *sargs)
        grads = block_sparse_attention_bwd(do, q, k, v, out, lse, kvi, kvc, bs, 0.3, *sargs)
        return [out, lse, *(x for x in grads if x is not None)]

    ahead, results = {}, {}
    for mode in ("prefetch", "load"):
        monkeypatch.setenv("VIDEOBLADE_KERNEL_IDS", mode)
        ahead[mode] = bsmod._ids_ahead()
        results[mode] = run()
    assert ahead == {"prefetch": True, "load": False}
    monkeypatch.setenv("VIDEOBLADE_KERNEL_IDS", "bogus")
    with pytest.raises(ValueError, match="VIDEOBLADE_KERNEL_IDS"):
        bsmod._ids_ahead()
    assert len(results["load"]) == (7 if pool else 5)
    for a, b in zip(results["prefetch"], results["load"]):
        assert torch.equal(a, b)
    # and the walk is the right one, not merely the same in both
    ref = block_sparse_attention_ref(q, k, v, kvi, kvc, bs, 0.3, summ)[0]
    assert rel_err(results["prefetch"][0], ref) < 1e-2


# ------------------------------------------------------------------ multi-level (SPEC 1.6)


def _brute_force_levels(q, k, v, lev, pools, bs, scale, pool=0):
    """Row by row in float64, from the definitions: a query attends the tokens of its exact blocks,
    the pooled tokens (mean of `p` consecutive tokens, logit + log(count)) of its level-p blocks
    and, with `pool`, the summaries of every block it attends at no level."""
    B, H, L, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, L, D, dtype=torch.float64)

    def pooled(x, b, h, blk, p):
        toks = x[b, h, blk * bs : min(L, (blk + 1) * bs)]
        groups = toks.split(p)
        return torch.stack([g.mean(0) for g in groups]), torch.tensor([math.log(len(g)) for g in groups])

    for b in range(B):
        for h in range(H):
            for i in range(L):
                row = lev[b, h, i // bs]
                keys, vals, bias = [], [], []
                for j, lv in enumerate(row.tolist()):
                    if lv == 1:
                        sl = slice(j * bs, min(L, (j + 1) * bs))
                        keys.append(k[b, h, sl]), vals.append(v[b, h, sl])
                        bias.append(torch.zeros(keys[-1].shape[0], dtype=torch.float64))
                    elif lv >= 2 or pool:
                        p = pools[lv - 2] if lv >= 2 else pool
                        pk, pb = pooled(k, b, h, j, p)
                        keys.append(pk), vals.append(pooled(v, b, h, j, p)[0]), bias.append(pb.double())
                if not keys:
                    continue
                s_ = torch.cat(keys) @ q[b, h, i] * scale + torch.cat(bias)
                out[b, h, i] = torch.softmax(s_, 0) @ torch.cat(vals)
    return out


def test_reference_levels_from_the_definition():
    g = torch.Generator().manual_seed(21)
    B, H, L, D, bs, pools = 1, 2, 45, 8, 16, (2, 4)
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for _ in range(3))
    n = num_blocks(L, bs)
    lev = random_levels(B, H, n, len(pools), g)
    kvi, kvc = mask_to_block_lists(lev == 1)
    levels = pool_levels(k, v, bs, pools, *level_lists(lev, len(pools)))
    for pool in (0, 8):
        summ = pool_summaries(k, v, bs, pool) if pool else None
        out, lse = block_sparse_attention_ref(q, k, v, kvi, kvc, bs, summary=summ, levels=levels)
        want = _brute_force_levels(q, k, v, lev, pools, bs, D**-0.5, pool)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(lse).all() == bool(pool)  # the all-skipped row is empty without summaries


LEVEL_CASES = [
    # B, H, L, D, block, dtype, pools, compensation pool (0 = none)
    (1, 2, 96, 16, 32, torch.float32, (2,), 0),
    (2, 2, 100, 32, 32, torch.float16, (2,), 8),
    (1, 2, 256, 16, 64, torch.float32, (2, 4), 16),
    (1, 2, 300, 32, 128, torch.float16, (2, 4, 8), 32),
]


def _lids(c):
    B, H, L, D, bs, dt, pools, pool = c
    return f"B{B}-H{H}-L{L}-D{D}-blk{bs}-{str(dt).split('.')[-1]}-levels{'x'.join(map(str, pools))}-pool{pool}"


@pytest.mark.parametrize("case", LEVEL_CASES, ids=[_lids(c) for c in LEVEL_CASES])
def test_kernel_levels_fwd_bwd_matches_reference(case):
    # pooled levels walked in the forward and dq kernels, their dk/dv by the key-major kernel over
    # each level's pooled rows; with compensation the summary table skips blocks seen at a level
    from videoblade.kernels.blocks import PooledLevels

    B, H, L, D, bs, dtype, pools, pool = case
    g = torch.Generator().manual_seed(_seed(_lids(case)))
    n = num_blocks(L, bs)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEV, dtype) for _ in range(3))
    lev = random_levels(B, H, n, len(pools), g)
    assert all((lev == i).any() for i in range(len(pools) + 2))
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(lev == 1))
    pidx, pcnt = (t.to(DEV) for t in level_lists(lev, len(pools)))
    levels = pool_levels(k, v, bs, pools, pidx, pcnt)
    summ = pool_summaries(k, v, bs, pool) if pool else None
    s_args = (summ.k, summ.v, summ.bias) if summ else (None, None, None)
    l_args = (torch.cat([s.k for s in levels.summaries], 2), torch.cat([s.v for s in levels.summaries], 2),
              torch.cat([s.bias for s in levels.summaries]), pidx, pcnt, pools)
    scale = 1.0 / math.sqrt(D)
    nan = float("nan")
    out, lse = _fwd_poisoned(q, k, v, kvi, kvc, bs, scale, s_args, levels=l_args)

    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    lev_r = PooledLevels(tuple(Summary(s.k.float().requires_grad_(), s.v.float().requires_grad_(), s.bias, s.pool)
                               for s in levels.summaries), pidx, pcnt)
    summ_r = Summary(summ.k.float().requires_grad_(), summ.v.float().requires_grad_(), summ.bias, pool) if summ else None
    out_r, lse_r = block_sparse_attention_ref(qr, kr, vr, kvi, kvc, bs, scale, summary=summ_r, levels=lev_r)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert _check_fwd(out, lse, out_r, lse_r, tol).all() == bool(pool)

    do = torch.randn(B, H, L, D, generator=g).to(DEV, dtype)
    grads = [torch.full_like(t, nan) for t in (q, k, v)]
    res = block_sparse_attention_bwd(do, q, k, v, out, lse, kvi, kvc, bs, scale, *s_args, *grads, levels=l_args)
    leaves = [qr, kr, vr] + ([summ_r.k, summ_r.v] if summ else [])
    leaves += [s.k for s in lev_r.summaries] + [s.v for s in lev_r.summaries]
    ref = torch.autograd.grad(out_r, leaves, do.float())
    nl = len(pools)
    ref_pk, ref_pv = torch.cat(ref[-2 * nl : -nl], 2), torch.cat(ref[-nl:], 2)
    got = [("dq", res[0], ref[0]), ("dk", res[1], ref[1]), ("dv", res[2], ref[2]),
           ("dpk", res[5], ref_pk), ("dpv", res[6], ref_pv)]
    if summ:
        got += [("dsk", res[3], ref[3]), ("dsv", res[4], ref[4])]
    else:
        assert res[3] is None and res[4] is None
    for name, a, b in got:
        err = rel_err(a, b)
        assert err < 2 * tol, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("case", [LEVEL_CASES[-1]], ids=[_lids(LEVEL_CASES[-1])])
def test_kernel_levels_through_tma_descriptors(case, monkeypatch):
    # head dim 128 on Hopper streams K/V and Q/dO through TMA descriptors by default: the level
    # walks and their dk/dv run alongside those loads
    monkeypatch.setenv("VIDEOBLADE_KERNEL_TMA", "1")
    test_kernel_levels_fwd_bwd_matches_reference(case)


def test_tma_default_follows_head_dim_and_gpu():
    from videoblade.kernels import block_sparse as bsa

    if bsa.TensorDescriptor is None:
        pytest.skip("this triton has no host-side tensor descriptors")
    want = bsa._tma_wanted
    assert want("auto", 128, (9, 0)) and want("auto", 128, (10, 0))  # Hopper, Blackwell at D=128
    assert not want("auto", 64, (9, 0))  # CogVideoX's head dim: measured slower, stays off
    assert not want("auto", 128, (8, 0))  # no TMA before Hopper
    assert not want("auto", 128, None)  # the interpreter takes it only when asked
    assert want("1", 64, (9, 0)) and want("1", 16, None) and not want("1", 128, (8, 9))
    assert not want("0", 128, (9, 0))
    with pytest.raises(ValueError, match="VIDEOBLADE_KERNEL_TMA"):
        want("yes", 128, (9, 0))


def test_public_fn_autograd_through_levels():
    # grads reach k and v through every level's pooling and the compensation summaries
    g = torch.Generator().manual_seed(12)
    B, H, L, D, bs, pools, pool = 1, 2, 120, 16, 32, (2,), 8
    n = num_blocks(L, bs)
    base = [torch.randn(B, H, L, D, generator=g).to(DEV) for _ in range(3)]
    lev = random_levels(B, H, n, len(pools), g)
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(lev == 1))
    lists = [t.to(DEV) for t in level_lists(lev, len(pools))]
    do = torch.randn(B, H, L, D, generator=g).to(DEV)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out, _ = fn(q, k, v, kvi, kvc, bs, summary=pool_summaries(k, v, bs, pool),
                    levels=pool_levels(k, v, bs, pools, *lists))
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    for a, b in zip(run(block_sparse_attention), run(block_sparse_attention_ref)):
        assert rel_err(a, b) < 1e-5


def test_levels_mark_the_summary_table_and_are_checked():
    # a block attended at a pooled level is not summarised; the kernels refuse levels they cannot walk
    from videoblade.kernels.block_sparse import _level_ops, _summary_operands, check_levels

    g = torch.Generator().manual_seed(13)
    n, spb = 6, 2
    lev = random_levels(1, 2, n, 2, g)
    kvi, kvc = mask_to_block_lists(lev == 1)
    pidx, pcnt = level_lists(lev, 2)
    sk = torch.randn(1, 2, n * spb, 16, generator=g)
    bias = torch.zeros(n * spb)
    lv = _level_ops(sk, sk, torch.zeros(3), pidx, pcnt, (2, 4))
    _, _, table, nsp = _summary_operands(sk.to(DEV), sk.to(DEV), bias.to(DEV), kvi.to(DEV), kvc.to(DEV), spb,
                                         lv._replace(idx=lv.idx.to(DEV), cnt=lv.cnt.to(DEV)))
    seen = (lev > 0).repeat_interleave(spb, -1)
    assert torch.equal(torch.isinf(table[..., : n * spb].cpu()), seen)
    for bad in ([2, 4, 8, 16], [4, 2], [3], [1], [16]):
        with pytest.raises(ValueError):
            check_levels(bad, 128)
    check_levels([2, 4, 8], 128)
    with pytest.raises(ValueError, match="16 pooled rows"):
        check_levels([4], 32)


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_tile_configs_never_span_two_blocks(block):
    # on the GPU the autotuner's configs set the tiles (the interpreter takes its own small ones, so
    # the kernel tests above cannot see this): a query or key tile wider than a block would read one
    # block's list or bias row for rows of the next. Block 16 once got a 128-row summary dk/dv tile.
    from videoblade.kernels import block_sparse as bsk

    for kern in (bsk._fwd_k, bsk._dq_k, bsk._dkv_k, bsk._dsum_k):
        cfgs = kern.prune(kern.configs, {}, BLOCK=block)
        assert cfgs
        for c in cfgs:
            assert c.kwargs["BLOCK_M"] <= block and c.kwargs.get("BLOCK_N", 0) <= block, (kern.kernel.__name__, c)
    # the dk/dv pass over a pooled level: key tiles within one block's pooled rows
    for rows in (16, 32, 64):
        for c in bsk._dkv_k.prune(bsk._dkv_k.configs, {}, BLOCK=block, KROWS=min(rows, block)):
            assert c.kwargs["BLOCK_N"] <= min(rows, block) and c.kwargs["BLOCK_M"] <= block


def test_public_fn_autograd_through_summaries():
    # grads reach k and v through pool_summaries (torch) and the kernel's summary grads
    g = torch.Generator().manual_seed(11)
    B, H, L, D, bs, pool = 1, 2, 90, 32, 32, 8
    n = num_blocks(L, bs)
    base = [torch.randn(B, H, L, D, generator=g).to(DEV) for _ in range(3)]
    mask = random_mask(B, H, n, 0.4, g)
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask))
    do = torch.randn(B, H, L, D, generator=g).to(DEV)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out, lse = fn(q, k, v, kvi, kvc, bs, summary=pool_summaries(k, v, bs, pool))
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    got = run(block_sparse_attention)
    want = run(block_sparse_attention_ref)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_custom_op_traces_under_compile():
    g = torch.Generator().manual_seed(5)
    B, H, L, D, bs = 1, 2, 48, 16, 16
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(DEV).requires_grad_() for _ in range(3))
    mask = random_mask(B, H, 3, 0.6, g, empty_rows=False)
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask))

    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, kvi, kvc, bs)
        return (out * 2).sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = cf(q, k, v)
    gq = torch.autograd.grad(loss, q)[0]
    loss_e = f(q, k, v)
    gq_e = torch.autograd.grad(loss_e, q)[0]
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(gq, gq_e)


def test_outputs_in_the_processors_layout():
    # out and the gradients come back as [B, H, L, D] views of [B, L, H, D] memory, whatever the
    # inputs' layout (so the processors' transpose back to [B, L, H * D] is a view, not a copy),
    # with equal values for the processors' transposed views and for contiguous inputs
    g = torch.Generator().manual_seed(12)
    B, H, L, D, bs = 2, 2, 40, 16, 16
    base = [torch.randn(B, L, H, D, generator=g).to(DEV) for _ in range(3)]
    mask = random_mask(B, H, 3, 0.6, g, empty_rows=False)
    kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask))
    do = torch.randn(B, H, L, D, generator=g).to(DEV)
    res = {}
    for layout in ("blhd", "bhld"):
        q, k, v = (x.transpose(1, 2) if layout == "blhd" else x.transpose(1, 2).contiguous() for x in base)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        summ = pool_summaries(k, v, bs, 8)
        out, _ = block_sparse_attention(q, k, v, kvi, kvc, bs, summary=summ)
        grads = torch.autograd.grad(out, (q, k, v), do)
        for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            assert t.transpose(1, 2).is_contiguous(), (layout, name, t.stride())
        res[layout] = (out, *grads)
    for a, b in zip(res["blhd"], res["bhld"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_levels", [False, True])
def test_custom_op_opcheck(with_levels):
    # q, k, v as the diffusers processors pass them: [B, L, H, D] transposed to [B, H, L, D]; the
    # fake impls must give the real ops' strides (a stride mismatch fails inductor at run time)
    g = torch.Generator().manual_seed(6)
    B, H, L, D, bs = 1, 2, 80, 16, 32
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEV).transpose(1, 2).requires_grad_() for _ in range(3))
    assert not q.is_contiguous()
    n = num_blocks(L, bs)
    if with_levels:
        lev = random_levels(B, H, n, 1, g)
        kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(lev == 1))
        pidx, pcnt = (t.to(DEV) for t in level_lists(lev, 1))
        pl = pool_summaries(k.detach(), v.detach(), bs, 2)
        l_args = (pl.k.requires_grad_(), pl.v.requires_grad_(), pl.bias, pidx, pcnt, [2])
    else:
        mask = random_mask(B, H, n, 0.6, g, empty_rows=False)
        kvi, kvc = (t.to(DEV) for t in mask_to_block_lists(mask))
        l_args = (None, None, None, None, None, [])
    summ = pool_summaries(k.detach(), v.detach(), bs, 8)
    sk, sv = summ.k.requires_grad_(), summ.v.requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.videoblade.block_sparse_attn_fwd.default,
                          (q, k, v, kvi, kvc, bs, 0.25, sk, sv, summ.bias, *l_args), test_utils=utils)
    with torch.no_grad():
        out, lse = torch.ops.videoblade.block_sparse_attn_fwd(q, k, v, kvi, kvc, bs, 0.25, sk, sv, summ.bias, *l_args)
    do = torch.randn(B, L, H, D, generator=g).to(DEV).transpose(1, 2)
    l_det = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in l_args)
    for s_args in ((sk.detach(), sv.detach(), summ.bias), (None, None, None)):
        torch.library.opcheck(torch.ops.videoblade.block_sparse_attn_bwd.default,
                              (do, q.detach(), k.detach(), v.detach(), out, lse, kvi, kvc, bs, 0.25, *s_args, *l_det),
                              test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------ block importance


@pytest.mark.parametrize("L,bs,S", [(100, 16, 4), (128, 32, 16), (75, 16, 8)])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_estimate_sample_matches_torch(L, bs, S, layout):
    # the kernel reads the samples in place through the strides: the processors' [B, L, H, D]
    # projections seen as [B, H, L, D] views give the same map as contiguous tensors
    g = torch.Generator().manual_seed(L)
    B, H, D = 2, 2, 32
    if layout == "bhld":
        q, k = (torch.randn(B, H, L, D, generator=g).to(DEV) for _ in range(2))
    else:
        q, k = (torch.randn(B, L, H, D, generator=g).to(DEV).transpose(1, 2) for _ in range(2))
    P = estimate_block_importance(q, k, bs, S, mode="sample")
    P_ref = estimate_block_importance_ref(q, k, bs, S, mode="sample")
    n = num_blocks(L, bs)
    assert P.shape == (B, H, n, n) and P.dtype == torch.float32
    torch.testing.assert_close(P.sum(-1), torch.ones(B, H, n, device=DEV), rtol=1e-4, atol=1e-4)
    assert rel_err(P, P_ref) < 1e-4


def test_estimate_finds_planted_structure():
    # keys of block j equal the queries of block j (scaled): the diagonal must dominate
    g = torch.Generator().manual_seed(9)
    L, D, bs = 96, 16, 16
    centers = torch.randn(6, D, generator=g) * 3
    q = centers.repeat_interleave(bs, 0)[None, None] + 0.1 * torch.randn(1, 1, L, D, generator=g)
    k = q.clone()
    for mode in ("sample", "mean"):
        P = estimate_block_importance(q.to(DEV), k.to(DEV), bs, 4, mode=mode)
        assert (P[0, 0].argmax(-1).cpu() == torch.arange(6)).all(), mode
        torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))


def test_estimate_mean_partial_block_bias():
    # identical keys everywhere: mass is proportional to each block's token count
    B, H, L, D, bs = 1, 1, 40, 8, 16  # block sizes 16, 16, 8
    q = torch.randn(B, H, L, D)
    k = torch.ones(B, H, L, D)
    for mode in ("mean", "sample"):
        P = estimate_block_importance(q.to(DEV), k.to(DEV), bs, 8, mode=mode)
        torch.testing.assert_close(P[0, 0].cpu(), torch.tensor([0.4, 0.4, 0.2]).expand(3, 3), rtol=1e-4, atol=1e-4)


def test_estimate_runs_inside_torch_compile():
    # the Triton estimate is an opaque custom op for torch.compile (inductor's own tracing of the
    # user kernel mis-typed its scale argument); a compiled caller must get the eager result
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 200, 32, generator=g).to(DEV) for _ in range(2))
    eager = estimate_block_importance(q, k, block_size=32, samples_per_block=8)
    compiled = torch.compile(lambda a, b: estimate_block_importance(a, b, block_size=32, samples_per_block=8) * 2.0)
    torch.testing.assert_close(compiled(q, k), eager * 2.0)
    torch.library.opcheck(torch.ops.videoblade.estimate_sampled.default,
                          (q, k, 32, 8, 0.2), test_utils=("test_schema", "test_faketensor"))
    # the cached sampling plan is looked up inside the op: the traced graph holds the op and the
    # multiply only, no rebuilt positions (arange, repeat_interleave) in every compiled call
    fn, calls = compiled_calls(lambda a, b: estimate_block_importance(a, b, block_size=32, samples_per_block=8) * 2.0)
    torch.testing.assert_close(fn(q, k), eager * 2.0)
    assert any("estimate_sampled" in c for c in calls), calls
    assert not any(("arange" in c) or ("repeat_interleave" in c) or ("index_select" in c) for c in calls), calls


def test_estimate_geometry_traces_without_cached_tensors():
    # the block geometry (token counts, the partial last block's bias, sample positions) is Python
    # arithmetic in every path torch.compile traces (mean mode, the torch reference): dynamo warned
    # about an lru_cache-wrapped tensor builder there and rebuilt it in every compiled call. Values
    # equal eager, the partial last block included (L = 200 = 6 x 32 + 8)
    import warnings

    g = torch.Generator().manual_seed(13)
    q, k = (torch.randn(1, 2, 200, 32, generator=g).to(DEV) for _ in range(2))
    for fn in (lambda a, b: estimate_block_importance(a, b, block_size=32, mode="mean"),
               lambda a, b: estimate_block_importance_ref(a, b, block_size=32, samples_per_block=8),
               lambda a, b: estimate_block_importance_ref(a, b, block_size=32, mode="mean")):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(fn, backend="aot_eager")(q, k)
        assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
        torch.testing.assert_close(got, fn(q, k), rtol=1e-5, atol=1e-6)
    # the partial block's mass: identical keys give each key block its share of the tokens
    P = estimate_block_importance(q, torch.ones_like(k), block_size=32, mode="mean")
    want = torch.tensor([32.0] * 6 + [8.0]) / 200
    torch.testing.assert_close(P[0, 0, 0].cpu(), want, rtol=1e-5, atol=1e-6)


def test_selection_and_pooling_run_inside_torch_compile():
    # both new launches are opaque custom ops (fake implementations give the shapes): a compiled
    # caller gets the eager lists and summaries, and the ops pass opcheck's schema/fake checks
    from videoblade.attention.mask import block_lists

    g = torch.Generator().manual_seed(4)
    P = torch.softmax(torch.randn(1, 2, 12, 12, generator=g) * 3, -1).to(DEV)
    k, v = (torch.randn(1, 2, 90, 16, generator=g).to(DEV) for _ in range(2))

    def fn(P, k, v):
        kvi, kvc = block_lists(P, "energy", 0.9, 0.1, 0.5, use_kernel=True)
        s = pool_summaries(k, v, 16, 8, backend="triton")
        return kvi, kvc + 1, s.k * 2.0, s.v

    eager = fn(P, k, v)
    for a, b in zip(torch.compile(fn)(P, k, v), eager):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.videoblade.select_block_lists.default, (P, 2, 6, 0.9, 1, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.videoblade.pool_summaries_fwd.default, (k, v, 16, 8, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.videoblade.pool_geometry.default, (k, 16, 8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pooling_compiled_with_gradients(backend):
    # compiled training runs the pooling under autograd: the compiled summaries, bias and k/v
    # gradients equal eager ones, and the pool geometry (counts, log bias) enters the graph as the
    # cached tensors through one opaque op, not as ops rebuilding them on every call. L=70 leaves
    # a partial last block of 6 tokens: groups of 6, 0, 0, 0 (bias log 6, then -inf)
    g = torch.Generator().manual_seed(5)
    k0, v0, w = (torch.randn(1, 2, 70, 16, generator=g).to(DEV) for _ in range(3))

    def fn(k, v):
        s = pool_summaries(k, v, 32, 8, backend=backend)
        return (s.k * w[:, :, : s.k.shape[2]]).sum() + s.v.float().pow(2).sum(), s.bias

    def run(f):
        k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
        loss, bias = f(k, v)
        loss.backward()
        return loss.detach(), bias, k.grad, v.grad

    eager = run(fn)
    assert torch.isinf(eager[1]).any() and (eager[1][:4] == math.log(8)).all()
    compiled, calls = compiled_calls(fn)
    for got, want in zip(run(compiled), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any("pool_geometry" in c for c in calls), calls
    assert not any(c in ("log", "clamp") or "method full" in c for c in calls), calls  # the counts, rebuilt


def test_mixed_dtypes_are_refused_with_a_message():
    # on the GPU tl.dot would fail to compile instead
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="share one dtype"):
        block_sparse_attention(q, q.half(), q, *mask_to_block_lists(torch.ones(1, 1, 2, 2, dtype=torch.bool)), 16)


def test_untuned_launch_falls_back_when_a_config_runs_out_of_resources(monkeypatch):
    # VIDEOBLADE_KERNEL_AUTOTUNE=0 takes the first config that fits the block; a config that
    # overflows shared memory (fp32 at D=128 on an H100) must give way to the next one
    from triton.runtime.errors import OutOfResources

    from videoblade.kernels import block_sparse as bsk

    class FakeKernel:  # records each config it is launched with; the first `fail` launches overflow
        def __init__(self, fail):
            self.fail, self.tried = fail, []

        def __getitem__(self, grid):
            def run(*args, **kw):
                self.tried.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
                if len(self.tried) <= self.fail:
                    raise OutOfResources(263168, 232448, "shared memory")
            return run

    monkeypatch.setenv("VIDEOBLADE_KERNEL_AUTOTUNE", "0")
    kern = bsk._Kernel(bsk._fwd_kernel, bsk._FWD_CONFIGS, bsk._KEY, bsk._prune)
    kern.kernel = FakeKernel(fail=2)
    kern.launch(lambda meta: (1,), (), {"BLOCK": 128}, {})
    assert len(kern.kernel.tried) == 3 and len(set(kern.kernel.tried)) == 3
    kern.kernel = FakeKernel(fail=100)  # nothing fits: the error surfaces
    with pytest.raises(OutOfResources):
        kern.launch(lambda meta: (1,), (), {"BLOCK": 128}, {})

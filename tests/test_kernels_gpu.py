"""GPU tier for videoblade.kernels (skipped without CUDA).

The flash-attention rule: the bf16/fp16 kernel's error against a float32 reference may be
at most about 2x the error of a naive same-dtype torch implementation of the same masked
attention, for the output and for every gradient. Real shapes (Wan 1x12x32760x128,
CogVideoX 1x48x17776x64) and odd lengths; buffers are NaN-poisoned before each run.
"""

import math

import pytest
import torch
from helpers import rel_err

from videoblade.kernels import (
    Summary,
    block_sparse_attention,
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
    block_sparse_attention_ref,
    estimate_block_importance,
    estimate_block_importance_ref,
    mask_to_block_lists,
    num_blocks,
    pool_summaries,
)

pytestmark = pytest.mark.gpu


def random_mask(B, H, n, density, gen):
    keep = max(1, round(density * n))
    scores = torch.rand(B, H, n, n, generator=gen, device="cuda")
    idx = torch.arange(n, device="cuda")
    scores[..., idx, idx] = 2.0
    mask = torch.zeros(B, H, n, n, dtype=torch.bool, device="cuda")
    mask.scatter_(-1, scores.topk(keep, -1).indices, True)
    mask[0, 0, 1] = False  # an empty row
    mask[0, -1, -1] = True  # a full row
    return mask


def _check(B, H, L, D, block, dtype, density, pool, chunk=1 << 28):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(L * 7 + D)
    n = num_blocks(L, block)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    do = torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g)
    mask = random_mask(B, H, n, density, g)
    kvi, kvc = mask_to_block_lists(mask)
    scale = 1 / math.sqrt(D)
    summ = pool_summaries(k, v, block, pool) if pool else None
    sk, sv, sb = (summ.k, summ.v, summ.bias) if summ else (None, None, None)

    nan = float("nan")
    out = torch.full_like(q, nan)
    lse = torch.full((B, H, L), nan, device="cuda")
    block_sparse_attention_fwd(q, k, v, kvi, kvc, block, scale, sk, sv, sb, out=out, lse=lse)
    grads = [torch.full_like(t, nan) for t in (q, k, v)] + ([torch.full_like(sk, nan), torch.full_like(sv, nan)]
                                                          if summ else [None, None])
    got = block_sparse_attention_bwd(do, q, k, v, out, lse, kvi, kvc, block, scale, sk, sv, sb, *grads)

    def ref(compute_dtype):
        leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        s_ = None
        if summ:
            s_ = Summary(sk.to(compute_dtype).requires_grad_(), sv.to(compute_dtype).requires_grad_(), sb, pool)
            leaves += [s_.k, s_.v]
        o, ls = block_sparse_attention_ref(*leaves[:3], kvi, kvc, block, scale, summary=s_, max_chunk_elems=chunk,
                                           compute_dtype=compute_dtype)
        gr = torch.autograd.grad(o, leaves, do.to(compute_dtype))
        return o.detach(), ls.detach(), gr

    o32, l32, g32 = ref(torch.float32)
    olo, _, glo = ref(dtype)
    fin = torch.isfinite(l32)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - l32[fin]).abs().max().item() < 2e-2
    report = {}
    for name, a, naive, want in zip(["out", "dq", "dk", "dv", "dsk", "dsv"], [out, *got], [olo, *glo], [o32, *g32]):
        if want is None:
            continue
        e_k, e_n = rel_err(a, want), rel_err(naive, want)
        report[name] = (e_k, e_n)
        assert e_k <= 2 * e_n + 1e-4, f"{name}: kernel {e_k:.2e} vs naive {dtype} {e_n:.2e}"
    print(B, H, L, D, block, dtype, density, pool, {k_: f"{a:.2e}/{b:.2e}" for k_, (a, b) in report.items()})


@pytest.mark.parametrize(
    "B,H,L,D,block,dtype,density,pool",
    [
        (1, 12, 32760, 128, 128, torch.bfloat16, 0.15, 0),
        (1, 48, 17776, 64, 128, torch.bfloat16, 0.15, 16),
        (2, 3, 1000, 64, 64, torch.float16, 0.3, 16),
        (1, 2, 2309, 128, 128, torch.bfloat16, 0.4, 32),
        (2, 2, 2048, 128, 128, torch.bfloat16, 0.25, 0),
        (1, 4, 4097, 64, 128, torch.bfloat16, 1.0, 0),
    ],
    ids=["wan-bf16", "cog-bf16-comp", "odd1000-fp16-blk64-comp", "odd2309-bf16-comp", "even2048-bf16", "dense4097"],
)
def test_gpu_kernel_vs_reference(B, H, L, D, block, dtype, density, pool):
    _check(B, H, L, D, block, dtype, density, pool)


@pytest.mark.parametrize("L,D,block,dtype,pool", [(4097, 128, 128, torch.bfloat16, 32), (1000, 64, 64, torch.float16, 16)],
                         ids=["odd4097-bf16-comp", "odd1000-fp16-blk64-comp"])
def test_gpu_block_id_walks_are_equal(L, D, block, dtype, pool, monkeypatch):
    # the block ids loaded one tile ahead (default) or per tile (VIDEOBLADE_KERNEL_IDS) visit
    # the same tiles in the same order; the autotuner's cache (keyed without IDS_AHEAD) gives
    # both the same tile config, so every output is equal
    g = torch.Generator(device="cuda").manual_seed(11)
    B, H = 2, 3
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    kvi, kvc = mask_to_block_lists(random_mask(B, H, num_blocks(L, block), 0.3, g))
    summ = pool_summaries(k, v, block, pool)

    def run(mode):
        monkeypatch.setenv("VIDEOBLADE_KERNEL_IDS", mode)
        out, lse = block_sparse_attention_fwd(q, k, v, kvi, kvc, block, 0.1, summ.k, summ.v, summ.bias)
        return [out, lse, *block_sparse_attention_bwd(do, q, k, v, out, lse, kvi, kvc, block, 0.1, summ.k, summ.v,
                                                      summ.bias)]

    for a, b in zip(run("prefetch"), run("load")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("L,H,D,pools,fractions,pool", [
    (32760, 12, 128, (2, 4, 8), (0.05, 0.10, 0.15, 0.20), 32),
    (17776, 8, 64, (2, 4), (0.05, 0.15, 0.2), 16),
    (4097, 4, 128, (4,), (0.1, 0.3), 0),
], ids=["wan-3levels-comp", "cog-2levels-comp", "odd4097-1level"])
def test_gpu_levels_vs_reference(L, H, D, pools, fractions, pool):
    # multi-level (SPEC 1.6) through the public function: out and the q/k/v gradients (which take
    # the pooled levels' and the summaries' gradients through the pooling) against float32, within
    # 2x the error of a naive bf16 implementation
    from videoblade.attention.mask import block_levels, level_lists
    from videoblade.kernels import pool_levels

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(L + len(pools))
    block, dtype = 128, torch.bfloat16
    n = num_blocks(L, block)
    base = [torch.randn(1, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(4)]
    lev = block_levels(torch.rand(1, H, n, n, device="cuda", generator=g), fractions)
    kvi, kvc, pidx, pcnt = level_lists(lev, len(pools))
    assert all(int(pcnt[i].sum()) > 0 for i in range(len(pools)))

    def run(fn, dt, **kw):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in base[:3])
        summ = pool_summaries(k, v, block, pool) if pool else None
        out, _ = fn(q, k, v, kvi, kvc, block, summary=summ, levels=pool_levels(k, v, block, pools, pidx, pcnt), **kw)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), base[3].to(dt))]

    got = run(block_sparse_attention, dtype)
    want = run(block_sparse_attention_ref, torch.float32, max_chunk_elems=1 << 28)
    naive = run(block_sparse_attention_ref, dtype, max_chunk_elems=1 << 28, compute_dtype=dtype)
    report = {}
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], got, want, naive):
        e_k, e_n = rel_err(a, b), rel_err(c, b)
        report[name] = f"{e_k:.2e}/{e_n:.2e}"
        assert e_k <= 2 * e_n + 1e-4, f"{name}: kernel {e_k:.2e} vs naive bf16 {e_n:.2e}"
    print(L, H, D, pools, pool, report)


def test_gpu_public_fn_autograd_noncontiguous():
    # [B, L, H, D] storage viewed as [B, H, L, D] (what diffusers processors hold)
    g = torch.Generator(device="cuda").manual_seed(3)
    B, H, L, D, block = 2, 3, 777, 64, 128
    base = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    n = num_blocks(L, block)
    kvi, kvc = mask_to_block_lists(random_mask(B, H, n, 0.5, g))
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)
    out, _ = block_sparse_attention(q, k, v, kvi, kvc, block, summary=pool_summaries(k, v, block, 32))
    do = torch.randn_like(out)
    gk = torch.autograd.grad(out, (q, k, v), do)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out2, _ = block_sparse_attention(qc, kc, vc, kvi, kvc, block, summary=pool_summaries(kc, vc, block, 32))
    g2 = torch.autograd.grad(out2, (qc, kc, vc), do)
    assert torch.equal(out, out2)  # deterministic, layout-independent
    for a, b in zip(gk, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tma", ["auto", "0"])
def test_gpu_broadcast_grad_out(tma, monkeypatch):
    # a loss like (out * w).sum() hands the backward a grad_out with stride 0 on B, H and L (an expand of
    # w): at head dim 128 on Hopper the dq and dk/dv kernels read it through TMA descriptors by default.
    # The gradients must equal those of the same grad_out materialised contiguous.
    monkeypatch.setenv("VIDEOBLADE_KERNEL_TMA", tma)
    g = torch.Generator(device="cuda").manual_seed(5)
    B, H, L, D, block = 1, 2, 1000, 128, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kvi, kvc = mask_to_block_lists(random_mask(B, H, num_blocks(L, block), 0.5, g))
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16, generator=g)

    def grads(do_of):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = block_sparse_attention(*leaves, kvi, kvc, block)
        return torch.autograd.grad(out, leaves, do_of(out))

    strided = grads(lambda out: w.expand_as(out))
    assert w.expand(B, H, L, D).stride()[:3] == (0, 0, 0)
    dense = grads(lambda out: w.expand_as(out).contiguous())
    for name, a, b in zip("qkv", strided, dense):
        assert torch.isfinite(a).all() and torch.equal(a, b), f"d{name} differs with a stride-0 grad_out"


def test_gpu_estimate_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    P = estimate_block_importance(q, k, 128, 16)
    P_ref = estimate_block_importance_ref(q, k, 128, 16)
    assert rel_err(P, P_ref) < 2e-2
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)), rtol=1e-3, atol=1e-3)
    Pm = estimate_block_importance(q, k, 128, mode="mean")
    torch.testing.assert_close(Pm.sum(-1), torch.ones_like(Pm.sum(-1)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("L,pool,D", [(32760, 32, 128), (17776, 16, 64), (4097, 32, 128)], ids=["wan", "cog", "odd"])
def test_gpu_pool_kernel_matches_torch(L, pool, D):
    # the Triton pooling forward on the strided [B, L, H, D] layout against the torch one (bf16 out of
    # float32 sums: at most one bf16 rounding apart)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1, L, 2, 4, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2)
    tri = pool_summaries(k, v, 128, pool)
    ref = pool_summaries(k, v, 128, pool, backend="torch")
    for a, b in ((tri.k, ref.k), (tri.v, ref.v)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        assert rel_err(a, b) < 2e-3
    assert torch.equal(tri.bias, ref.bias)


@pytest.mark.parametrize("text_blocks", [0, 2])
def test_gpu_select_kernel_matches_policy(text_blocks):
    # the one-launch selection keeps exactly the policy's blocks at the Wan block count (random
    # masses: no ties; rows at the threshold within float rounding may differ by one block)
    from videoblade.attention.mask import block_lists, block_mask

    g = torch.Generator(device="cuda").manual_seed(6)
    P = torch.softmax(torch.randn(2, 12, 256, 256, device="cuda", generator=g) * 2, -1)
    for kw in (dict(mode="energy", energy_threshold=0.95, min_retain=0.05, max_retain=0.15),
               dict(mode="energy", energy_threshold=0.5, min_retain=0.01, max_retain=0.5),
               dict(mode="topk", topk=0.1)):
        ref_i, ref_c = mask_to_block_lists(block_mask(P, **kw, text_blocks=text_blocks))
        ki, kc = block_lists(P, **kw, text_blocks=text_blocks)
        rows_equal = (ki == ref_i).all(-1) & (kc == ref_c)
        assert rows_equal.float().mean() > 0.999, kw


def test_gpu_fp32_follows_torch_matmul_precision():
    # float32 inputs: exact float32 products under torch's default "highest", TF32 under "high", as
    # torch's own float32 matmuls; forward, gradients (summaries included) and the estimate
    g = torch.Generator(device="cuda").manual_seed(9)
    B, H, L, D, block, pool = 1, 2, 700, 64, 64, 16
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(4))
    kvi, kvc = mask_to_block_lists(random_mask(B, H, num_blocks(L, block), 0.4, g))
    prev = torch.get_float32_matmul_precision()

    def run(fn):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out, _ = fn(qg, kg, vg, kvi, kvc, block, summary=pool_summaries(kg, vg, block, pool))
        est = (estimate_block_importance if fn is block_sparse_attention else estimate_block_importance_ref)(q, k, block, 16)
        return (out, *torch.autograd.grad(out, (qg, kg, vg), do), est)

    try:
        torch.set_float32_matmul_precision("highest")
        want = run(block_sparse_attention_ref)
        errs = {}
        for prec in ("highest", "high"):
            torch.set_float32_matmul_precision(prec)
            errs[prec] = max(rel_err(a, b) for a, b in zip(run(block_sparse_attention), want))
    finally:
        torch.set_float32_matmul_precision(prev)
    assert errs["highest"] < 1e-5, errs
    assert errs["high"] > 1e-4, errs  # TF32 products (10-bit mantissa) really were taken

"""GPU tier: the CUDA backend of ASA (Triton kernels) agrees with its CPU semantics (torch
reference), on q/k/v and inside a Wan transformer."""

import pytest
import torch
from helpers import rel_err as _rel

from videoblade.attention.asa import AdaptiveSparseAttention
from videoblade.attention.synthetic import local_qkv
from videoblade.config import ASAConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compensation", [False, True], ids=["exact", "comp"])
@pytest.mark.parametrize("text,grid,D", [(0, (5, 12, 20), 128), (226, (4, 10, 15), 64)], ids=["wan-like", "cog-like"])
def test_triton_and_torch_backends_agree(compensation, text, grid, D):
    q, k, v = local_qkv(grid, 3, D, text_tokens=text, length_scale=2.0, noise=0.5, dtype=torch.bfloat16, device="cuda")
    cfg = ASAConfig(compensation=compensation, pool=32 if D == 128 else 16, max_retain=0.2)
    tri = AdaptiveSparseAttention(cfg, backend="auto")
    ref = AdaptiveSparseAttention(cfg, backend="torch")
    # the block-importance estimates agree
    P_t = tri.estimate(q, k)
    P_r = ref.estimate(q, k)
    torch.testing.assert_close(P_t, P_r, atol=2e-3, rtol=2e-2)
    # on one mask, the Triton kernel equals the fp32 reference to bf16 rounding, forward and backward
    mask = ref.make_mask(P_r, text)
    # the CUDA call selects its blocks in one Triton launch: the same lists as the policy's mask
    from videoblade.kernels import mask_to_block_lists

    ki, kc = tri.make_lists(P_r, text)
    ri, rc = mask_to_block_lists(mask)
    assert ((ki == ri).all(-1) & (kc == rc)).float().mean() > 0.99
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out_t = tri.sparse_attention(qg, kg, vg, mask)
    out_r = ref.sparse_attention(qr, kr, vr, mask)
    assert _rel(out_t, out_r) < 1e-2
    do = torch.randn_like(out_r)
    (out_t.float() * do).sum().backward()
    (out_r.float() * do).sum().backward()
    for a, b in ((qg, qr), (kg, kr), (vg, vr)):
        assert _rel(a.grad, b.grad) < 2e-2
    # the whole call (reorder + estimate + mask + kernel): masks agree almost everywhere
    o_t = tri(q, k, v, grid=grid, text_tokens=text)
    o_r = ref(q, k, v, grid=grid, text_tokens=text)
    assert _rel(o_t, o_r) < 3e-2
    d_t, d_r = tri.density_stats()["mean"], ref.density_stats()["mean"]
    assert abs(d_t - d_r) < 0.01


def test_unsupported_head_dim_on_cuda_takes_the_reference():
    # head dim 8 (tiny models): the kernels cannot take it, so "auto" on CUDA runs the torch reference
    # (estimate and attention) instead of failing in the Triton compile
    q, k, v = local_qkv((3, 8, 8), 2, 8, length_scale=2.0, noise=0.5, dtype=torch.float32, device="cuda")
    cfg = ASAConfig(block_size=16, samples_per_block=4, pool=4, max_retain=0.3)
    auto = AdaptiveSparseAttention(cfg, backend="auto")
    assert not auto._use_triton(q) and auto._use_triton(torch.zeros(1, 1, 32, 16, device="cuda"))
    out = auto(q, k, v, grid=(3, 8, 8))
    want = AdaptiveSparseAttention(cfg, backend="torch")(q, k, v, grid=(3, 8, 8))
    assert out.is_cuda and torch.equal(out, want)


def test_wan_transformer_cuda_backend_matches_torch_backend():
    from diffusers import WanTransformer3DModel

    from videoblade.attention import set_adaptive_sparse_attention

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=1024,
    ).to("cuda", torch.bfloat16)
    x = torch.randn(1, 4, 5, 40, 48, device="cuda", dtype=torch.bfloat16)  # 5 x 20 x 24 tokens
    t = torch.tensor([500.0], device="cuda")
    enc = torch.randn(1, 7, 32, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for backend in ("auto", "torch"):
        set_adaptive_sparse_attention(model, ASAConfig(min_retain=1.0, compensation=False), backend=backend)
        with torch.no_grad():
            outs[backend] = model(x, t, enc).sample
    with torch.no_grad():
        from videoblade.attention import unset_adaptive_sparse_attention

        unset_adaptive_sparse_attention(model)
        dense = model(x, t, enc).sample
    assert _rel(outs["auto"], outs["torch"]) < 2e-2
    assert _rel(outs["auto"], dense) < 2e-2

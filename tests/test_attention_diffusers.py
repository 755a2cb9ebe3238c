"""ASA installed into tiny random diffusers Wan / CogVideoX transformers (CPU tier).

Checks: with every block kept and compensation off the patched transformer equals the
unpatched one (outputs and gradients); install/undo restores the original outputs bit for bit;
reordering once per forward equals reordering around every attention call; peft LoRA +
gradient checkpointing + deepcopy; dense layers / dense timesteps; density statistics.
"""

import copy

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed

from videoblade.attention import (
    get_adaptive_sparse_attention,
    set_adaptive_sparse_attention,
    unset_adaptive_sparse_attention,
)
from videoblade.attention.gilbert import gilbert_order
from videoblade.attention.processors import CogVideoXASAProcessor, WanASAProcessor
from videoblade.config import ASAConfig

FULL = dict(block_size=16, samples_per_block=4, pool=8, min_retain=1.0, compensation=False)
SPARSE = dict(block_size=16, samples_per_block=4, pool=8, min_retain=0.1, max_retain=0.3)


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )


def tiny_cog(seed=0):
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=14, sample_height=10, sample_frames=9, patch_size=2,
        max_text_seq_length=20, use_rotary_positional_embeddings=True,
    )


def make(family, seed=0):
    return tiny_wan(seed) if family == "wan" else tiny_cog(seed)


def inputs(family, frames=5, height=10, width=14, text=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(1, text, 32, generator=g)
    if family == "wan":
        x = torch.randn(1, 4, frames, height, width, generator=g)
        return dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=enc)
    x = torch.randn(1, frames, 4, height, width, generator=g)
    h, w = height // 2, width // 2
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=frames)
    return dict(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([500]), image_rotary_emb=rope)


def run(model, inp, grad=False):
    inp = dict(inp)
    if grad:
        inp["hidden_states"] = inp["hidden_states"].clone().requires_grad_(True)
        out = model(**inp).sample
        (out.square().mean() + out.sum() * 1e-3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads["<input>"] = inp["hidden_states"].grad.clone()
        model.zero_grad(set_to_none=True)
        return out.detach(), grads
    with torch.no_grad():
        return model(**inp).sample


FAMILIES = ["wan", "cogvideox"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(5, 10, 14), (3, 6, 18)], ids=["5x10x14", "odd-3x6x18"])
def test_keep_all_blocks_equals_unpatched_outputs_and_gradients(family, size):
    model = make(family)
    inp = inputs(family, *size)
    ref_out, ref_g = run(model, inp, grad=True)
    set_adaptive_sparse_attention(model, ASAConfig(**FULL))
    out, g = run(model, inp, grad=True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    assert set(g) == set(ref_g)
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], atol=2e-5, rtol=1e-3, msg=n)
    st = get_adaptive_sparse_attention(model).density_stats()
    assert st["mean"] == 1.0 and set(st["layers"]) == {0, 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_install_undo_restores_outputs_bit_for_bit(family):
    model = make(family).eval()
    inp = inputs(family)
    before = run(model, inp)
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    n_hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))
    during = run(model, inp)
    assert not torch.equal(during, before)  # the sparse install changed the computation
    assert asa.density_stats()["mean"] < 0.9
    set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))  # installing twice replaces
    unset_adaptive_sparse_attention(model)
    assert torch.equal(run(model, inp), before)
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()} == n_hooks
    assert get_adaptive_sparse_attention(model) is None
    unset_adaptive_sparse_attention(model)  # a no-op when nothing is installed


@pytest.mark.parametrize("family", FAMILIES)
def test_processors_replace_self_attention_only(family):
    model = make(family)
    cross = [b.attn2.processor for b in model.blocks] if family == "wan" else []
    set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))
    blocks = model.blocks if family == "wan" else model.transformer_blocks
    cls = WanASAProcessor if family == "wan" else CogVideoXASAProcessor
    assert [type(b.attn1.processor) for b in blocks] == [cls] * len(blocks)
    assert [b.attn1.processor.layer_idx for b in blocks] == list(range(len(blocks)))
    if family == "wan":
        assert [b.attn2.processor for b in model.blocks] == cross  # cross-attention stays dense
    # the install adds no parameters or buffers
    assert set(model.state_dict()) == set(make(family).state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_once_per_forward_equals_reorder_per_attention(family):
    model = make(family)
    inp = inputs(family, 5, 10, 14)
    seen = {}

    def grab(scope):
        def hook(mod, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            seen[scope] = hs.detach().clone()
        return hook

    outs = {}
    for scope in ("attention", "forward"):
        set_adaptive_sparse_attention(model, ASAConfig(**SPARSE), reorder_scope=scope)
        blocks = model.blocks if family == "wan" else model.transformer_blocks
        h = blocks[1].register_forward_pre_hook(grab(scope), with_kwargs=True)
        outs[scope] = run(model, inp, grad=True)
        h.remove()
    torch.testing.assert_close(outs["forward"][0], outs["attention"][0], atol=1e-5, rtol=1e-4)
    for n in outs["attention"][1]:
        torch.testing.assert_close(outs["forward"][1][n], outs["attention"][1][n], atol=1e-5, rtol=1e-3, msg=n)
    # and the once-per-forward path really runs the blocks on Gilbert-ordered tokens
    perm, _ = gilbert_order((5, 5, 7), 0)
    torch.testing.assert_close(seen["forward"], seen["attention"][:, perm], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(seen["forward"], seen["attention"], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradient_checkpointing_and_deepcopy(family):
    from peft import LoraConfig

    model = make(family)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights="gaussian"))
    with torch.no_grad():  # non-zero LoRA B so the adapters change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))
    inp = inputs(family)
    out1, g1 = run(model, inp, grad=True)
    assert any("lora_B" in n for n in g1)
    calls = asa.density_stats()["layers"][0]["calls"]

    model.enable_gradient_checkpointing()
    out2, g2 = run(model, inp, grad=True)
    torch.testing.assert_close(out2, out1, atol=1e-6, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)
    # the recompute during backward is not counted as a second call
    assert asa.density_stats()["layers"][0]["calls"] == calls + 1

    # a forward at another resolution between forward and backward (the checkpointed blocks
    # recompute with their own forward's grid)
    x = dict(inp, hidden_states=inp["hidden_states"].clone().requires_grad_(True))
    out3 = model(**x).sample
    other = inputs(family, 3, 6, 18)
    with torch.no_grad():
        model(**other)
    (out3.square().mean() + out3.sum() * 1e-3).backward()
    torch.testing.assert_close(x["hidden_states"].grad, g1["<input>"], atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)

    # deepcopy: an independent patched copy (the fake-score copy)
    twin = copy.deepcopy(model)
    twin_asa = get_adaptive_sparse_attention(twin)
    assert twin_asa is not None and twin_asa is not asa
    blocks = (lambda m: m.blocks) if family == "wan" else (lambda m: m.transformer_blocks)
    assert all(b.attn1.processor.asa is twin_asa for b in blocks(twin))
    twin_asa.reset_stats()
    before_calls = asa.density_stats()["layers"][0]["calls"]
    out4, g4 = run(twin, inp, grad=True)
    torch.testing.assert_close(out4, out1, atol=1e-6, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], atol=1e-5, rtol=1e-4, msg=n)
    assert twin_asa.density_stats()["layers"][0]["calls"] == 1
    assert asa.density_stats()["layers"][0]["calls"] == before_calls
    # undoing on the copy leaves the original patched
    unset_adaptive_sparse_attention(twin)
    assert get_adaptive_sparse_attention(model) is asa
    assert all(isinstance(b.attn1.processor, (WanASAProcessor, CogVideoXASAProcessor)) for b in blocks(model))
    assert not any(isinstance(b.attn1.processor, (WanASAProcessor, CogVideoXASAProcessor)) for b in blocks(twin))


def test_dense_layers_and_dense_timesteps_in_the_transformer():
    model = tiny_wan()
    inp = inputs("wan")
    ref = run(model, inp)
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE, dense_layers=[0], dense_timestep_above=800))
    run(model, inp)  # t = 500: sparse except layer 0
    st = asa.density_stats(reset=True)
    assert st["layers"][0]["heads"] == [1.0, 1.0] and st["layers"][1]["mean"] < 0.9
    hi = dict(inp, timestep=torch.tensor([900.0]))
    ref_hi = None
    unset_adaptive_sparse_attention(model)
    ref_hi = run(model, hi)
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE, dense_layers=[0], dense_timestep_above=800))
    torch.testing.assert_close(run(model, hi), ref_hi, atol=1e-6, rtol=1e-5)  # t = 900: all dense
    assert asa.density_stats()["mean"] == 1.0
    assert not torch.equal(ref, ref_hi)


def test_cogvideox_text_length_follows_the_prompt():
    model = tiny_cog()
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE, mode="topk", topk=0.1))
    for text in (5, 19):  # text blocks are kept in both directions whatever their count
        asa.reset_stats()
        inp = inputs("cogvideox", text=text)
        run(model, inp)
        L = text + 5 * 5 * 7
        nb = -(-L // 16)
        tb = -(-text // 16)
        # topk keeps ceil(0.1 * nb) per row; text rows/cols and the diagonal on top
        dens = asa.density_stats()["layers"][0]["mean"]
        assert dens >= (tb * nb + (nb - tb) * tb) / nb**2


def test_entry_points_are_the_library_functions():
    from cogvideox.modify_cogvideo import set_adaptive_sparse_attention as cog_set
    from cogvideox.modify_cogvideo import unset_adaptive_sparse_attention as cog_unset
    from wanx.modify_wan import set_adaptive_sparse_attention as wan_set
    from wanx.modify_wan import unset_adaptive_sparse_attention as wan_unset

    assert wan_set is cog_set is set_adaptive_sparse_attention
    assert wan_unset is cog_unset is unset_adaptive_sparse_attention
    with pytest.raises(TypeError):
        set_adaptive_sparse_attention(torch.nn.Linear(2, 2), ASAConfig())


def test_a_block_called_outside_the_transformer_says_why():
    model = tiny_wan()
    set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))
    with pytest.raises(RuntimeError, match="set_adaptive_sparse_attention"):
        model.blocks[0].attn1(torch.randn(1, 8, 32), None, None, None)


def test_wan_per_token_timesteps_are_reordered_with_the_tokens():
    # Wan2.2 TI2V passes a timestep per token ([B, L]); its modulation must follow the permutation
    model = tiny_wan()
    inp = inputs("wan")
    L = 5 * 5 * 7
    inp["timestep"] = torch.linspace(100.0, 900.0, L)[None]
    ref_out, ref_g = run(model, inp, grad=True)
    set_adaptive_sparse_attention(model, ASAConfig(**FULL))
    out, g = run(model, inp, grad=True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g["<input>"], ref_g["<input>"], atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_compiled_blocks_share_graphs_and_match_eager(family):
    """Regional torch.compile of an ASA transformer: same outputs, gradients and density
    statistics as eager, and later forwards (other timesteps) compile nothing new, i.e. no
    per-layer recompiles (the layer index stays out of the graph)."""
    import torch._dynamo as dynamo

    from videoblade.models import get_adapter

    torch._dynamo.reset()
    dynamo.utils.counters.clear()
    eager, comp = make(family), make(family)
    cfg = ASAConfig(**SPARSE)
    asa_e = set_adaptive_sparse_attention(eager, cfg)
    asa_c = set_adaptive_sparse_attention(comp, ASAConfig(**SPARSE))
    n = get_adapter(family).compile_blocks(comp, backend="aot_eager")
    assert n == 2
    graphs = []
    for t in (500, 300, 700):
        inp = inputs(family)
        inp["timestep"] = torch.tensor([float(t)]) if family == "wan" else torch.tensor([t])
        inp["hidden_states"].requires_grad_(True)
        inp_c = dict(inp, hidden_states=inp["hidden_states"].detach().clone().requires_grad_(True))
        out_e = eager(**inp, return_dict=False)[0]
        out_c = comp(**inp_c, return_dict=False)[0]
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        torch.testing.assert_close(inp_c["hidden_states"].grad, inp["hidden_states"].grad, rtol=1e-4, atol=1e-5)
        graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0], graphs
    pe = dict(eager.named_parameters())
    for name, p in comp.named_parameters():
        torch.testing.assert_close(p.grad, pe[name].grad, rtol=1e-4, atol=1e-5)
    # twice the layers, the same number of graphs: nothing is compiled per layer
    torch._dynamo.reset()
    dynamo.utils.counters.clear()
    deep = type(comp).from_config(dict(comp.config, num_layers=4))
    set_adaptive_sparse_attention(deep, ASAConfig(**SPARSE))
    get_adapter(family).compile_blocks(deep, backend="aot_eager")
    inp = inputs(family)
    inp["hidden_states"].requires_grad_(True)
    deep(**inp, return_dict=False)[0].sum().backward()
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs[0]
    se, sc = asa_e.density_stats(), asa_c.density_stats()
    assert sc["layers"].keys() == se["layers"].keys() == {0, 1}
    for i in se["layers"]:
        assert sc["layers"][i]["calls"] == se["layers"][i]["calls"] == 3
        assert sc["layers"][i]["heads"] == pytest.approx(se["layers"][i]["heads"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_rotary_equals_diffusers_arithmetic(dtype):
    """The Wan rotation written as one elementwise pass gives diffusers' slice-assignment
    arithmetic bit for bit, also for tables whose even and odd entries differ (diffusers reads cos
    from the even entries and sin from the odd ones), with gradients to match."""
    from videoblade.attention.processors import _wan_apply_rotary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 3, 16, generator=g).to(dtype)
    cos, sin = torch.randn(1, 40, 1, 16, generator=g), torch.randn(1, 40, 1, 16, generator=g)

    def diffusers_form(h):
        x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(h)
        out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
        out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
        return out.type_as(h)

    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = _wan_apply_rotary(a, cos, sin)
    ref = diffusers_form(b)
    assert torch.equal(out, ref)
    w = torch.randn(out.shape, generator=g).to(dtype)
    (out.float() * w).sum().backward()
    (ref.float() * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_multilevel_mode_in_the_transformer_eager_and_compiled(family):
    """ASA mode "levels" (SPEC 1.6) through the diffusers processors: gradients reach the weights,
    the density counts pooled blocks by cost, and regionally compiled blocks give the eager result."""
    from videoblade.models import get_adapter

    torch._dynamo.reset()
    cfg = dict(SPARSE, mode="levels", level_pools=[2, 4], level_fractions=[0.2, 0.2, 0.3])
    eager, comp = make(family), make(family)
    asa_e = set_adaptive_sparse_attention(eager, ASAConfig(**cfg))
    set_adaptive_sparse_attention(comp, ASAConfig(**cfg))
    get_adapter(family).compile_blocks(comp, backend="aot_eager")
    inp = inputs(family)
    out_e, grads_e = run(eager, inp, grad=True)
    out_c, grads_c = run(comp, inp, grad=True)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for n, g in grads_e.items():
        assert torch.isfinite(g).all()
        torch.testing.assert_close(grads_c[n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert grads_e["<input>"].abs().sum() > 0
    d = asa_e.density_stats()["mean"]
    assert 0.2 < d < 1.0  # exact band + pooled blocks at 1/2 and 1/4, diagonal and text forced exact


def test_one_config_for_two_transformers_does_not_couple_them():
    # the config is copied at install: switching one install off (as the trainer's role switch does)
    # or editing the caller's config afterwards leaves the other install alone
    cfg = ASAConfig(**SPARSE)
    a, b = make("wan"), make("wan")
    asa_a, asa_b = set_adaptive_sparse_attention(a, cfg), set_adaptive_sparse_attention(b, cfg)
    assert asa_a.cfg is not asa_b.cfg and asa_a.cfg is not cfg
    asa_a.cfg.enabled = False
    cfg.max_retain = 1.0
    run(b, inputs("wan"))
    assert asa_b.density_stats()["mean"] < 1.0  # b is still sparse, with its own max_retain


@pytest.mark.parametrize("bad", [dict(pool=7), dict(mode="nope")], ids=["pool", "mode"])
def test_a_failed_reinstall_keeps_the_previous_install(bad):
    # installing again replaces the install only once the new settings are known to be good: a bad
    # config raises and leaves the model exactly as it was (still patched, same statistics object)
    model = make("wan")
    inp = inputs("wan")
    asa = set_adaptive_sparse_attention(model, ASAConfig(**SPARSE))
    before = run(model, inp)
    with pytest.raises(ValueError):
        set_adaptive_sparse_attention(model, ASAConfig(**dict(SPARSE, **bad)))
    assert get_adaptive_sparse_attention(model) is asa
    assert all(b.attn1.processor.asa is asa for b in model.blocks)
    assert torch.equal(run(model, inp), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layers_outside_the_model_are_rejected(family):
    # a dense layer the model does not have (here 2 layers: 0 and 1) would silently stay sparse
    model = make(family)
    with pytest.raises(ValueError, match=r"dense_layers.*\[2\].*2 layers"):
        set_adaptive_sparse_attention(model, ASAConfig(**SPARSE, dense_layers=[1, 2]))
    assert get_adaptive_sparse_attention(model) is None
    assert set_adaptive_sparse_attention(model, ASAConfig(**SPARSE, dense_layers=[1])) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_reorder_per_attention_in_compiled_blocks_at_a_new_grid(family):
    """reorder_scope="attention" builds the Gilbert order inside the attention call, so with
    regionally compiled blocks a grid seen for the first time is built inside the compiled region:
    it must still run (and give the eager result), not fail while tracing the curve's numpy code."""
    from videoblade.attention import gilbert
    from videoblade.models import get_adapter

    torch._dynamo.reset()
    gilbert._DEVICE_CACHE.clear()
    gilbert.gilbert_order.cache_clear()
    gilbert._curve_cached.cache_clear()
    eager, comp = make(family), make(family)
    for m in (eager, comp):
        set_adaptive_sparse_attention(m, ASAConfig(**SPARSE), reorder_scope="attention")
    get_adapter(family).compile_blocks(comp, backend="aot_eager")
    for size in [(5, 10, 14), (5, 10, 14), (3, 6, 18)]:  # the first call at a grid: its order is not cached yet
        inp = inputs(family, *size)
        torch.testing.assert_close(run(comp, inp), run(eager, inp), rtol=1e-5, atol=1e-5)

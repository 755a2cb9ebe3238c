"""The feed-forward's linear + tanh GELU as one op (videoblade.models.ffn): same function as
diffusers' two steps, used only in forwards without gradient, kept whole under torch.compile,
bound to its own module's weights after deepcopy, and out of the way of hooks and LoRA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_attention_diffusers import inputs, make

from videoblade.models import ffn, get_adapter


def _count_calls(monkeypatch):
    calls = []
    real = ffn.linear_gelu_tanh

    def counted(*a):
        calls.append(a[0].shape)
        return real(*a)

    monkeypatch.setattr(ffn, "linear_gelu_tanh", counted)
    return calls


def test_linear_gelu_tanh_is_linear_then_tanh_gelu():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 7, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    ref = F.gelu(F.linear(x, w, b), approximate="tanh")
    torch.testing.assert_close(ffn.linear_gelu_tanh(x, w, b), ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ref, F.gelu(F.linear(x, w, b)), atol=1e-5)  # the tanh form, not the exact one


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_fused_feedforward_matches_diffusers_without_grad_only(family, monkeypatch):
    ref, fused = make(family), make(family)
    n = ffn.fuse_feedforward(fused)
    assert n == 2 and ffn.fuse_feedforward(fused) == 0  # one per block, idempotent
    calls = _count_calls(monkeypatch)
    inp = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(fused(**inp, return_dict=False)[0], ref(**inp, return_dict=False)[0],
                                   rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    # with gradients: diffusers' path, the same gradients
    calls.clear()
    xr = inp["hidden_states"].clone().requires_grad_(True)
    xf = inp["hidden_states"].clone().requires_grad_(True)
    ref(**dict(inp, hidden_states=xr), return_dict=False)[0].square().sum().backward()
    fused(**dict(inp, hidden_states=xf), return_dict=False)[0].square().sum().backward()
    assert calls == []
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_fused_feedforward_under_compile_and_after_deepcopy(monkeypatch):
    torch._dynamo.reset()
    ref, model = make("wan"), make("wan")
    targets = []

    def backend(gm, example_inputs):  # records the ops dynamo put in each graph
        targets.extend(n.target for n in gm.graph.nodes)
        return gm.forward

    get_adapter("wan").compile_blocks(model, backend=backend)  # fuses, then compiles the blocks
    assert all(ffn.is_fused(b.ffn.net[0]) for b in model.blocks)
    inp = inputs("wan")
    with torch.no_grad():
        want = ref(**inp, return_dict=False)[0]
        torch.testing.assert_close(model(**inp, return_dict=False)[0], want, rtol=1e-5, atol=1e-5)
        assert torch.ops.videoblade.linear_gelu_tanh.default in targets  # one op in the graph, not decomposed
        # a deepcopy (the trainer's fake-score copy) computes with its own weights, not the original's
        twin = copy.deepcopy(model)
        twin.blocks[0].ffn.net[0].proj.weight.mul_(0.0)
        torch.testing.assert_close(model(**inp, return_dict=False)[0], want, rtol=1e-5, atol=1e-5)
        assert (twin(**inp, return_dict=False)[0] - want).abs().max() > 1e-3
    # no graph per layer: twice the blocks, the same graphs (a per-module callable would be guarded on)
    graphs = []
    for layers in (2, 4):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m = type(ref).from_config(dict(ref.config, num_layers=layers))
        get_adapter("wan").compile_blocks(m, backend="aot_eager")
        with torch.no_grad():
            m(**inp)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0, graphs


def test_fused_feedforward_steps_aside_for_hooks_and_lora(monkeypatch):
    model = make("wan")
    ffn.fuse_feedforward(model)
    calls = _count_calls(monkeypatch)
    proj = model.blocks[0].ffn.net[0].proj
    seen = []
    handle = proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))  # e.g. ZeRO-3, a FLOP counter
    inp = inputs("wan")
    with torch.no_grad():
        model(**inp)
    assert len(seen) == 1 and len(calls) == 1  # block 0 through proj itself, block 1 fused
    handle.remove()

    class Wrapped(torch.nn.Module):  # what peft puts in place of a targeted Linear
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 1.0

    model.blocks[1].ffn.net[0].proj = Wrapped(model.blocks[1].ffn.net[0].proj)
    calls.clear()
    with torch.no_grad():
        model(**inp)
    assert len(calls) == 1  # only block 0 now


@pytest.mark.gpu
def test_fused_feedforward_on_the_gpu():
    """bf16 on CUDA: cuBLASLt's GELU epilogue, at least as close to float32 as linear-then-GELU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 256, device="cuda", generator=g).bfloat16()
    w = (torch.randn(1024, 256, device="cuda", generator=g) / 16).bfloat16()
    b = (torch.randn(1024, device="cuda", generator=g) / 10).bfloat16()
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    err_fused = (ffn.linear_gelu_tanh(x, w, b).float() - ref).abs().max()
    err_plain = (F.gelu(F.linear(x, w, b), approximate="tanh").float() - ref).abs().max()
    assert err_fused <= err_plain * 1.01 + 1e-6
    compiled = torch.compile(lambda x: ffn.linear_gelu_tanh(x, w, b))
    torch.testing.assert_close(compiled(x), ffn.linear_gelu_tanh(x, w, b))

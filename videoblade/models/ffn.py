"""The feed-forward's first linear layer and its tanh GELU as one GEMM (cuBLASLt epilogue).

Wan2.1 and CogVideoX both use diffusers' ``FeedForward(..., activation_fn="gelu-approximate")``,
whose first module (``diffusers.models.activations.GELU``) runs ``proj`` and then a tanh GELU
over the [tokens, ffn_dim] output: one more read and write of the largest activation of the
block. ``torch._addmm_activation(..., use_gelu=True)`` asks cuBLASLt for the GELU (tanh
approximation) in the GEMM's epilogue instead, applied to the float32 accumulator before the
single rounding to the output dtype. Measured on an H200 in bf16 (probe, same process): Wan's
32760x1536 -> 8960 takes 1.31 ms against 1.53 ms compiled (linear then GELU) and 1.20 ms for the
linear alone; CogVideoX's 17776x3072 -> 12288 takes 1.77 ms against 2.27 ms compiled.

The op is a ``torch.library`` custom op, so ``torch.compile`` keeps it whole (inductor would
otherwise decompose it back into a matmul and a separate GELU). It is for forwards without
gradient (sampling, the rollout and the frozen teacher of training); a forward that needs
gradients runs diffusers' own path. On the CPU the same op computes addmm then the tanh GELU
(``_addmm_activation``'s CPU kernel uses the exact GELU, which is a different function).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["fuse_feedforward", "linear_gelu_tanh"]

_FUSED_ATTR = "_videoblade_fused_linear_gelu"


@torch.library.custom_op("videoblade::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh") for x [..., in], weight [out, in], bias [out]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
    else:
        y = F.gelu(torch.addmm(bias, x2, weight.t()), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _plain_linear(proj) -> bool:
    # a bare nn.Linear that nothing else expects to see called: a LoRA added later (peft replaces
    # the module), DeepSpeed ZeRO-3 (gathers the weight in a pre-forward hook), accelerate's
    # offload (replaces forward) or a profiler's hooks keep diffusers' path
    return (type(proj) is torch.nn.Linear and not proj._forward_pre_hooks and not proj._forward_hooks
            and "forward" not in proj.__dict__)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    proj = self.proj  # checked per call, see _plain_linear; a forward with gradients takes diffusers' path
    if not _plain_linear(proj) or (torch.is_grad_enabled() and (
            hidden_states.requires_grad or proj.weight.requires_grad or proj.bias.requires_grad)):
        return super(type(self), self).forward(hidden_states)
    return linear_gelu_tanh(hidden_states, proj.weight, proj.bias)


@functools.cache
def _fused_class(cls: type) -> type:
    # one subclass shared by every fused module: under torch.compile all blocks then call the same
    # code (a per-module bound callable would be guarded on, one recompile per layer)
    return type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, _FUSED_ATTR: True,
                                                 "__module__": __name__})


def _fusable(m) -> bool:
    return (type(m).__name__ == "GELU" and type(m).__module__.startswith("diffusers.")
            and getattr(m, "approximate", None) == "tanh" and type(getattr(m, "proj", None)) is torch.nn.Linear
            and m.proj.bias is not None)


def fuse_feedforward(model: torch.nn.Module) -> int:
    """Route every diffusers ``GELU(approximate="tanh")`` module of ``model`` through
    :func:`linear_gelu_tanh` (idempotent; the module's class becomes a subclass whose forward
    does so, which deepcopy keeps). Returns the number of modules newly routed."""
    n = 0
    for m in model.modules():
        if _fusable(m):
            m.__class__ = _fused_class(type(m))
            n += 1
    return n


def is_fused(m) -> bool:
    """Whether ``m`` (a diffusers GELU module) runs its linear layer through the fused op."""
    return bool(getattr(type(m), _FUSED_ATTR, False))

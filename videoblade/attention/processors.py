"""diffusers attention processors that run self-attention through ``AdaptiveSparseAttention``.

* ``WanASAProcessor`` replaces ``WanAttnProcessor`` on every block's ``attn1`` (self-attention
  over the video tokens, with Wan's 3D RoPE).  Cross-attention ``attn2`` keeps its processor.
* ``CogVideoXASAProcessor`` replaces ``CogVideoXAttnProcessor2_0`` on every block's ``attn1``
  (joint attention over ``[text tokens, video tokens]``, RoPE on the video part).

Both compute q, k, v exactly as the diffusers processors do (projections, q/k norms, RoPE,
so peft LoRA layers on ``to_q``/``to_k``/``to_v``/``to_out`` work unchanged) and differ only in
the attention call.  What a processor needs to know about the current forward (token grid,
text length, whether the tokens are already in Gilbert order, whether this denoising step is
dense) arrives in an ``ASAForwardContext`` that ``install.py``'s hooks attach to the
arguments the blocks receive: Wan's rotary embedding tuple, CogVideoX's ``attention_kwargs``.
Carrying it with the arguments (not in a global) keeps it right when gradient checkpointing
recomputes a block during backward, after later forwards have run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .asa import AdaptiveSparseAttention

__all__ = ["ASAForwardContext", "RotaryWithContext", "WanASAProcessor", "CogVideoXASAProcessor"]


@dataclass(frozen=True, eq=False)
class ASAForwardContext:
    """Facts about one transformer forward, fixed before the first block runs.

    grid: (frames, h, w) token grid of the video tokens; text_tokens: prompt tokens placed
    before the video tokens in self-attention (CogVideoX) or 0 (Wan); ordered: the video
    tokens flowing through the blocks are in Gilbert order (``perm``/``inv`` over the video
    tokens only, on the activations' device); dense_step: this step runs dense everywhere.
    """

    grid: tuple
    text_tokens: int
    ordered: bool
    dense_step: bool
    perm: torch.Tensor | None = None
    inv: torch.Tensor | None = None


class RotaryWithContext(tuple):
    """Wan's ``(freqs_cos, freqs_sin)`` tuple carrying the forward's ``ASAForwardContext``."""

    asa_ctx: ASAForwardContext

    def __new__(cls, items, ctx: ASAForwardContext):
        obj = super().__new__(cls, items)
        obj.asa_ctx = ctx
        return obj

    def __reduce__(self):  # keeps the context through copy/pickle
        return (RotaryWithContext, (tuple(self), self.asa_ctx))


def _missing_ctx(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name}: no ASA forward context. The ASA processors run only inside a transformer "
        "prepared by set_adaptive_sparse_attention(); call the transformer, not a block alone."
    )


class _ASAProcessorBase:
    def __init__(self, asa: AdaptiveSparseAttention, layer_idx: int):
        self.asa = asa
        self.layer_idx = int(layer_idx)
        # decided once here: the compiled graph then depends on this flag, not on the index,
        # so every sparse layer reuses one graph under torch.compile ("enabled" arrives per
        # forward as ctx.dense_step)
        self.dense_layer = asa.layer_listed_dense(self.layer_idx)

    def _attend(self, q, k, v, ctx: ASAForwardContext, text_tokens: int) -> torch.Tensor:
        # q, k, v [B, H, L, D] in the order the tokens flow through the blocks
        out, density = self.asa.attend(
            q,
            k,
            v,
            grid=ctx.grid,
            text_tokens=text_tokens,
            ordered=ctx.ordered,
            dense=ctx.dense_step or self.dense_layer,
        )
        self._record(density, q)
        return out

    @torch.compiler.disable  # reads self.layer_idx outside any compiled graph (no per-layer guard)
    def _record(self, density: torch.Tensor | None, q: torch.Tensor) -> None:
        self.asa._record(self.layer_idx, density, q.shape[1], q.device)


def _wan_apply_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    """diffusers' WanAttnProcessor rotation of interleaved pairs (x1 cos - x2 sin, x1 sin + x2 cos,
    cos from the even and sin from the odd table entries, in float32) written as
    x * cos + swap_pairs(x) * (-sin, sin): the same float32 values, as one contiguous elementwise
    pass. diffusers' strided slice assignments compile to a slower kernel (Wan q and k,
    1x32760x1536 bf16 on an H200, with the RMS norm before it under torch.compile: 0.43 ms per
    layer for diffusers' form, 0.25 ms for this one). In eager the two forms time the same within
    noise (a whole Wan ASA forward: 407-426 ms with diffusers' form, 403-427 ms with this one)."""
    half = freqs_cos[..., 0::2]
    cos = half.unsqueeze(-1).expand(*half.shape, 2).flatten(-2)
    sin = freqs_sin[..., 1::2]
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
    swapped = hidden_states.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (hidden_states * cos + swapped * sin).type_as(hidden_states)


def _wan_qkv(attn, hidden_states):
    try:  # diffusers' own helper handles fused projections
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        return _get_qkv_projections(attn, hidden_states, None)
    except ImportError:  # pragma: no cover - older diffusers
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


class WanASAProcessor(_ASAProcessorBase):
    """Self-attention (``attn1``) of a ``WanTransformerBlock`` through ASA."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanASAProcessor handles self-attention without a mask only (attn1)")
        ctx = getattr(rotary_emb, "asa_ctx", None)
        if ctx is None:
            raise _missing_ctx("WanASAProcessor")
        query, key, value = _wan_qkv(attn, hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_apply_rotary(query, *rotary_emb)
            key = _wan_apply_rotary(key, *rotary_emb)
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx, 0)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out


class CogVideoXASAProcessor(_ASAProcessorBase):
    """Joint text+video self-attention (``attn1``) of a ``CogVideoXBlock`` through ASA."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        asa_ctx: ASAForwardContext | None = None,
    ):
        if asa_ctx is None:
            raise _missing_ctx("CogVideoXASAProcessor")
        if attention_mask is not None:
            raise ValueError("CogVideoXASAProcessor does not take an attention mask")
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        out = self._attend(query, key, value, asa_ctx, text_seq_length)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        encoder_out, video_out = out.split([text_seq_length, out.size(1) - text_seq_length], dim=1)
        return video_out, encoder_out

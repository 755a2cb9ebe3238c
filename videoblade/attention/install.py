"""Install / remove adaptive sparse attention on a diffusers Wan or CogVideoX transformer.

``set_adaptive_sparse_attention(transformer, cfg)`` swaps every block's self-attention
processor (``attn1``) for an ASA processor (Wan cross-attention ``attn2`` stays dense) and
registers forward hooks; ``unset_adaptive_sparse_attention(transformer)`` puts the original
processor objects back and removes the hooks, after which the transformer computes exactly
what it computed before.

Reordering once per forward (``reorder_scope="forward"``, the default): every op of a block
other than attention is token-wise, so the video tokens can stay in Gilbert order through the
whole block stack.  The hooks

* on the transformer (pre-forward) read the token grid from the latent's shape and the
  patch size in the model config, the text length from ``encoder_hidden_states`` (CogVideoX),
  and decide once whether the step is dense (``cfg.dense_timestep_above``; the only host read
  of the timestep); they build an ``ASAForwardContext``;
* permute the RoPE tables alike (Wan: the output of ``transformer.rope``; CogVideoX: the
  ``image_rotary_emb`` argument) and attach the context to what every block receives (Wan:
  the rotary tuple; CogVideoX: ``attention_kwargs``);
* permute ``hidden_states`` before the first block and restore raster order after the last.

``reorder_scope="attention"`` instead permutes q, k, v inside every attention call and
restores the output; the tests check that both give the same transformer output.

The install lives in the transformer itself (``transformer._asa_state`` and hooks bound to it),
so ``copy.deepcopy(transformer)`` yields an independent patched copy with its own statistics,
and peft LoRA adapters and gradient checkpointing (non-reentrant, diffusers' default) work:
a block recomputed during backward finds its context in its own saved arguments.
"""

from __future__ import annotations

import copy
import inspect

import torch

from ..config import ASAConfig, with_family_pool
from .asa import AdaptiveSparseAttention, timestep_value
from .gilbert import gilbert_order_on
from .processors import ASAForwardContext, CogVideoXASAProcessor, RotaryWithContext, WanASAProcessor

__all__ = [
    "set_adaptive_sparse_attention",
    "unset_adaptive_sparse_attention",
    "get_adaptive_sparse_attention",
    "model_family",
]

_STATE_ATTR = "_asa_state"


def model_family(transformer) -> str:
    """'wan' or 'cogvideox' from the transformer's class (peft keeps the class)."""
    names = [c.__name__ for c in type(transformer).__mro__]
    if "WanTransformer3DModel" in names:
        return "wan"
    if "CogVideoXTransformer3DModel" in names:
        return "cogvideox"
    raise TypeError(
        f"ASA supports WanTransformer3DModel and CogVideoXTransformer3DModel, got {type(transformer).__name__}"
    )


def _blocks(transformer, family: str):
    return transformer.blocks if family == "wan" else transformer.transformer_blocks


def _pick(args, kwargs, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _put(args, kwargs, index: int, name: str, value):
    if name in kwargs or len(args) <= index:
        kwargs[name] = value
        return args, kwargs
    args = list(args)
    args[index] = value
    return tuple(args), kwargs


def _wan_ordered(args, kwargs) -> ASAForwardContext | None:
    """The context a Wan block received with its rotary tuple, if its tokens are reordered."""
    ctx = getattr(_pick(args, kwargs, 3, "rotary_emb"), "asa_ctx", None)
    return ctx if ctx is not None and ctx.ordered else None


def _cog_ordered(args, kwargs) -> ASAForwardContext | None:
    """The context a CogVideoX block received in attention_kwargs, if its tokens are reordered."""
    ctx = (_pick(args, kwargs, 4, "attention_kwargs") or {}).get("asa_ctx")
    return ctx if ctx is not None and ctx.ordered else None


def _permute_hidden(args, kwargs, ctx: ASAForwardContext):
    """(args, kwargs) with the first block's video tokens put in Gilbert order."""
    hs = _pick(args, kwargs, 0, "hidden_states")
    _check_len(hs, ctx)
    return _put(args, kwargs, 0, "hidden_states", hs.index_select(1, ctx.perm))


def _check_len(hs: torch.Tensor, ctx: ASAForwardContext) -> None:
    if hs.shape[1] != ctx.perm.numel():
        raise ValueError(
            f"ASA: {hs.shape[1]} video tokens reach the blocks but the token grid {ctx.grid} has "
            f"{ctx.perm.numel()}; the latent shape and the model's patch size disagree"
        )


class _ASAInstallState:
    """Everything one install owns; hooks are bound methods of it (so deepcopy follows)."""

    def __init__(self, transformer, cfg: ASAConfig, family: str, reorder_scope: str, backend: str):
        self.cfg = cfg
        self.family = family
        self.reorder_scope = reorder_scope
        self.asa = AdaptiveSparseAttention(cfg, backend=backend)
        self.original_processors: dict[str, object] = {}
        self.hook_sites: list[tuple[str, str, int]] = []  # (module name, hooks dict attr, id)
        self.pending_ctx: ASAForwardContext | None = None  # Wan: between pre-forward and rope
        cfg_patch = transformer.config.patch_size
        if family == "wan":
            self.patch = tuple(int(p) for p in cfg_patch)
        else:
            pt = transformer.config.patch_size_t
            self.patch = (int(pt) if pt else 1, int(cfg_patch), int(cfg_patch))
        self.num_layers = len(_blocks(transformer, family))
        missing = sorted(i for i in self.asa._dense_layers if not 0 <= i < self.num_layers)
        if missing:  # would silently stay sparse
            raise ValueError(
                f"asa.dense_layers {missing} are not layers of this {type(transformer).__name__}: it has "
                f"{self.num_layers} layers (indices 0..{self.num_layers - 1})"
            )

    # -------------------------------------------------------------- context
    def _context(self, latents: torch.Tensor, timestep, text_tokens: int) -> ASAForwardContext:
        pt, ph, pw = self.patch
        if self.family == "wan":  # [B, C, F, H, W]
            f, h, w = latents.shape[2], latents.shape[3], latents.shape[4]
            grid = (f // pt, h // ph, w // pw)
        else:  # [B, F, C, H, W]; CogVideoX 1.5 patches frames by patch_size_t
            f, h, w = latents.shape[1], latents.shape[3], latents.shape[4]
            grid = (f // pt, h // ph, w // pw)
        dense_step = (not self.cfg.enabled) or self.asa.step_is_dense(
            None if self.cfg.dense_timestep_above is None else timestep_value(timestep)
        )
        ordered = bool(
            self.reorder_scope == "forward"
            and self.cfg.reorder
            and not dense_step
            and len(self.asa._dense_layers & set(range(self.num_layers))) < self.num_layers
        )
        perm = inv = None
        if ordered:
            perm, inv = gilbert_order_on(grid, 0, latents.device)
        return ASAForwardContext(grid, int(text_tokens), ordered, dense_step, perm, inv)

    def _bind(self, transformer, args, kwargs):
        sig = inspect.signature(transformer.forward)
        bound = sig.bind(*args, **kwargs)
        return bound.arguments

    # -------------------------------------------------------------- Wan hooks
    def wan_pre_forward(self, module, args, kwargs):
        a = self._bind(module, args, kwargs)
        self.pending_ctx = self._context(a["hidden_states"], a.get("timestep"), 0)
        return None

    def wan_post_forward(self, module, args, kwargs, output):
        self.pending_ctx = None
        return None

    def wan_rope_hook(self, module, args, output):
        ctx = self.pending_ctx
        if ctx is None:
            return None
        cos, sin = output
        if ctx.ordered:  # [1, L, 1, D] tables: permute the token axis like the tokens
            cos, sin = cos.index_select(1, ctx.perm), sin.index_select(1, ctx.perm)
        return RotaryWithContext((cos, sin), ctx)

    def wan_first_block_pre(self, module, args, kwargs):
        # registered on blocks[0] only (no identity test: blocks compiled with their hooks
        # then share one graph instead of recompiling on `module is first`)
        ctx = _wan_ordered(args, kwargs)
        return None if ctx is None else _permute_hidden(args, kwargs, ctx)

    def wan_block_pre(self, module, args, kwargs):
        ctx = _wan_ordered(args, kwargs)
        if ctx is None:
            return None
        temb = _pick(args, kwargs, 2, "temb")
        if temb is not None and temb.dim() == 4:  # per-token modulation (Wan2.2 TI2V)
            return _put(args, kwargs, 2, "temb", temb.index_select(1, ctx.perm))
        return None

    def wan_last_block_post(self, module, args, kwargs, output):
        ctx = _wan_ordered(args, kwargs)
        if ctx is None:
            return None
        return output.index_select(1, ctx.inv)

    # -------------------------------------------------------------- CogVideoX hooks
    def cog_pre_forward(self, module, args, kwargs):
        a = dict(self._bind(module, args, kwargs))
        text = a["encoder_hidden_states"].shape[1]
        ctx = self._context(a["hidden_states"], a.get("timestep"), text)
        rope = a.get("image_rotary_emb")
        if rope is not None and ctx.ordered:  # ([L_video, D], [L_video, D])
            rope = tuple(r.index_select(0, ctx.perm.to(r.device)) for r in rope)
            a["image_rotary_emb"] = rope
        a["attention_kwargs"] = dict(a.get("attention_kwargs") or {}, asa_ctx=ctx)
        return (), a

    def cog_block_pre(self, module, args, kwargs):
        ctx = _cog_ordered(args, kwargs)
        return None if ctx is None else _permute_hidden(args, kwargs, ctx)

    def cog_last_block_post(self, module, args, kwargs, output):
        ctx = _cog_ordered(args, kwargs)
        if ctx is None:
            return None
        hs, enc = output
        return hs.index_select(1, ctx.inv), enc

    # -------------------------------------------------------------- helpers
    def install(self, transformer) -> None:
        fam = self.family
        blocks = _blocks(transformer, fam)
        for i, block in enumerate(blocks):
            name = self._name_of(transformer, block.attn1)
            self.original_processors[name] = block.attn1.processor
            proc_cls = WanASAProcessor if fam == "wan" else CogVideoXASAProcessor
            block.attn1.set_processor(proc_cls(self.asa, i))

        def reg(mod, kind, fn, **kw):
            if kind == "pre":
                h = mod.register_forward_pre_hook(fn, **kw)
                attr = "_forward_pre_hooks"
            else:
                h = mod.register_forward_hook(fn, **kw)
                attr = "_forward_hooks"
            self.hook_sites.append((self._name_of(transformer, mod), attr, h.id))

        if fam == "wan":
            reg(transformer, "pre", self.wan_pre_forward, with_kwargs=True)
            reg(transformer, "post", self.wan_post_forward, with_kwargs=True, always_call=True)
            reg(transformer.rope, "post", self.wan_rope_hook)
            if len(blocks):
                reg(blocks[0], "pre", self.wan_first_block_pre, with_kwargs=True)
            for block in blocks:
                reg(block, "pre", self.wan_block_pre, with_kwargs=True)
            if len(blocks):
                reg(blocks[-1], "post", self.wan_last_block_post, with_kwargs=True)
        else:
            reg(transformer, "pre", self.cog_pre_forward, with_kwargs=True)
            if len(blocks):
                reg(blocks[0], "pre", self.cog_block_pre, with_kwargs=True)
                reg(blocks[-1], "post", self.cog_last_block_post, with_kwargs=True)

    @staticmethod
    def _name_of(root, module) -> str:
        if module is root:
            return ""
        for n, m in root.named_modules():
            if m is module:
                return n
        raise LookupError("module not found in the transformer")

    def uninstall(self, transformer) -> None:
        for name, proc in self.original_processors.items():
            transformer.get_submodule(name).set_processor(proc)
        for name, attr, hid in self.hook_sites:
            mod = transformer.get_submodule(name) if name else transformer
            for dict_attr in (attr, attr + "_with_kwargs", "_forward_hooks_always_called"):
                d = getattr(mod, dict_attr, None)
                if d is not None:
                    d.pop(hid, None)
        self.original_processors = {}
        self.hook_sites = []
        self.pending_ctx = None


def set_adaptive_sparse_attention(
    transformer,
    config: ASAConfig | None = None,
    *,
    reorder_scope: str = "forward",
    backend: str = "auto",
) -> AdaptiveSparseAttention:
    """Make every self-attention of ``transformer`` (a diffusers ``WanTransformer3DModel`` or
    ``CogVideoXTransformer3DModel``, possibly with peft LoRA) adaptive block-sparse.

    Returns the ``AdaptiveSparseAttention`` object; its ``density_stats()`` /
    ``reset_stats()`` read and clear the realised density per layer and head. ``config`` is copied:
    the install's own settings are the returned object's ``cfg`` (read per forward, except
    ``dense_layers``, fixed at install).  Installing again replaces the previous install; a config
    that fails its checks raises and keeps it.  ``reorder_scope``: "forward" (tokens permuted once
    per transformer forward, default) or "attention" (around every attention call).
    ``backend``: "auto" (Triton on CUDA, torch reference elsewhere) or "torch".
    """
    if reorder_scope not in ("forward", "attention"):
        raise ValueError(f"reorder_scope must be 'forward' or 'attention', got {reorder_scope!r}")
    family = model_family(transformer)
    # a copy: one config passed to several transformers (or edited later) must not couple them; change
    # an install's settings through the returned object's .cfg
    cfg = with_family_pool(copy.deepcopy(config) if config is not None else ASAConfig(), family)
    # checks the config before the previous install goes: a bad one raises and leaves the model as it was
    state = _ASAInstallState(transformer, cfg, family, reorder_scope, backend)
    if getattr(transformer, _STATE_ATTR, None) is not None:
        unset_adaptive_sparse_attention(transformer)
    state.install(transformer)
    # a plain attribute (not a submodule): state_dict, parameters and LoRA saving are unchanged
    object.__setattr__(transformer, _STATE_ATTR, state)
    return state.asa


def unset_adaptive_sparse_attention(transformer) -> None:
    """Restore the original attention processor objects and remove every ASA hook."""
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return
    state.uninstall(transformer)
    object.__delattr__(transformer, _STATE_ATTR)


def get_adaptive_sparse_attention(transformer) -> AdaptiveSparseAttention | None:
    """The ``AdaptiveSparseAttention`` installed on ``transformer`` (None if none)."""
    state = getattr(transformer, _STATE_ATTR, None)
    return None if state is None else state.asa

"""``AdaptiveSparseAttention``: SPEC section 1 on q, k, v of shape [B, H, L, D].

Per call: (optionally) reorder the tokens along the Gilbert curve, estimate the block-level
attention map without grad, turn it into a block mask (``mask.block_mask``), and run exact
block-sparse attention on the kept blocks, with global compensation for the skipped ones.
``mode: levels`` (SPEC 1.6) replaces keep/skip by a level per block (``mask.block_levels``):
exact, attended through its 2x/4x/8x-pooled tokens, or skipped.
Layers listed in ``cfg.dense_layers`` and denoising steps with a timestep above
``cfg.dense_timestep_above`` run dense (``F.scaled_dot_product_attention``).

Backends (one semantics): on CUDA the Triton kernels of ``videoblade.kernels``
(``block_sparse_attention``); elsewhere the float32 torch reference
``videoblade.kernels.reference.block_sparse_attention_ref`` (never the Triton interpreter,
which is for kernel tests only), and on CUDA too for head dims the kernels do not take (not 16, 32,
64 or 128).  ``backend="torch"`` forces the reference on any device.

Statistics: the realised density (kept blocks / all blocks; a block at a pooled level counts
1/pool, its cost) of every call is added, per
layer and head, into device tensors; nothing is read back to the host in the hot path.
``density_stats()`` reads them (one sync) and ``reset_stats()`` clears them.  Calls made
while autograd recomputes a checkpointed block during backward are not counted twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ASAConfig, check_asa, with_family_pool
from .gilbert import gilbert_order_on
from .mask import block_levels, block_lists, block_mask, level_density, level_lists, num_blocks

__all__ = ["AdaptiveSparseAttention", "timestep_value"]


def timestep_value(timestep) -> float | None:
    """Largest timestep of a batch as a Python float (a host sync for a device tensor)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max().item())
    return float(timestep)


def _in_backward_recompute() -> bool:
    # > -1 while autograd runs a backward graph task, e.g. recomputing a checkpointed block
    return torch._C._current_graph_task_id() != -1


@dataclass
class _LayerStats:
    density_sum: torch.Tensor  # float32 [H] on the attention's device
    calls: int


class AdaptiveSparseAttention:
    """Adaptive block-sparse attention driven by an :class:`ASAConfig`.

    ``asa(q, k, v, layer_idx, timestep=None, grid=None, text_tokens=0)`` -> out [B, H, L, D]
    in the dtype of ``q``.  The sequence is ``text_tokens`` prompt tokens followed by the
    video tokens of the (frames, h, w) token ``grid`` in raster order; ``grid`` is needed
    only when ``cfg.reorder`` is on and the tokens are not already reordered
    (``ordered=True`` says the caller applied the Gilbert permutation once per forward).
    ``dense`` overrides the layer/timestep rule (the diffusers hooks decide it once per
    forward, so the timestep is read once).
    """

    def __init__(self, cfg: ASAConfig | None = None, backend: str = "auto"):
        # pool null (the family's): set_adaptive_sparse_attention fills it from the transformer's family;
        # used on its own, with no model to tell, the default pool
        self.cfg = with_family_pool(cfg if cfg is not None else ASAConfig(), None)
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.backend = backend
        # the same rules as a YAML run config, so a config built in Python fails here, not in a kernel
        check_asa(self.cfg, prefix="ASAConfig.")
        c = self.cfg
        self._dense_layers = frozenset(int(i) for i in (c.dense_layers or ()))
        self._stats: dict[int, _LayerStats] = {}
        self.record_stats = True

    # ------------------------------------------------------------------ policy
    def layer_is_dense(self, layer_idx: int) -> bool:
        return (not self.cfg.enabled) or self.layer_listed_dense(layer_idx)

    def layer_listed_dense(self, layer_idx: int) -> bool:
        """The layer is in ``cfg.dense_layers`` (fixed at construction, unlike ``cfg.enabled``)."""
        return int(layer_idx) in self._dense_layers

    def step_is_dense(self, timestep) -> bool:
        """True when ``cfg.dense_timestep_above`` is set and the (largest) timestep is above it."""
        thr = self.cfg.dense_timestep_above
        if thr is None or timestep is None:
            return False
        t = timestep if isinstance(timestep, float) else timestep_value(timestep)
        return t > float(thr)

    def is_dense(self, layer_idx: int, timestep=None) -> bool:
        return self.layer_is_dense(layer_idx) or self.step_is_dense(timestep)

    def _use_triton(self, x: torch.Tensor, head_dim: bool = True) -> bool:
        """Whether the Triton kernels run on x: backend "triton", or "auto" on CUDA. With ``head_dim``
        (x is q: the attention and estimate kernels) "auto" also needs a head dim the kernels take;
        other head dims run the reference, slow but exact."""
        if self.backend != "auto":
            return self.backend == "triton"
        from ..kernels.block_sparse import HEAD_DIMS

        return x.is_cuda and (not head_dim or x.shape[-1] in HEAD_DIMS)

    # ------------------------------------------------------------------ pieces
    def estimate(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block attention-mass map P [B, H, NQ, NK] (float32, no grad)."""
        from ..kernels import estimate_block_importance, estimate_block_importance_ref

        c = self.cfg
        # the Triton estimator on CUDA; its plain-torch twin elsewhere (never the interpreter)
        fn = estimate_block_importance if self._use_triton(q) else estimate_block_importance_ref
        with torch.no_grad():
            return fn(q.detach(), k.detach(), c.block_size, c.samples_per_block, c.estimate)

    def _policy(self, text_tokens: int) -> dict:
        c = self.cfg
        return dict(mode=c.mode, energy_threshold=c.energy_threshold, min_retain=c.min_retain,
                    max_retain=c.max_retain, topk=c.topk,
                    text_blocks=num_blocks(text_tokens, c.block_size) if text_tokens else 0)

    def make_mask(self, P: torch.Tensor, text_tokens: int = 0) -> torch.Tensor:
        return block_mask(P, **self._policy(text_tokens))

    def make_lists(self, P: torch.Tensor, text_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept blocks of :meth:`make_mask` as block lists (kv_indices, kv_counts); on CUDA
        one Triton launch (``mask.block_lists``)."""
        return block_lists(P, **self._policy(text_tokens), use_kernel=None if self._use_triton(P, head_dim=False) else False)

    def sparse_attention(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """Block-sparse attention of q, k, v [B, H, L, D] on a bool block ``mask``
        [B, H, NQ, NK] (+ compensation if configured); same dtype as ``q``."""
        from ..kernels import mask_to_block_lists

        c = self.cfg
        if not self._use_triton(q) and self.backend == "auto" and c.cpu_backend == "gathered":
            from ..kernels.gathered import block_sparse_attention_gathered  # CPU, kept blocks only

            return block_sparse_attention_gathered(q, k, v, mask, c.block_size, summary=self._summary(k, v))
        return self.sparse_attention_lists(q, k, v, *mask_to_block_lists(mask))

    def sparse_attention_lists(self, q, k, v, kv_indices: torch.Tensor, kv_counts: torch.Tensor,
                               levels=None) -> torch.Tensor:
        """The same on block lists (the Triton kernel on CUDA, the float32 reference elsewhere), with
        ``levels`` (``kernels.PooledLevels``, SPEC 1.6) also the pooled levels: "auto" takes the
        reference for levels the kernels cannot walk, slow but exact, as for head dims they do not take."""
        from ..kernels.block_sparse import levels_fit_kernels

        use_kernel = self._use_triton(q)
        if use_kernel and levels is not None and self.backend == "auto":
            use_kernel = levels_fit_kernels(levels.pools, self.cfg.block_size)
        if use_kernel:
            from ..kernels import block_sparse_attention as attn_fn
        else:
            from ..kernels.reference import block_sparse_attention_ref as attn_fn
        out, _ = attn_fn(q, k, v, kv_indices, kv_counts, block_size=self.cfg.block_size, summary=self._summary(k, v),
                         levels=levels)
        return out.to(q.dtype)

    def make_levels(self, P: torch.Tensor, text_tokens: int = 0) -> torch.Tensor:
        """Level map int8 [B, H, NQ, NK] of ``mode: levels`` (``mask.block_levels``)."""
        c = self.cfg
        text_blocks = num_blocks(text_tokens, c.block_size) if text_tokens else 0
        return block_levels(P, c.level_fractions, text_blocks=text_blocks)

    def multilevel_attention(self, q, k, v, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q, k, v [B, H, L, D] on a level map (SPEC 1.6; + compensation if configured):
        (out in q.dtype, realised density float32 [H], a pooled block counting 1/pool)."""
        from ..kernels import pool_levels

        c = self.cfg
        pools = [int(p) for p in c.level_pools]
        kvi, kvc, pidx, pcnt = level_lists(levels, len(pools))
        out = self.sparse_attention_lists(q, k, v, kvi, kvc, levels=pool_levels(k, v, c.block_size, pools, pidx, pcnt))
        return out, level_density(kvc, pcnt, pools, levels.shape[-1])

    def _summary(self, k, v):
        from ..kernels import pool_summaries

        c = self.cfg
        return pool_summaries(k, v, c.block_size, c.pool) if c.compensation else None

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_idx: int = 0,
        timestep=None,
        grid=None,
        text_tokens: int = 0,
        ordered: bool = False,
        dense: bool | None = None,
    ) -> torch.Tensor:
        if dense is None:
            dense = self.is_dense(layer_idx, timestep)
        out, density = self.attend(q, k, v, grid=grid, text_tokens=text_tokens, ordered=ordered, dense=dense)
        self._record(layer_idx, density, q.shape[1], q.device)
        return out

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid=None,
        text_tokens: int = 0,
        ordered: bool = False,
        dense: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention alone: (out, realised density float32 [H] of this call, or None when
        dense); records nothing. The density is kept blocks / all blocks per head, over the batch.

        No layer index or other per-layer Python value enters here, so under ``torch.compile``
        every layer shares one compiled graph (the diffusers processors call this and record
        the statistics outside the graph)."""
        if q.dim() != 4:
            raise ValueError(f"q, k, v must be [B, H, L, D], got {tuple(q.shape)}")
        L = q.shape[2]
        if dense:
            return F.scaled_dot_product_attention(q, k, v), None

        c = self.cfg
        perm = inv = None
        if c.reorder and not ordered:
            if grid is None:
                raise ValueError("ASA with reorder=True needs the token grid (frames, h, w)")
            if text_tokens + math.prod(grid) != L:
                raise ValueError(
                    f"sequence length {L} != text_tokens {text_tokens} + grid {tuple(grid)} tokens"
                )
            perm, inv = gilbert_order_on(grid, text_tokens, q.device)
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))

        P = self.estimate(q, k)
        if c.mode == "levels":
            out, density = self.multilevel_attention(q, k, v, self.make_levels(P, text_tokens))
            return (out.index_select(2, inv) if inv is not None else out), density
        if self._use_triton(q):  # estimate -> block lists -> kernel, no bool mask in between
            kv_indices, kv_counts = self.make_lists(P, text_tokens)
            out = self.sparse_attention_lists(q, k, v, kv_indices, kv_counts)
        else:
            mask = self.make_mask(P, text_tokens)
            out = self.sparse_attention(q, k, v, mask)
            kv_counts = mask.sum(-1)
        B, H, NQ, NK = P.shape
        density = kv_counts.sum(dim=(0, 2), dtype=torch.float32) / (B * NQ * NK)
        if inv is not None:
            out = out.index_select(2, inv)
        return out, density

    # ------------------------------------------------------------------ stats
    @torch.compiler.disable  # host-side bookkeeping: under torch.compile a graph break, never a recompile
    def _record(self, layer_idx: int, density: torch.Tensor | None, heads: int, device) -> None:
        # density: float32 [H] from attend(), None for a dense call
        if not self.record_stats or _in_backward_recompute():
            return
        with torch.no_grad():
            d = torch.ones(heads, dtype=torch.float32, device=device) if density is None else density
            st = self._stats.get(int(layer_idx))
            if st is None or st.density_sum.shape != d.shape or st.density_sum.device != d.device:
                # the sums outlive the call: a normal tensor even when this call runs under
                # torch.inference_mode (a later call outside it could not add into an inference tensor)
                with torch.inference_mode(False):
                    self._stats[int(layer_idx)] = _LayerStats(d.clone(), 1)
            else:
                st.density_sum.add_(d)
                st.calls += 1

    def density_tensors(self) -> dict[int, torch.Tensor]:
        """Mean realised density per layer as device tensors [H] (no host sync)."""
        return {i: s.density_sum / s.calls for i, s in sorted(self._stats.items())}

    def density_stats(self, reset: bool = False) -> dict:
        """Realised density read to the host (one sync):
        ``{"mean": float | None, "layers": {layer: {"mean", "heads": [H floats], "calls"}}}``.
        ``mean`` averages the layers (each layer weighted by its calls)."""
        layers = {}
        tot = 0.0
        n = 0
        items = sorted(self._stats.items())
        if items:  # one device-to-host copy for every layer (layers may sit on different devices)
            dev = items[0][1].density_sum.device
            flat = torch.cat([(s.density_sum / s.calls).to(dev) for _, s in items]).cpu().tolist()
        offset = 0
        for i, s in items:
            heads = flat[offset:offset + s.density_sum.numel()]
            offset += len(heads)
            m = sum(heads) / len(heads)
            layers[i] = {"mean": m, "heads": heads, "calls": s.calls}
            tot += m * s.calls
            n += s.calls
        out = {"mean": (tot / n) if n else None, "layers": layers}
        if reset:
            self.reset_stats()
        return out

    def reset_stats(self) -> None:
        self._stats.clear()

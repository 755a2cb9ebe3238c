"""Adaptive sparse attention (SPEC section 1): Gilbert ordering, mask policy,
``AdaptiveSparseAttention``, diffusers processors and install/undo for Wan and CogVideoX.

Public entry points::

    from videoblade.attention import set_adaptive_sparse_attention, unset_adaptive_sparse_attention
    asa = set_adaptive_sparse_attention(transformer, cfg.asa)   # -> AdaptiveSparseAttention
    ...forwards...
    stats = asa.density_stats(reset=True)  # {"mean": float, "layers": {i: {"mean", "heads", "calls"}}}
    unset_adaptive_sparse_attention(transformer)
"""

from .asa import AdaptiveSparseAttention
from .gilbert import gilbert_curve, gilbert_order, gilbert_order_on
from .install import (
    get_adaptive_sparse_attention,
    model_family,
    set_adaptive_sparse_attention,
    unset_adaptive_sparse_attention,
)
from .mask import block_mask

__all__ = [
    "AdaptiveSparseAttention",
    "block_mask",
    "get_adaptive_sparse_attention",
    "gilbert_curve",
    "gilbert_order",
    "gilbert_order_on",
    "model_family",
    "set_adaptive_sparse_attention",
    "unset_adaptive_sparse_attention",
]

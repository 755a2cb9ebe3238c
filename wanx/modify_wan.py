"""Install / remove adaptive sparse attention (SPEC section 1) on a diffusers Wan transformer.

Thin entry point: all logic lives in ``videoblade.attention``.

    from wanx.modify_wan import set_adaptive_sparse_attention, unset_adaptive_sparse_attention
    asa = set_adaptive_sparse_attention(transformer, cfg.asa)   # WanTransformer3DModel (+ LoRA)
    asa.density_stats(reset=True)                                # realised density per layer/head
    unset_adaptive_sparse_attention(transformer)                 # original processors back
"""

from videoblade.attention import (
    get_adaptive_sparse_attention,
    set_adaptive_sparse_attention,
    unset_adaptive_sparse_attention,
)

__all__ = ["set_adaptive_sparse_attention", "unset_adaptive_sparse_attention", "get_adaptive_sparse_attention"]

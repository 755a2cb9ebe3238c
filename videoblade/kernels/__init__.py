"""Block-sparse attention kernels (Triton) with torch references.

Public API (see CLAUDE.md "Kernels"):

- ``block_sparse_attention(q, k, v, kv_indices, kv_counts, block_size=128, sm_scale=None, summary=None)``
  -> (out, lse): Triton forward/backward (torch.library custom op, compile-traceable); out is a
  [B, H, L, D] view of [B, L, H, D] memory.
- ``block_sparse_attention_ref(...)``: the same in float32 torch (differentiable, chunked).
- ``pool_summaries(k, v, block_size, pool)`` -> ``Summary`` (compensation tokens, SPEC 1.5).
- ``pool_levels(k, v, block_size, pools, indices, counts)`` -> ``PooledLevels`` (key blocks attended
  at reduced resolution, SPEC 1.6; the ``levels=`` argument of both attention functions).
- ``mask_to_block_lists(mask, max_blocks=None)`` / ``block_lists_to_mask(kv_indices, kv_counts, nk)``;
  ``check_block_lists(kv_indices, kv_counts, nk)`` checks hand-made lists (ascending ids in range; one sync).
- ``estimate_block_importance(q, k, block_size=128, samples_per_block=16, mode="sample")``
  -> float32 [B, H, NQ, NK], rows sum to 1.
"""

from .block_sparse import block_sparse_attention, block_sparse_attention_bwd, block_sparse_attention_fwd
from .blocks import (
    PooledLevels,
    Summary,
    block_lists_to_mask,
    check_block_lists,
    mask_to_block_lists,
    num_blocks,
    pool_levels,
    pool_summaries,
    transpose_block_lists,
)
from .importance import block_means, estimate_block_importance, estimate_block_importance_ref
from .reference import block_sparse_attention_ref, dense_attention_ref

__all__ = [
    "PooledLevels",
    "Summary",
    "block_lists_to_mask",
    "block_means",
    "block_sparse_attention",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "block_sparse_attention_ref",
    "check_block_lists",
    "dense_attention_ref",
    "estimate_block_importance",
    "estimate_block_importance_ref",
    "mask_to_block_lists",
    "num_blocks",
    "pool_levels",
    "pool_summaries",
    "transpose_block_lists",
]

"""Regression tests from a review of ``videoblade/attention`` (each failed before its fix)."""

import pytest
import torch
from test_attention_diffusers import FAMILIES, SPARSE, inputs, make, run

from videoblade.attention import gilbert, set_adaptive_sparse_attention
from videoblade.attention.asa import AdaptiveSparseAttention
from videoblade.config import ASAConfig
from videoblade.kernels import blocks


@pytest.mark.parametrize("compensation", [True, False], ids=["comp", "nocomp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_first_forward_under_inference_mode_does_not_poison_later_training(family, compensation):
    # sampling / validation under torch.inference_mode at a grid seen for the first time cached the
    # Gilbert permutation (and started the density sums) as inference tensors: the next training
    # forward at that grid then failed ("Inference tensors cannot be saved for backward"), and a
    # later no-grad forward failed on the statistics ("Inplace update to inference tensor")
    gilbert._DEVICE_CACHE.clear()
    gilbert.gilbert_order.cache_clear()
    blocks._pool_geometry.cache_clear()  # compensation's pooled-summary counts, cached per length
    model = make(family)
    asa = set_adaptive_sparse_attention(model, ASAConfig(**dict(SPARSE, compensation=compensation)))
    inp = inputs(family, 3, 6, 10)
    with torch.inference_mode():
        model(**inp)
    out, grads = run(model, inp, grad=True)
    assert torch.isfinite(grads["<input>"]).all()
    with torch.no_grad():
        model(**inp)
    assert asa.density_stats()["layers"][0]["calls"] == 3


def test_statistics_started_under_inference_mode_keep_counting():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    asa = AdaptiveSparseAttention(ASAConfig(block_size=16, samples_per_block=4, pool=8, reorder=False))
    with torch.inference_mode():
        asa(q, k, v, layer_idx=0)
        asa(q, k, v, layer_idx=1, dense=True)  # a dense call: its ones start the sums
    asa(q, k, v, layer_idx=0)
    asa(q, k, v, layer_idx=1, dense=True)
    st = asa.density_stats()
    assert st["layers"][0]["calls"] == 2 and st["layers"][1]["calls"] == 2
    assert st["layers"][1]["heads"] == [1.0, 1.0]


@pytest.mark.parametrize("family", FAMILIES)
def test_pool_left_null_is_the_families(family):
    # SPEC 1.5: compensation pool 32 for Wan, 16 for CogVideoX; an ASAConfig without a pool (the default)
    # takes the installed transformer's, a bare AdaptiveSparseAttention the default 32
    model = make(family)
    cfg = ASAConfig(**dict({k: v for k, v in SPARSE.items() if k != "pool"}, block_size=64))
    asa = set_adaptive_sparse_attention(model, cfg)
    assert asa.cfg.pool == {"wan": 32, "cogvideox": 16}[family] and cfg.pool is None  # the caller's stays
    assert AdaptiveSparseAttention(ASAConfig()).cfg.pool == 32
    assert AdaptiveSparseAttention(ASAConfig(block_size=16)).cfg.pool == 16  # at most one block

"""Review of the model adapters, the tiny models, the run config and utils/process_prompts.py:
one test per bug found, each failing before its fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from videoblade.config import ConfigError, load_config
from videoblade.models import ModelRequestError, WanAdapter, get_adapter
from videoblade.models.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

# CogVideoX1.5-5B's transformer config as published (diffusers format; written here, never downloaded)
COGVIDEOX15_TRANSFORMER = {
    "_class_name": "CogVideoXTransformer3DModel", "attention_head_dim": 64, "in_channels": 16, "out_channels": 16,
    "max_text_seq_length": 226, "num_attention_heads": 48, "num_layers": 42, "patch_bias": False, "patch_size": 2,
    "patch_size_t": 2, "sample_frames": 81, "sample_height": 300, "sample_width": 300,
    "temporal_compression_ratio": 4, "text_embed_dim": 4096, "time_embed_dim": 512,
    "use_learned_positional_embeddings": False, "use_rotary_positional_embeddings": True,
}
COGVIDEOX_VAE = {"_class_name": "AutoencoderKLCogVideoX", "block_out_channels": [128, 256, 256, 512],
                 "latent_channels": 16, "scaling_factor": 0.7, "temporal_compression_ratio": 4}
WAN_TRANSFORMER = {"_class_name": "WanTransformer3DModel", "in_channels": 16, "out_channels": 16,
                   "patch_size": [1, 2, 2]}
WAN_VAE = {"_class_name": "AutoencoderKLWan", "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True],
           "z_dim": 16}


def _config_folder(root: Path, transformer: dict, vae: dict) -> Path:
    """A diffusers-layout folder holding only configs (junk weights: nothing may load them)."""
    for comp, cfg in (("transformer", transformer), ("vae", vae)):
        (root / comp).mkdir(parents=True)
        (root / comp / "config.json").write_text(json.dumps(cfg))
        (root / comp / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-review")


# ---------------------------------------------------------------------------- tiny CogVideoX tiling
def test_tiny_cogvideox_tiled_decode_keeps_the_frame_size(tiny_dir):
    # the tiny VAE's sample size set enable_tiling()'s tiles to 32 x 48 pixels, with which
    # AutoencoderKLCogVideoX's tiled decode returned 64 x 110 frames for a 64 x 96 video
    folder = build_tiny_model(tiny_dir / "cog", "cogvideox", seed=0)
    ad = get_adapter(folder)
    vae = ad.load(folder, "fp32", components=("vae",)).vae
    g = ad.geometry(folder, 64, 96, 9)
    z = torch.randn(1, *g.latent_shape, generator=torch.Generator().manual_seed(0))
    plain = ad.decode(vae, z)
    vae.enable_tiling()
    assert vae.tile_sample_min_height < 64 and vae.tile_sample_min_width < 96  # the frame really is tiled
    tiled = ad.decode(vae, z)
    assert plain.shape == tiled.shape == (1, 9, 64, 96, 3)
    # tiles blend at their seams, so pixels differ there, but the frame is the same picture
    assert (tiled.float() - plain.float()).abs().mean() < 16


# ---------------------------------------------------------------------------- CogVideoX 1.5 rotary table
def test_cogvideox15_size_beyond_its_rotary_table_refused(tmp_path, tiny_dir):
    folder = _config_folder(tmp_path / "cog15", COGVIDEOX15_TRANSFORMER, COGVIDEOX_VAE)
    ad = get_adapter(folder)
    ad.geometry(folder, 768, 1360, 81)  # the published size
    ad.geometry(folder, 2400, 2400, 81)  # the table's full extent (300 latent rows / patch 2)
    with pytest.raises(ModelRequestError, match=r"height=2416 gives 151 token rows.*use height <= 2400"):
        ad.geometry(folder, 2416, 1360, 81)
    with pytest.raises(ModelRequestError, match=r"width=2432 .*use width <= 2400"):
        ad.load(folder, "fp32", components=("transformer",), height=768, width=2432, frames=81)  # before weights
    # CogVideoX 1.0 interpolates its rotary grid: any size works there
    cfg10 = {k: v for k, v in COGVIDEOX15_TRANSFORMER.items() if k not in ("patch_size_t", "patch_bias")}
    cfg10.update(sample_height=60, sample_width=90, sample_frames=49)
    folder10 = _config_folder(tmp_path / "cog10", cfg10, COGVIDEOX_VAE)
    assert get_adapter(folder10).geometry(folder10, 960, 1440, 49).token_grid == (13, 60, 90)

    # the limit is the real one: the tiny 1.5 model (sample 8 x 12 latents) runs at 64 x 96 pixels,
    # and a larger size, accepted before, failed inside the transformer after the weights loaded
    tiny = build_tiny_model(tiny_dir / "cog15", "cogvideox", seed=0,
                            transformer={"patch_size_t": 2, "patch_bias": False})
    tad = get_adapter(tiny)
    tr = tad.load(tiny, "fp32", components=("transformer",)).transformer
    g = tad.geometry(tiny, 64, 96, 9)
    x = torch.randn(1, *g.latent_shape)
    out = tad.predict(tr, x, torch.tensor([500]), torch.randn(1, g.text_tokens, 32), g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    for h, w in ((80, 96), (64, 112)):
        with pytest.raises(ModelRequestError, match="rotary table"):
            tad.geometry(tiny, h, w, 9)


# ---------------------------------------------------------------------------- size messages
def test_nonpositive_size_points_at_a_positive_one(tmp_path):
    folder = _config_folder(tmp_path / "wan", WAN_TRANSFORMER, WAN_VAE)
    # was "height=-480 is not divisible by 16 ...: use -464" (and "use 0" for -5)
    with pytest.raises(ModelRequestError, match=r"height=-480 is not a positive multiple of 16 .*: use 16$"):
        WanAdapter().geometry(folder, -480, 832, 81)
    with pytest.raises(ModelRequestError, match=r"width=-5 is not a positive multiple of 16 .*: use 16$"):
        WanAdapter().geometry(folder, 480, -5, 81)
    with pytest.raises(ModelRequestError, match=r"height=500 is not divisible by 16 .*: use 496 or 512$"):
        WanAdapter().geometry(folder, 500, 832, 81)


# ---------------------------------------------------------------------------- Wan prompt padding
def test_wan_padding_is_zero_even_where_the_encoder_overflowed(tiny_dir):
    """WanPipeline cuts each embedding to its prompt's tokens and pads with zeros; a product with
    the mask instead turned a non-finite padded row (T5 overflowing in fp16) into NaN, which Wan's
    unmasked cross-attention then spreads over the whole video."""
    import diffusers

    folder = build_tiny_model(tiny_dir / "wan", "wan", seed=0)
    ad = get_adapter(folder)
    m = ad.load(folder, "fp32", components=("text_encoder", "tokenizer"))
    enc = m.text_encoder

    def overflow_padding(module, args, kwargs, out):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        out.last_hidden_state.masked_fill_(~mask.bool().unsqueeze(-1), float("inf"))
        return out

    handle = enc.register_forward_hook(overflow_padding, with_kwargs=True)
    try:
        L = ad.text_max_length(folder)
        ours = ad.encode_prompts(enc, m.tokenizer, ["a red cat", "ocean"], L)
        pipe = diffusers.WanPipeline(tokenizer=m.tokenizer, text_encoder=enc, transformer=None, vae=None,
                                     scheduler=None)
        theirs, _ = pipe.encode_prompt(["a red cat", "ocean"], do_classifier_free_guidance=False,
                                       max_sequence_length=L, device="cpu")
    finally:
        handle.remove()
    assert torch.isfinite(theirs).all()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize("value", [0, -3])
def test_text_max_length_below_one_refused(value):
    with pytest.raises(ConfigError, match=r"model.text_max_length: must be >= 1"):
        load_config(None, [f"model.text_max_length={value}"])
    assert load_config(None, ["model.text_max_length=77"]).model.text_max_length == 77
    assert load_config(None, ["model.text_max_length=null"]).model.text_max_length is None


# ---------------------------------------------------------------------------- utils/process_prompts.py
def test_process_prompts_request_errors_are_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("process_prompts_review", ROOT / "utils" / "process_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # a model folder that is not there: one error line and exit status 2, not a traceback
    assert mod.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model folder") and "Traceback" not in err
    # a prompt file that is not there (a PromptStoreError)
    folder = _config_folder(tmp_path / "wan", WAN_TRANSFORMER, WAN_VAE)
    for comp, name in (("text_encoder", "config.json"), ("tokenizer", "tokenizer_config.json")):
        (folder / comp).mkdir()
        (folder / comp / name).write_text("{}")
    assert mod.main(["--model", str(folder), "--prompts", str(tmp_path / "none.txt"),
                     "--out", str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err.startswith("error: ")

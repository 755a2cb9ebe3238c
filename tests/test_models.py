"""Model adapters and tiny models: shapes from configs, request validation before any weights
load, the tiny folders through the adapters and through diffusers' own pipelines."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from videoblade.models import (
    CogVideoXAdapter,
    ModelRequestError,
    WanAdapter,
    get_adapter,
)
from videoblade.models.tiny import STAMP_FILE, build_tiny_model, tiny_model_folder

# ---------------------------------------------------------------------------- published configs
# Values as published in the diffusers-format checkpoints (written here, never downloaded).
WAN_1_3B = {
    "transformer": {
        "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
        "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
        "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096,
    },
    "vae": {
        "_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
        "dropout": 0.0, "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16,
    },
    "scheduler": {
        "_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "solver_order": 2,
    },
}
COGVIDEOX_5B = {
    "transformer": {
        "_class_name": "CogVideoXTransformer3DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": 64, "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 16,
        "max_text_seq_length": 226, "norm_elementwise_affine": True, "norm_eps": 1e-05, "num_attention_heads": 48,
        "num_layers": 42, "out_channels": 16, "patch_size": 2, "sample_frames": 49, "sample_height": 60,
        "sample_width": 90, "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
        "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
        "timestep_activation_fn": "silu", "use_learned_positional_embeddings": False,
        "use_rotary_positional_embeddings": True,
    },
    "vae": {
        "_class_name": "AutoencoderKLCogVideoX", "block_out_channels": [128, 256, 256, 512], "latent_channels": 16,
        "layers_per_block": 3, "norm_num_groups": 32, "scaling_factor": 0.7, "temporal_compression_ratio": 4,
    },
    "scheduler": {
        "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0, "timestep_spacing": "trailing",
    },
}
COMPONENT_CONFIG = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
WEIGHT_FILE = {"transformer": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def config_folder(root: Path, configs: dict, junk_weights: bool = True) -> Path:
    """A diffusers-layout folder holding only configs; weights files are junk bytes, so anything
    that tries to read them fails loudly (a validation must fire before that)."""
    for comp, cfg in configs.items():
        d = root / comp
        d.mkdir(parents=True, exist_ok=True)
        (d / COMPONENT_CONFIG[comp]).write_text(json.dumps(cfg))
        if junk_weights and comp in WEIGHT_FILE:
            (d / WEIGHT_FILE[comp]).write_bytes(b"not a safetensors file")
    return root


@pytest.fixture
def wan_cfg_folder(tmp_path):
    return config_folder(tmp_path / "wan13b", WAN_1_3B)


@pytest.fixture
def cog_cfg_folder(tmp_path):
    return config_folder(tmp_path / "cog5b", COGVIDEOX_5B)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_wan(tiny_root):
    return build_tiny_model(tiny_root / "tiny-wan", "wan", seed=0)


@pytest.fixture(scope="session")
def tiny_cog(tiny_root):
    return build_tiny_model(tiny_root / "tiny-cogvideox", "cogvideox", seed=0)


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Make every weight/tokenizer load raise, so a test proves its error came first."""
    import diffusers
    import transformers

    calls = []

    def forbid(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called: a validation should have fired before any weights load")
        return classmethod(f) if name != "AutoTokenizer" else staticmethod(f)

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", forbid("ModelMixin"))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbid("PreTrainedModel"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbid("AutoTokenizer"))
    return calls


# ---------------------------------------------------------------------------- geometry at real sizes
def test_wan_geometry_published_config(wan_cfg_folder):
    ad = get_adapter(wan_cfg_folder)
    assert isinstance(ad, WanAdapter)
    g = ad.geometry(wan_cfg_folder, 480, 832, 81)
    assert g.latent_shape == (16, 21, 60, 104)
    assert g.token_grid == (21, 30, 52) and g.video_tokens == 32760
    assert g.text_tokens == 0 and g.patch == (1, 2, 2) and g.seq_len == 32760
    # defaults fill in the family's size; other sizes scale
    assert ad.geometry(wan_cfg_folder).latent_shape == (16, 21, 60, 104)
    g2 = ad.geometry(wan_cfg_folder, 720, 1280, 33)
    assert g2.latent_shape == (16, 9, 90, 160) and g2.token_grid == (9, 45, 80)


def test_cogvideox_geometry_published_config(cog_cfg_folder):
    ad = get_adapter(cog_cfg_folder)
    assert isinstance(ad, CogVideoXAdapter)
    g = ad.geometry(cog_cfg_folder, 480, 720, 49)
    assert g.latent_shape == (16, 13, 60, 90)
    assert g.token_grid == (13, 30, 45) and g.video_tokens == 17550
    assert g.text_tokens == 226 and g.seq_len == 17776
    # the default size comes from the transformer's sample size x VAE factor, as CogVideoXPipeline
    d = ad.geometry(cog_cfg_folder)
    assert (d.height, d.width, d.frames) == (480, 720, 49)
    assert ad.text_max_length(cog_cfg_folder) == 226 and ad.default_cfg == 3.5 and WanAdapter.default_cfg == 5.0


def test_cogvideox_temporal_patch(tmp_path):
    # CogVideoX1.5-5B as published: patch_size_t 2, sample size 300 x 300 latents, 81 frames
    cfg = json.loads(json.dumps(COGVIDEOX_5B))
    cfg["transformer"].update(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
    folder = config_folder(tmp_path / "cog15", cfg)
    ad = get_adapter(folder)
    # as CogVideoXPipeline: 81 frames -> 21 latent frames, padded to 22 (one leading frame dropped
    # before the decode) -> 11 temporal patches
    g = ad.geometry(folder, 768, 1360, 81)
    assert g.latent_shape == (16, 22, 96, 170) and g.token_grid == (11, 48, 85) and g.patch == (2, 2, 2)
    d = ad.geometry(folder)  # the config's own sample_frames is accepted
    # the default size is 1.5's published 768 x 1360, not the pipeline's sample size x 8 (2400 x 2400)
    assert (d.height, d.width, d.frames) == (768, 1360, 81)
    # 85 frames -> 22 latent frames (no padding): the VAE decodes them to 88 frames, not 85
    with pytest.raises(ModelRequestError, match=r"frames=85 gives 22 latent frames.*use 81 or 89$"):
        ad.geometry(folder, 768, 1360, 85)


def test_nothing_hard_coded_in_geometry(tmp_path):
    # change every factor in the configs: the derived shapes follow
    cfg = json.loads(json.dumps(WAN_1_3B))
    cfg["transformer"].update(patch_size=[1, 4, 2], in_channels=48, out_channels=48)
    cfg["vae"].update(dim_mult=[1, 2, 4, 4, 4], temperal_downsample=[False, True, True, True], z_dim=48)
    folder = config_folder(tmp_path / "wanx", cfg)
    g = get_adapter(folder).geometry(folder, 512, 256, 17)
    assert g.latent_shape == (48, 3, 32, 16) and g.token_grid == (3, 8, 8)
    assert (g.temporal_compression, g.spatial_compression) == (8, 16)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "size, pattern",
    [
        ((480, 832, 80), r"frames=80 is not of the form 4k\+1 .*use 77 or 81"),
        ((480, 832, 50), r"use 49 or 53"),
        ((480, 832, 0), r"frames=0 .*use 1$"),
        ((500, 832, 81), r"height=500 is not divisible by 16 \(VAE spatial factor 8 x patch 2\): use 496 or 512"),
        ((480, 830, 81), r"width=830 .*use 816 or 832"),
        ((8, 832, 81), r"height=8 .*use 16$"),
    ],
    ids=["frames80", "frames50", "frames0", "height500", "width830", "height8"],
)
def test_bad_sizes_named_fix(wan_cfg_folder, no_weight_loads, size, pattern):
    ad = WanAdapter()
    with pytest.raises(ModelRequestError, match=pattern):
        ad.geometry(wan_cfg_folder, *size)
    # and through load(): the size check fires before any weights are touched
    with pytest.raises(ModelRequestError, match=pattern):
        ad.load(wan_cfg_folder, "fp32", components=("transformer", "vae"), height=size[0], width=size[1],
                frames=size[2])
    assert no_weight_loads == []


def test_cogvideox_bad_width(cog_cfg_folder):
    with pytest.raises(ModelRequestError, match=r"width=730 .*use 720 or 736"):
        CogVideoXAdapter().geometry(cog_cfg_folder, 480, 730, 49)


def test_cogvideox_even_latent_frames_rejected(cog_cfg_folder, tiny_cog):
    with pytest.raises(ModelRequestError, match=r"frames=45 gives 12 latent frames.*use 41 or 49"):
        CogVideoXAdapter().geometry(cog_cfg_folder, 480, 720, 45)
    # a frame count off the 4k+1 grid is pointed at counts CogVideoX accepts (odd latent counts),
    # not merely at the neighbouring 4k+1 values (53 and 5 would be refused in turn)
    for frames, want in ((50, "49 or 57"), (6, "1 or 9"), (18, "17 or 25")):
        with pytest.raises(ModelRequestError, match=f"frames={frames} is not of the form 4k\\+1 .*use {want}$"):
            CogVideoXAdapter().geometry(cog_cfg_folder, 480, 720, frames)
        for n in map(int, want.split(" or ")):
            CogVideoXAdapter().geometry(cog_cfg_folder, 480, 720, n)
    # why: the VAE really decodes an even latent count to 4F frames, an odd one to 4(F-1)+1
    ad = get_adapter(tiny_cog)
    vae = ad.load(tiny_cog, "fp32", components=("vae",)).vae
    with torch.no_grad():
        assert vae.decode(torch.zeros(1, 4, 2, 2, 2)).sample.shape[2] == 8
        assert vae.decode(torch.zeros(1, 4, 3, 2, 2)).sample.shape[2] == 9
    assert ad.decode(vae, torch.zeros(1, 4, 3, 2, 2)).shape[1] == 9


def test_family_mismatch(cog_cfg_folder, wan_cfg_folder, no_weight_loads):
    with pytest.raises(ModelRequestError, match=r"holds a cogvideox model .* not a wan model: set model.family=cogvideox"):
        WanAdapter().load(cog_cfg_folder, "fp32")
    with pytest.raises(ModelRequestError, match=r"holds a wan model"):
        CogVideoXAdapter().geometry(wan_cfg_folder, 480, 720, 49)
    assert no_weight_loads == []


def test_missing_folder_and_transformer(tmp_path, no_weight_loads):
    with pytest.raises(ModelRequestError, match="does not exist"):
        get_adapter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRequestError, match="has no transformer/config.json"):
        WanAdapter().load(tmp_path / "empty", "fp32")
    (tmp_path / "empty" / "transformer").mkdir()
    with pytest.raises(ModelRequestError, match="has no transformer/config.json"):
        WanAdapter().inspect(tmp_path / "empty")
    bad = config_folder(tmp_path / "other", {"transformer": {"_class_name": "FluxTransformer2DModel"}})
    with pytest.raises(ModelRequestError, match="FluxTransformer2DModel.*not supported"):
        get_adapter(bad)
    with pytest.raises(ModelRequestError, match="unknown model family 'sora'"):
        get_adapter("sora")
    assert no_weight_loads == []


@pytest.mark.parametrize("missing", ["vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_when_requested(tmp_path, missing, no_weight_loads):
    folder = config_folder(tmp_path / "wan", WAN_1_3B)
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text("{}")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{}")
    if missing in ("vae", "scheduler"):
        os.remove(folder / missing / COMPONENT_CONFIG[missing])
    else:
        for f in (folder / missing).iterdir():
            f.unlink()
    with pytest.raises(ModelRequestError, match=rf"no usable {missing}/"):
        WanAdapter().load(folder, "fp32", components=("transformer", missing))
    assert no_weight_loads == []


# ---------------------------------------------------------------------------- tiny models
def test_tiny_build_deterministic_and_cached(tmp_path):
    from safetensors.torch import load_file

    a = build_tiny_model(tmp_path / "a", "cogvideox", seed=3)
    b = build_tiny_model(tmp_path / "b", "cogvideox", seed=3)
    c = build_tiny_model(tmp_path / "c", "cogvideox", seed=4)
    for comp, fname in [("transformer", "diffusion_pytorch_model.safetensors"),
                        ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        ta, tb, tc = (load_file(p / comp / fname) for p in (a, b, c))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), comp
        assert not all(torch.equal(ta[k], tc[k]) for k in ta), comp
    # cached: same request reuses the folder untouched; a different request rebuilds it
    stamp = (a / STAMP_FILE).stat().st_mtime_ns
    marker = a / "transformer" / "marker"
    marker.write_text("x")
    assert build_tiny_model(tmp_path / "a", "cogvideox", seed=3) == a and marker.exists()
    assert (a / STAMP_FILE).stat().st_mtime_ns == stamp
    build_tiny_model(tmp_path / "a", "cogvideox", seed=3, transformer={"num_layers": 1})
    assert not marker.exists()
    assert json.loads((a / "transformer" / "config.json").read_text())["num_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_tiny_model_folder_cache_dir(tmp_path):
    p = tiny_model_folder("tiny-wan", seed=1, cache_dir=tmp_path)
    assert p.parent == tmp_path and (p / "model_index.json").is_file() and (p / STAMP_FILE).is_file()
    idx = json.loads((p / "model_index.json").read_text())
    assert idx["_class_name"] == "WanPipeline" and idx["transformer"][1] == "WanTransformer3DModel"


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_tiny_load_forward_decode(family, tiny_wan, tiny_cog):
    folder = tiny_wan if family == "wan" else tiny_cog
    ad = get_adapter(folder)
    assert ad.family == family
    m = ad.load(folder, "fp32", components=("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
                height=32, width=48, frames=9)
    g = m.geometry
    assert g.latent_shape == (4, 3, 4, 6) and g.token_grid == (3, 2, 3)
    assert g.text_tokens == (20 if family == "cogvideox" else 0)
    assert m.schedule.kind == ("flow" if family == "wan" else "v_prediction")
    L = ad.text_max_length(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts that fit: no truncation warning
        emb = ad.encode_prompts(m.text_encoder, m.tokenizer, ["a cat", "a dog running at night"], L)
    assert emb.shape == (2, L, 32)
    long = "a dog running at night " * L  # more tokens than the encoder sees: said, not silently cut
    with pytest.warns(UserWarning, match=rf"1 of 2 prompts are longer than the text encoder's {L} tokens"):
        cut = ad.encode_prompts(m.text_encoder, m.tokenizer, ["a cat", long], L)
    torch.testing.assert_close(cut[0], emb[0])
    x = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(0))
    out = ad.predict(m.transformer, x, torch.tensor([999, 400]), emb, g)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    frames = ad.decode(m.vae, out[:1])
    assert frames.shape == (1, 9, 32, 48, 3) and frames.dtype == torch.uint8
    assert frames.float().std() > 1.0  # not a constant image
    # structure the attention / LoRA code relies on
    attn = ad.self_attention_modules(m.transformer)
    assert len(attn) == 2 and all(name.endswith("attn1") for name, _ in attn)
    names = {n for n, _ in m.transformer.named_modules()}
    for target in ad.lora_target_modules:
        assert any(n.endswith("." + target) for n in names), target


def test_predict_matches_direct_call(tiny_wan, tiny_cog):
    import diffusers

    gen = torch.Generator().manual_seed(1)
    # Wan: the timestep input is sigma(t) * 1000 from the folder's (shifted) flow schedule
    ad = get_adapter(tiny_wan)
    m = ad.load(tiny_wan, "fp32", components=("transformer", "scheduler"))
    g = ad.geometry(tiny_wan, 32, 32, 9)
    x = torch.randn(2, *g.latent_shape, generator=gen)
    emb = torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([999, 250])
    shift = m.scheduler.config.flow_shift
    s = (t + 1) / 1000.0
    sig = shift * s / (1 + (shift - 1) * s)
    ref = m.transformer(hidden_states=x, timestep=sig * 1000, encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(ad.predict(m.transformer, x, t, emb, g), ref)
    assert not torch.allclose(ad.predict(m.transformer, x, torch.tensor([500, 250]), emb, g), ref)

    # CogVideoX: [B, F, C, H, W] layout, integer t, rotary embeddings as CogVideoXPipeline builds them
    ad = get_adapter(tiny_cog)
    tr = ad.load(tiny_cog, "fp32", components=("transformer",)).transformer
    # the pipeline's own method, bound to the two attributes it reads
    pipe = SimpleNamespace(transformer=tr, vae_scale_factor_spatial=ad.geometry(tiny_cog).spatial_compression)
    for h, w, f in [(64, 96, 17), (48, 32, 9)]:  # the tiny sample size and a different aspect
        g = ad.geometry(tiny_cog, h, w, f)
        x = torch.randn(2, *g.latent_shape, generator=gen)
        emb = torch.randn(2, g.text_tokens, 32, generator=gen)
        rot = diffusers.CogVideoXPipeline._prepare_rotary_positional_embeddings(
            pipe, h, w, g.latent_shape[1], torch.device("cpu"))
        xf = x.permute(0, 2, 1, 3, 4)
        ref = tr(hidden_states=xf, encoder_hidden_states=emb, timestep=t, image_rotary_emb=rot, return_dict=False)[0]
        got = ad.predict(tr, x, t, emb, g)
        torch.testing.assert_close(got, ref.permute(0, 2, 1, 3, 4))
        no_rot = tr(hidden_states=xf, encoder_hidden_states=emb, timestep=t, image_rotary_emb=None,
                    return_dict=False)[0]
        assert not torch.allclose(got, no_rot.permute(0, 2, 1, 3, 4), atol=1e-4)  # the rotary matters
    with pytest.raises(ModelRequestError, match="must have 20 tokens"):
        ad.predict(tr, x, t, emb[:, :5], g)


def test_predict_bf16_and_schedule_required(tiny_wan):
    ad = get_adapter(tiny_wan)
    m = ad.load(tiny_wan, "bf16", components=("transformer",))
    assert m.transformer.dtype == torch.bfloat16
    g = ad.geometry(tiny_wan, 32, 32, 9)
    x = torch.randn(1, *g.latent_shape)
    out = ad.predict(m.transformer, x, torch.tensor([500]), torch.randn(1, 4, 32), g)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    import diffusers

    bare = diffusers.WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    with pytest.raises(ModelRequestError, match="needs the model's schedule"):
        ad.predict(bare, x, torch.tensor([500]), torch.randn(1, 4, 32), g)
    with pytest.raises(ModelRequestError, match="latent shape"):
        ad.predict(m.transformer, x[:, :, :2], torch.tensor([500]), torch.randn(1, 4, 32), g)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_encode_and_decode_match_diffusers_pipeline(family, tiny_wan, tiny_cog):
    """Prompt encoding and decode equal the family's diffusers pipeline on the same folder."""
    import diffusers

    folder = tiny_wan if family == "wan" else tiny_cog
    ad = get_adapter(folder)
    P = diffusers.WanPipeline if family == "wan" else diffusers.CogVideoXPipeline
    pipe = P.from_pretrained(folder)
    m = ad.load(folder, "fp32", components=("vae", "text_encoder", "tokenizer"))
    L = ad.text_max_length(folder)
    prompts = ["a  red cat\n walking", "Ocean at sunset!"]
    ours = ad.encode_prompts(m.text_encoder, m.tokenizer, prompts, L)
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=L, device="cpu")
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-5)

    captured = {}

    def grab(pipeline, i, t, kwargs):  # the latents the pipeline decodes right after its last step
        captured["latents"] = kwargs["latents"].detach().clone()
        return {}

    n = 5 if family == "wan" else 9  # (CogVideoX's VAE needs an odd latent frame count)
    vid = pipe("a cat", output_type="np", generator=torch.Generator().manual_seed(0), height=32, width=32,
               num_frames=n, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=L,
               callback_on_step_end=grab).frames
    lat = captured["latents"]
    if family == "cogvideox":
        lat = lat.permute(0, 2, 1, 3, 4)  # the pipeline's [B, F, C, H, W] -> ours
    frames = ad.decode(m.vae, lat).numpy().astype(np.int16)
    expected = (np.asarray(vid) * 255).round().astype(np.int16)
    assert frames.shape == expected.shape == (1, n, 32, 32, 3)
    assert np.abs(frames - expected).max() <= 1


def test_cogvideox15_geometry_predict_decode_match_pipeline(tiny_root):
    """CogVideoX 1.5 (patch_size_t 2) as CogVideoXPipeline runs it: the latent frames padded to the
    temporal patch, the transformer called on them with the 1.5 rotary grid, the padding dropped
    before the decode, and exactly the requested frames out."""
    import diffusers

    folder = build_tiny_model(tiny_root / "tiny-cog15", "cogvideox", seed=0,
                              transformer={"patch_size_t": 2, "patch_bias": False})
    ad = get_adapter(folder)
    pipe = diffusers.CogVideoXPipeline.from_pretrained(folder)
    m = ad.load(folder, "fp32", components=("transformer", "vae", "scheduler"))
    L = ad.text_max_length(folder)
    calls, captured = [], {}

    def grab(pipeline, i, t, kwargs):
        captured["latents"] = kwargs["latents"].detach().clone()
        return {}

    for n in (9, 17):  # 3 and 5 latent frames: odd, as the VAE needs, padded to 4 and 6
        g = ad.geometry(folder, 32, 32, n)
        calls.clear()
        hook = pipe.transformer.register_forward_hook(
            lambda mod, args, kwargs, out: calls.append((kwargs, out[0].detach())), with_kwargs=True)
        try:
            vid = pipe("a cat", output_type="np", generator=torch.Generator().manual_seed(0), height=32, width=32,
                       num_frames=n, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=L,
                       callback_on_step_end=grab).frames
        finally:
            hook.remove()
        (kw, ref), = calls
        x = kw["hidden_states"].permute(0, 2, 1, 3, 4)  # the pipeline's [B, F, C, H, W] -> ours
        assert tuple(x.shape[1:]) == g.latent_shape
        got = ad.predict(m.transformer, x, kw["timestep"], kw["encoder_hidden_states"], g)
        torch.testing.assert_close(got, ref.permute(0, 2, 1, 3, 4).float())
        frames = ad.decode(m.vae, captured["latents"].permute(0, 2, 1, 3, 4)).numpy().astype(np.int16)
        expected = (np.asarray(vid) * 255).round().astype(np.int16)
        assert frames.shape == expected.shape == (1, n, 32, 32, 3)
        assert np.abs(frames - expected).max() <= 1
    # 13 frames -> 4 latent frames: the VAE would decode 16 frames; refused, pointing at 9 or 17
    with pytest.raises(ModelRequestError, match=r"frames=13 gives 4 latent frames.*use 9 or 17$"):
        ad.geometry(folder, 32, 32, 13)


def test_image_conditioned_and_two_expert_folders_refused(tmp_path, no_weight_loads):
    """Folders whose transformer the adapters cannot drive are refused before any weights load:
    image-to-video transformers (more input channels than latent channels: the image latents are
    concatenated) and Wan2.2's two-expert A14B (transformer_2 takes the low-noise steps)."""
    cfg = json.loads(json.dumps(WAN_1_3B))
    cfg["transformer"].update(in_channels=36, image_dim=1280)  # Wan2.1-I2V
    i2v = config_folder(tmp_path / "wan-i2v", cfg)
    with pytest.raises(ModelRequestError, match=r"36 input channels .*16 latent channels.*text-to-video"):
        WanAdapter().load(i2v, "fp32", components=("transformer",))
    with pytest.raises(ModelRequestError, match=r"36 input channels"):
        WanAdapter().geometry(i2v, 480, 832, 81)
    cfg = json.loads(json.dumps(COGVIDEOX_5B))
    cfg["transformer"].update(in_channels=32)  # CogVideoX-5b-I2V
    with pytest.raises(ModelRequestError, match=r"32 input channels .*16 latent channels"):
        CogVideoXAdapter().inspect(config_folder(tmp_path / "cog-i2v", cfg))

    a14b = config_folder(tmp_path / "wan22-a14b", WAN_1_3B)
    (a14b / "transformer_2").mkdir()
    (a14b / "transformer_2" / "config.json").write_text(json.dumps(WAN_1_3B["transformer"]))
    (a14b / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    with pytest.raises(ModelRequestError, match=r"transformer_2.*boundary_ratio 0.875"):
        WanAdapter().load(a14b, "fp32", components=("transformer",))
    assert no_weight_loads == []
    # a single-transformer folder as diffusers saves it (an empty transformer_2 entry) is fine
    (a14b / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": None, "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None], "vae": ["diffusers", "AutoencoderKLWan"]}))
    assert WanAdapter().geometry(a14b, 480, 832, 81).latent_shape == (16, 21, 60, 104)


def test_cogvideox_predict_after_inference_mode_trains(tiny_cog):
    """The rotary tables are cached per geometry: a first predict under torch.inference_mode (a
    user's sampling) must not leave inference tensors there for a later predict with gradients."""
    ad = get_adapter(tiny_cog)
    tr = ad.load(tiny_cog, "fp32", components=("transformer",)).transformer
    g = ad.geometry(tiny_cog, 48, 48, 9)  # a size no other test uses, so the first call fills the cache
    x, emb = torch.randn(1, *g.latent_shape), torch.randn(1, g.text_tokens, 32)
    with torch.inference_mode():
        want = ad.predict(tr, x, torch.tensor([500]), emb, g)
    tr.requires_grad_(True)
    out = ad.predict(tr, x, torch.tensor([500]), emb, g)
    out.square().mean().backward()
    assert tr.proj_out.weight.grad is not None
    torch.testing.assert_close(out.detach(), want)


def test_compile_vae_twice_cogvideox(tiny_cog):
    """The base compile_vae (CogVideoX's whole decoder) may be called again (a second configure of
    the same VAE): it compiles once and returns 0 the second time; the decode is unchanged."""
    torch._dynamo.reset()
    ad = get_adapter(tiny_cog)
    vae = ad.load(tiny_cog, "fp32", components=("vae",)).vae
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = ad.decode(vae, z)

    def backend(gm, example_inputs):
        return gm.forward

    assert ad.compile_vae(vae, backend=backend) == 1
    assert ad.compile_vae(vae, backend=backend) == 0
    assert torch.equal(ad.decode(vae, z), ref)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer"])
def test_weight_guard_is_effective(tiny_wan, no_weight_loads, component):
    """The guard the validation tests rely on really intercepts every component load."""
    with pytest.raises(AssertionError, match="was called"):
        WanAdapter().load(tiny_wan, "fp32", components=(component,))
    assert len(no_weight_loads) == 1

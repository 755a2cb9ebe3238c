"""Tiny random-weight Wan- and CogVideoX-architecture models, saved as real diffusers folders.

`build_tiny_model(path, family, seed)` writes transformer/, vae/, text_encoder/, tokenizer/,
scheduler/ and model_index.json with `save_pretrained`, so tests, the demo and the LoRA round
trips go through the same `from_pretrained` path that real weights use (and
`WanPipeline` / `CogVideoXPipeline.from_pretrained(path)` loads it). Nothing is downloaded:
the tokenizer is a small unigram vocabulary built in-process.

The architectures are the real ones at toy width (2 layers, 2 heads x 16 dims, 4 latent
channels), including CogVideoX-5B's rotary embeddings and a zero-SNR v-prediction DPM scheduler,
and Wan's flow UniPC scheduler (shift 3). A forward at 17 frames x 64 x 96 takes milliseconds
on a CPU. Weights are a pure function of (family, seed, overrides): each component is seeded on
its own, so overriding one component leaves the others' weights unchanged.

A folder is reused when its stamp file (`videoblade_tiny.json`) matches the request; builds go
to a temporary sibling folder and are renamed into place, so concurrent builders never see a
half-written folder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from videoblade.models.base import HINT_FILE

__all__ = ["TINY_DEFAULTS", "build_tiny_model", "tiny_config", "build_tokenizer", "tiny_model_folder"]

STAMP_FILE = "videoblade_tiny.json"
BUILDER_VERSION = 1

_COMMON_TEXT = dict(vocab_size=None, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "wan": {
        "transformer": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
                            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "vae": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                    temperal_downsample=[False, True, True], latents_mean=[-0.75, 0.1, 0.96, -0.29],
                    latents_std=[2.8, 1.45, 1.77, 1.92]),
        "text_encoder": dict(_COMMON_TEXT),
        "scheduler": dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                          flow_shift=3.0, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                          final_sigmas_type="zero"),
        "hints": {"default_size": [64, 96, 17], "text_max_length": 32},
    },
    "cogvideox": {
        "transformer": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                            time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8,
                            sample_frames=17, patch_size=2, patch_size_t=None, temporal_compression_ratio=4,
                            max_text_seq_length=20, use_rotary_positional_embeddings=True,
                            use_learned_positional_embeddings=False),
        # sample size: enable_tiling()'s tiles are half of it (48 x 80 pixels, smaller than the default
        # 64 x 96 frame, so tiling is exercised); AutoencoderKLCogVideoX's tiled decode keeps the frame
        # size only when a tile's kept part equals its stride (tile heights 48k, widths 40k, as
        # CogVideoX's 240 x 360): the 32 x 48 tiles of a 64 x 96 sample size decoded 64 x 96 frames as 70 x 110
        "vae": dict(block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=2,
                    temporal_compression_ratio=4, scaling_factor=0.7, sample_height=96, sample_width=160),
        "text_encoder": dict(_COMMON_TEXT),
        # as CogVideoX-5B: scaled-linear betas, zero terminal SNR, v-prediction, trailing spacing
        "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                          set_alpha_to_one=True, clip_sample=False, steps_offset=0, timestep_spacing="trailing"),
        "hints": {"default_size": [64, 96, 17]},
    },
}

_WORDS = ("a an the of and in on at with by from over under through into to is are cat dog bird fish horse robot "
          "car city street night day sunset sunrise ocean sea beach river lake mountain forest tree flower sky cloud "
          "rain snow fire light red blue green yellow white black small big old young man woman child walking "
          "running flying swimming dancing slowly fast camera view close up shot scene video beautiful").split()


def build_tokenizer():
    """A small T5-style unigram tokenizer (pad=0, eos=1, unk=2; appends </s>) built without the hub."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in pieces}

    def add(p: str, score: float) -> None:
        if p not in seen:
            seen.add(p)
            pieces.append((p, score))

    for w in _WORDS:
        add("\u2581" + w, -2.0)
    for c in string.ascii_letters + string.digits + string.punctuation:
        add("\u2581" + c, -4.0)
        add(c, -5.0)
    try:  # transformers >= 5: T5Tokenizer is the tokenizers-backed class and takes a vocabulary
        from transformers import T5Tokenizer

        return T5Tokenizer(vocab=pieces, extra_ids=0)
    except TypeError:  # transformers 4.x: same tokenizer through the `tokenizers` library
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.Unigram(pieces, unk_id=2))
        tok.normalizer = normalizers.Sequence([normalizers.Replace(r" {2,}", " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _merge(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def tiny_config(family: str = "wan", **overrides) -> dict[str, Any]:
    """The full build spec: per-component kwargs, after overrides
    (e.g. transformer={"num_layers": 3}, vae={...}, text_encoder={...}, scheduler={...}, hints={...})."""
    family = family.replace("tiny-", "")
    if family not in TINY_DEFAULTS:
        raise ValueError(f"tiny model family must be 'wan' or 'cogvideox', got {family!r}")
    unknown = set(overrides) - set(TINY_DEFAULTS[family])
    if unknown:
        raise ValueError(f"unknown tiny-model override(s) {sorted(unknown)}: use {sorted(TINY_DEFAULTS[family])}")
    cfg = _merge(TINY_DEFAULTS[family], overrides)
    # keep the pieces consistent: latent channels and text width follow the VAE / text encoder
    if family == "wan":
        z = cfg["vae"]["z_dim"]
        for key in ("latents_mean", "latents_std"):
            vals = cfg["vae"][key]
            if len(vals) != z:
                cfg["vae"][key] = [vals[i % len(vals)] for i in range(z)]
        cfg["transformer"].update(in_channels=z, out_channels=z, text_dim=cfg["text_encoder"]["d_model"])
    else:
        z = cfg["vae"]["latent_channels"]
        cfg["transformer"].update(in_channels=z, out_channels=z, text_embed_dim=cfg["text_encoder"]["d_model"])
    return cfg


def _seeded(seed: int, offset: int):
    torch.manual_seed(seed * 1000 + offset)


def _build(family: str, cfg: dict, seed: int, out: Path) -> None:
    import diffusers
    import transformers

    tokenizer = build_tokenizer()
    te_kwargs = dict(cfg["text_encoder"], vocab_size=len(tokenizer))
    # (transformer, VAE, text encoder, its config, scheduler, pipeline) class names per family
    names = {
        "wan": ("WanTransformer3DModel", "AutoencoderKLWan", "UMT5EncoderModel", "UMT5Config",
                "UniPCMultistepScheduler", "WanPipeline"),
        "cogvideox": ("CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "T5EncoderModel", "T5Config",
                      "CogVideoXDPMScheduler", "CogVideoXPipeline"),
    }[family]
    tr_cls, vae_cls, sched_cls, pipe_cls = (getattr(diffusers, n) for n in (names[0], names[1], names[4], names[5]))
    te_cls, te_cfg_cls = getattr(transformers, names[2]), getattr(transformers, names[3])
    with torch.random.fork_rng(devices=[]):
        _seeded(seed, 1)
        transformer = tr_cls(**cfg["transformer"])
        _seeded(seed, 2)
        vae = vae_cls(**cfg["vae"])
        _seeded(seed, 3)
        text_encoder = te_cls(te_cfg_cls(**te_kwargs))
        scheduler = sched_cls(**cfg["scheduler"])
        pipe = pipe_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / HINT_FILE).write_text(json.dumps({"family": family, "tiny": True, **cfg["hints"]}, indent=2))


def build_tiny_model(path: str | Path, family: str = "wan", seed: int = 0, force: bool = False, **overrides) -> Path:
    """Build (or reuse) a tiny diffusers-layout model folder at `path`; returns the path.

    overrides: per-component kwargs merged into TINY_DEFAULTS[family], e.g.
    `transformer={"num_layers": 4}`; the stamp records them, so a different request rebuilds.
    """
    import diffusers
    import transformers

    path = Path(path)
    family = family.replace("tiny-", "")
    cfg = tiny_config(family, **overrides)
    stamp = {"builder_version": BUILDER_VERSION, "family": family, "seed": int(seed), "config": cfg,
             "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    stamp_text = json.dumps(stamp, sort_keys=True, indent=2)
    if not force and (path / STAMP_FILE).is_file() and (path / STAMP_FILE).read_text() == stamp_text:
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        _build(family, cfg, int(seed), tmp)
        (tmp / STAMP_FILE).write_text(stamp_text)  # written last: its presence means complete
        if path.exists():
            if not force and (path / STAMP_FILE).is_file() and (path / STAMP_FILE).read_text() == stamp_text:
                return path  # a concurrent builder finished first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:  # lost a race to a concurrent builder: theirs is as good as ours
            if not ((path / STAMP_FILE).is_file() and (path / STAMP_FILE).read_text() == stamp_text):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def default_cache_dir() -> Path:
    """Where tiny folders are cached: $VIDEOBLADE_CACHE, else ~/.cache/videoblade."""
    root = os.environ.get("VIDEOBLADE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "videoblade")
    return Path(root)


def tiny_model_folder(family: str = "wan", seed: int = 0, cache_dir: str | Path | None = None, **overrides) -> Path:
    """Build (or reuse) the tiny model of a family under the cache dir; returns its folder."""
    family = family.replace("tiny-", "")
    name = f"tiny-{family}-s{seed}"
    if overrides:
        import hashlib

        name += "-" + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_tiny_model(root / name, family=family, seed=seed, **overrides)

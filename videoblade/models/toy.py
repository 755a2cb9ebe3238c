"""The `toy` family: a tiny Wan-architecture teacher that works on pixels (the demo's model).

It is the Wan adapter with the VAE replaced by the identity: the "latents" the sampler and the
trainer see are RGB pixels in [-1, 1], layout [B, 3, F, H, W], so `decode` only maps them to
uint8 frames. Why pixels rather than a tiny latent VAE: at the demo's 12x12 pixels x 5 frames a
VAE would have to be trained first (time the CPU budget does not have) and its reconstruction
error would mix into the demo's metrics; with the identity every metric measures exactly what the
transformer generated.

Everything else is Wan's: `WanTransformer3DModel` (patch 1x2x2, text by cross-attention, flow
schedule, timestep input sigma x 1000), a UMT5 text encoder and a T5 tokenizer, loaded from a
diffusers-layout folder (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`,
`model_index.json`) through the same `from_pretrained` calls as the real model, so the trainer,
the sampler, ASA and inference run on it unchanged. The family is recorded in the folder's
`videoblade.json` hint file (its transformer class alone would say "wan").

`build_toy_model(path, ...)` writes a folder with random weights; `videoblade.toy.teacher` trains
its transformer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from videoblade.models.base import HINT_FILE, ModelInfo, ModelRequestError, register_adapter
from videoblade.models.wan import WanAdapter

__all__ = ["ToyAdapter", "PixelIdentityVAE", "build_toy_model", "TOY_TRANSFORMER", "TOY_TEXT_ENCODER",
           "build_word_tokenizer"]

# family defaults: 2 heads x 32 = 64 wide, 4 layers; 16x16 pixels x 5 frames -> 5 x 8 x 8 = 320 tokens
# (the demo's profiles override the width and depth: videoblade.toy.pipeline.PROFILES)
TOY_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=3,
                       out_channels=3, text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TOY_TEXT_ENCODER = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


class PixelIdentityVAE(torch.nn.Module):
    """The toy family's "VAE": latents are pixels, decode is the identity (no parameters)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def decode(self, z: torch.Tensor, return_dict: bool = False):
        return (z,)


@register_adapter
class ToyAdapter(WanAdapter):
    family = "toy"
    transformer_classes = ()  # found by the folder's hint file, never by class name (that is Wan's)
    default_size = (16, 16, 5)
    default_cfg = 5.0
    default_text_max_length = 8

    def vae_factors(self, info: ModelInfo) -> tuple[int, int]:
        return 1, 1  # pixels

    def latent_channels(self, info: ModelInfo) -> int:
        return int(info.transformer_config.get("in_channels", 3))

    def _load_vae(self, folder: Path, dtype: torch.dtype):
        cfg = json.loads((folder / "vae" / "config.json").read_text())
        if cfg.get("_class_name") != "PixelIdentityVAE":
            raise ModelRequestError(f"{folder}/vae is not the toy family's identity decoder")
        return PixelIdentityVAE(int(cfg.get("channels", 3)))

    def _load_transformer(self, folder: Path, dtype: torch.dtype):
        transformer = super()._load_transformer(folder, dtype)
        # diffusers keeps Wan's RoPE tables in float64 on CPU, which makes the rotary multiply the
        # most expensive op of a model this small; float32 tables change outputs by ~1e-7 only.
        rope = transformer.rope
        rope.freqs_cos = rope.freqs_cos.float()
        rope.freqs_sin = rope.freqs_sin.float()
        return transformer

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3]."""
        if latents.ndim != 5:
            raise ModelRequestError(f"decode expects [B, C, F, H, W], got shape {tuple(latents.shape)}")
        video = (latents.float().cpu() / 2 + 0.5).clamp(0, 1)
        return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()

    def pipeline(self, folder, **kwargs):
        raise ModelRequestError("the toy family has no diffusers pipeline (its VAE is the identity): "
                                "use videoblade.sampling.sample with the toy adapter")


# ---------------------------------------------------------------------------- folder builder
def build_word_tokenizer(words: list[str]):
    """A T5-style tokenizer (pad=0, eos=1, unk=2, appends </s>) whose pieces are whole words,
    with single characters as a fallback, built without the hub."""
    import string

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in pieces}
    for w in list(words) + list(string.ascii_lowercase + string.digits):
        if "\u2581" + w not in seen:
            seen.add("\u2581" + w)
            pieces.append(("\u2581" + w, -1.0 if len(w) > 1 else -6.0))
    for c in string.ascii_letters + string.digits + string.punctuation:
        if c not in seen:
            seen.add(c)
            pieces.append((c, -8.0))
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_toy_model(path: str | Path, words: list[str], *, seed: int = 0, transformer: dict | None = None,
                    text_encoder: dict | None = None, flow_shift: float = 1.0,
                    default_size: tuple[int, int, int] = (16, 16, 5), text_max_length: int = 8) -> Path:
    """Write a toy-family diffusers folder with random weights (deterministic from `seed`).

    flow_shift 1.0: the shift of Wan's flow schedule grows with resolution (3.0 at 480p); a
    16x16 frame needs none.
    """
    import diffusers
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tcfg = dict(TOY_TRANSFORMER, **(transformer or {}))
    tok = build_word_tokenizer(words)
    ecfg = dict(TOY_TEXT_ENCODER, **(text_encoder or {}), vocab_size=len(tok))
    tcfg["text_dim"] = ecfg["d_model"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 1)
        model = diffusers.WanTransformer3DModel(**tcfg)
        torch.manual_seed(seed * 1000 + 3)
        enc = transformers.UMT5EncoderModel(transformers.UMT5Config(**ecfg))
    model.save_pretrained(path / "transformer", safe_serialization=True)
    enc.save_pretrained(path / "text_encoder", safe_serialization=True)
    tok.save_pretrained(path / "tokenizer")
    diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                      use_flow_sigmas=True, flow_shift=float(flow_shift), solver_order=2,
                                      solver_type="bh2", predict_x0=True, lower_order_final=True,
                                      final_sigmas_type="zero").save_pretrained(path / "scheduler")
    (path / "vae").mkdir(exist_ok=True)
    (path / "vae" / "config.json").write_text(json.dumps({"_class_name": "PixelIdentityVAE", "channels":
                                                          tcfg["in_channels"]}, indent=2))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "ToyWanPipeline", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "WanTransformer3DModel"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(tok).__name__], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "vae": ["videoblade", "PixelIdentityVAE"]}, indent=2))
    (path / HINT_FILE).write_text(json.dumps({"family": "toy", "default_size": list(default_size),
                                              "text_max_length": int(text_max_length)}, indent=2))
    return path

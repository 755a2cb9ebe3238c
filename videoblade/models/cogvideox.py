"""CogVideoX text-to-video adapter (`CogVideoXTransformer3DModel`, `AutoencoderKLCogVideoX`, T5).

The sampler's layout is [B, C, F, H, W]; the transformer takes and returns [B, F, C, H, W], so
`predict` permutes both ways. Text: `max_text_seq_length` (226 for 5B) T5 tokens are
concatenated before the video tokens inside self-attention. Rotary embeddings are built exactly
as `CogVideoXPipeline._prepare_rotary_positional_embeddings` builds them (1.0: resize-crop grid
relative to the config's sample size; 1.5 (`patch_size_t`): slice grid). The timestep input is
the integer t (v-prediction). Latents are scaled by the VAE's `scaling_factor`.

Frames: the VAE decodes an odd latent frame count F to 4(F-1)+1 frames (an even one to 4F), so a
request needs an odd count. CogVideoX 1.5 then pads the latents to its temporal patch (one leading
frame, as `CogVideoXPipeline` does: 81 frames -> 21 latent frames -> 22), and `decode` drops that
frame again; an even latent count given to `decode` is read as such padded latents.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from videoblade.models.base import (
    ModelAdapter,
    ModelInfo,
    ModelRequestError,
    VideoGeometry,
    register_adapter,
    unwrap_model,
)


@lru_cache(maxsize=64)
def _rotary(head_dim: int, grid_h: int, grid_w: int, latent_frames: int, patch_t: int | None, base_h: int,
            base_w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    # cached for the process: never inference tensors (a first call under torch.inference_mode would
    # leave tables that no later forward with gradients may use)
    with torch.inference_mode(False):
        if patch_t is None:  # CogVideoX 1.0
            crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                                           temporal_size=latent_frames, device=torch.device(device))
        base_num_frames = (latent_frames + patch_t - 1) // patch_t  # CogVideoX 1.5
        return get_3d_rotary_pos_embed(embed_dim=head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                       temporal_size=base_num_frames, grid_type="slice", max_size=(base_h, base_w),
                                       device=torch.device(device))


def rotary_embeddings(config, geometry: VideoGeometry, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(freqs_cos, freqs_sin) for this geometry, or None when the model has no rotary embeddings."""
    if not config.get("use_rotary_positional_embeddings", False):
        return None
    p = int(config["patch_size"])
    _, F, _, _ = geometry.latent_shape
    _, gh, gw = geometry.token_grid
    return _rotary(int(config["attention_head_dim"]), gh, gw, F, config.get("patch_size_t"),
                   int(config["sample_height"]) // p, int(config["sample_width"]) // p, str(torch.device(device)))


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    default_size = (480, 720, 49)
    default_cfg = 3.5
    default_lambda_reg = 0.5
    default_fps = 8
    default_asa_pool = 16
    default_text_max_length = 226
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    blocks_attr = "transformer_blocks"
    pipeline_class = "CogVideoXPipeline"
    text_encoder_class = "T5EncoderModel"

    def vae_factors(self, info: ModelInfo) -> tuple[int, int]:
        v = info.vae_config
        if v is None:
            raise ModelRequestError(f"{info.folder} has no vae/config.json: the VAE config sets the latent shape")
        spatial = 2 ** (len(v.get("block_out_channels", (128, 256, 256, 512))) - 1)  # as CogVideoXPipeline
        temporal = v.get("temporal_compression_ratio", info.transformer_config.get("temporal_compression_ratio", 4))
        return int(temporal), int(spatial)

    def patch_size(self, info: ModelInfo) -> tuple[int, int, int]:
        c = info.transformer_config
        p = int(c.get("patch_size", 2))
        return (int(c.get("patch_size_t") or 1), p, p)

    def latent_frames(self, info: ModelInfo, frames: int) -> int:
        # CogVideoXPipeline (1.5, patch_size_t): the latent frames padded up to the temporal patch
        pt = self.patch_size(info)[0]
        return -(-super().latent_frames(info, frames) // pt) * pt

    def _latent_frames_problem(self, info: ModelInfo, frames: int, latent_frames: int) -> str | None:
        # AutoencoderKLCogVideoX decodes latent frames in pairs after an odd-sized first group; its
        # temporal upsampler keeps the first frame only for odd counts, so an even latent count F
        # decodes to 4F frames instead of 4(F-1)+1: the requested frame count cannot come out. The
        # count the VAE decodes is the one before 1.5's padding (the pipeline drops the padding).
        unpadded = super().latent_frames(info, frames)
        if unpadded % 2 == 0:
            return (f"frames={frames} gives {unpadded} latent frames; CogVideoX's VAE needs an odd latent "
                    f"frame count to decode exactly {frames} frames")
        return None

    def geometry(self, folder_or_info, height=None, width=None, frames=None) -> VideoGeometry:
        info = self._as_info(folder_or_info)
        g = super().geometry(info, height, width, frames)
        c = info.transformer_config
        if c.get("use_rotary_positional_embeddings", False) and c.get("patch_size_t") is not None:
            # CogVideoX 1.5's rotary table ("slice" grid) has sample_height / p x sample_width / p
            # positions and is cut to the token grid: a larger grid has no positions (the forward
            # then fails on mismatched sizes, after the weights loaded; CogVideoXPipeline likewise)
            _, ph, pw = g.patch
            for name, val, grid, sample, p, default in (
                    ("height", g.height, g.token_grid[1], "sample_height", ph, 60),  # diffusers' defaults
                    ("width", g.width, g.token_grid[2], "sample_width", pw, 90)):
                most = int(c.get(sample, default)) // p
                if grid > most:
                    raise ModelRequestError(
                        f"{name}={val} gives {grid} token {'rows' if name == 'height' else 'columns'}, more than "
                        f"the {most} positions of CogVideoX 1.5's rotary table (transformer {sample} "
                        f"{c.get(sample, default)} / patch {p}): use {name} <= {most * p * g.spatial_compression}"
                    )
        return g

    def vae_decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        # geometry gives an even latent count only as CogVideoX 1.5's padded latents: drop the leading
        # pad frame as CogVideoXPipeline does (decoded, it would add 4 frames to the video)
        if z.shape[2] % 2 == 0:
            z = z[:, :, 1:]
        return super().vae_decode(vae, z)

    def text_tokens(self, info: ModelInfo) -> int:
        return int(info.transformer_config.get("max_text_seq_length", 226))

    def text_max_length(self, folder_or_info) -> int:
        # the text segment inside self-attention is exactly max_text_seq_length tokens
        return self.text_tokens(self._as_info(folder_or_info))

    def resolve_size(self, folder_or_info, height=None, width=None, frames=None):
        info = self._as_info(folder_or_info)
        if "default_size" not in info.hints and info.vae_config is not None:
            # CogVideoXPipeline's default: the transformer's sample size in latent units x VAE factor
            c = info.transformer_config
            tc, sc = self.vae_factors(info)
            dh, dw = int(c.get("sample_height", 60)) * sc, int(c.get("sample_width", 90)) * sc
            if c.get("patch_size_t") is not None and height is None and width is None:
                # CogVideoX 1.5: its sample size is the rotary table's extent (300 x 300 latents, so
                # the pipeline's default would be 2400 x 2400 pixels, far past any GPU's memory at 81
                # frames); the size it was trained and published for is 768 x 1360
                dh, dw = min(dh, 768), min(dw, 1360)
            df = int(c.get("sample_frames", 49))
            return (int(dh if height is None else height), int(dw if width is None else width),
                int(df if frames is None else frames))
        return super().resolve_size(info, height, width, frames)

    def encode_prompts(self, text_encoder, tokenizer, prompts, max_length=None, device=None, dtype=None):
        # diffusers CogVideoXPipeline._get_t5_prompt_embeds: no attention mask, padding kept
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = int(max_length or self.default_text_max_length)
        enc_device = next(text_encoder.parameters()).device
        self.warn_if_truncated(tokenizer, prompts, max_length)
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(enc_device)
        with torch.no_grad():
            emb = text_encoder(ids)[0]
        return emb.to(device=device or enc_device, dtype=dtype or emb.dtype)

    def predict(self, transformer, x_t, t, prompt_embeds, geometry: VideoGeometry, attention_kwargs=None,
                schedule=None):
        if prompt_embeds.shape[1] != geometry.text_tokens:
            raise ModelRequestError(
                f"CogVideoX prompt embeddings must have {geometry.text_tokens} tokens (transformer "
                f"max_text_seq_length), got {prompt_embeds.shape[1]}: encode with max_length={geometry.text_tokens}"
            )
        _, timestep, x, emb = self._model_inputs(transformer, x_t, t, prompt_embeds, geometry, schedule)
        rotary = rotary_embeddings(unwrap_model(transformer).config, geometry, x.device)
        out = transformer(
            hidden_states=x.permute(0, 2, 1, 3, 4),  # [B, F, C, H, W]
            encoder_hidden_states=emb,
            timestep=timestep,
            image_rotary_emb=rotary,
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4).float()

"""The samplers against diffusers' own pipeline loops on a tiny model (SPEC section 2, inference)."""

import diffusers
import pytest
import torch

from videoblade.models import get_adapter
from videoblade.models.tiny import tiny_model_folder
from videoblade.sampling import sample_unipc


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_unipc_matches_the_diffusers_pipeline_loop(family, guidance):
    """sample_unipc on the folder's transformer gives the latents of WanPipeline / CogVideoXPipeline
    run with UniPC from the folder's scheduler config (flow shift 3 for Wan; zero-terminal-SNR
    v-prediction, trailing spacing for CogVideoX), batch 2, with and without CFG, one model call
    per step and pass. (The tiny CogVideoX folder has snr_shift_scale 1, so diffusers' UniPC, which
    ignores that key, is on the same schedule; sample_unipc carries any SNR shift over through
    trained betas.)"""
    folder = tiny_model_folder(family)
    ad = get_adapter(folder)
    transformer = ad.load(folder, dtype=torch.float32, components=("transformer",)).transformer
    geo = ad.geometry(folder, *ad.resolve_size(folder))
    B, steps, text_len = 2, 5, geo.text_tokens or 32
    emb = torch.randn(B, text_len, 32, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, text_len, 32, generator=torch.Generator().manual_seed(2))
    lat = torch.randn(B, *geo.latent_shape, generator=torch.Generator().manual_seed(3))
    scheduler = diffusers.UniPCMultistepScheduler.from_config(
        diffusers.UniPCMultistepScheduler.load_config(folder, subfolder="scheduler"))
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg.expand(B, -1, -1) if guidance > 1 else None,
              guidance_scale=guidance, num_inference_steps=steps, output_type="latent", height=geo.height,
              width=geo.width, num_frames=geo.frames)
    if family == "wan":
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                     scheduler=scheduler)
        ref = pipe(latents=lat.clone(), **kw).frames
    else:
        pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                           scheduler=scheduler)
        pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal = geo.spatial_compression, geo.temporal_compression
        ref = pipe(latents=lat.clone().permute(0, 2, 1, 3, 4), **kw).frames.permute(0, 2, 1, 3, 4)
    calls = []
    hook = transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        got = sample_unipc(ad, transformer, ad.schedule(folder), emb, geo, steps=steps, guidance=guidance,
                           negative_embeds=neg, latents=lat.clone(), progress=False)
    finally:
        hook.remove()
    assert len(calls) == steps * (2 if guidance > 1 else 1)
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)

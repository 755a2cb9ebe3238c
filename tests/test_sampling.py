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


def _folder_with_scheduler(tmp_path, family, overrides):
    """A folder holding only the tiny family's scheduler/ with `overrides` merged into its config
    (what `adapter.schedule` / `adapter.load` read)."""
    import json

    src = tiny_model_folder(family) / "scheduler" / "scheduler_config.json"
    cfg = {**json.loads(src.read_text()), **overrides}
    (tmp_path / "scheduler").mkdir(parents=True, exist_ok=True)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return tmp_path


FOLDER_SCHEDULERS = [
    ("wan", {}, None),
    ("wan", {"solver_order": 3}, None),
    ("wan", {"final_sigmas_type": "sigma_min"}, None),
    ("wan", {"disable_corrector": [0]}, None),
    ("wan", {"flow_shift": 5.0, "solver_order": 1}, None),
    ("wan", {"flow_shift": 5.0, "solver_order": 3}, 2.0),  # an explicit --flow-shift overrides the folder's only
    ("cogvideox", {}, None),
    ("cogvideox", {"timestep_spacing": "linspace"}, None),
    ("cogvideox", {"timestep_spacing": "leading", "steps_offset": 1}, None),
]


@pytest.mark.parametrize("family,overrides,flow_shift", FOLDER_SCHEDULERS,
                         ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_unipc_scheduler_follows_the_folder_scheduler_config(tmp_path, family, overrides, flow_shift):
    """`unipc_scheduler` on a folder's schedule is diffusers' UniPCMultistepScheduler built from the
    folder's own scheduler_config.json (solver order/type, lower_order_final, final_sigmas_type,
    corrector, spacing, flow shift), as WanPipeline / CogVideoXPipeline would run it; only an explicit
    flow_shift overrides. Same timesteps, sigmas and denoised latents for a fixed network."""
    from videoblade.sampling import unipc_denoise, unipc_scheduler

    folder = _folder_with_scheduler(tmp_path, family, overrides)
    schedule = get_adapter(family).schedule(folder)  # as adapter.load / the trainer build it
    ours = unipc_scheduler(schedule, flow_shift=flow_shift)
    ref = diffusers.UniPCMultistepScheduler.from_config(
        diffusers.UniPCMultistepScheduler.load_config(folder, subfolder="scheduler"),
        **({} if flow_shift is None else {"flow_shift": flow_shift}))
    steps = 6
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-5, atol=1e-6)

    def predict(x, t):  # a fixed nonlinear "network" of (x, t)
        return torch.tanh(x) * 0.7 + 1e-3 * t.float().view(-1, 1, 1, 1) - 0.1

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unipc_denoise(predict, ours, x, steps), unipc_denoise(predict, ref, x, steps),
                               rtol=1e-4, atol=1e-4)


def test_sample_unipc_follows_the_folder_like_wan_pipeline(tmp_path):
    """The user path (`--sampler unipc` / `--baseline`): sample_unipc with the schedule `adapter.load`
    attaches gives WanPipeline's latents when the folder's UniPC settings are not diffusers' defaults."""
    src = tiny_model_folder("wan")
    folder = _folder_with_scheduler(tmp_path, "wan", {"solver_order": 3, "final_sigmas_type": "sigma_min",
                                                      "disable_corrector": [0]})
    ad = get_adapter(src)
    transformer = ad.load(src, dtype=torch.float32, components=("transformer",)).transformer
    geo = ad.geometry(src, *ad.resolve_size(src))
    emb = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(1))
    lat = torch.randn(1, *geo.latent_shape, generator=torch.Generator().manual_seed(3))
    scheduler = diffusers.UniPCMultistepScheduler.from_config(
        diffusers.UniPCMultistepScheduler.load_config(folder, subfolder="scheduler"))
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                 scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(latents=lat.clone(), prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=4,
               output_type="latent", height=geo.height, width=geo.width, num_frames=geo.frames).frames
    got = sample_unipc(ad, transformer, ad.schedule(folder), emb, geo, steps=4, latents=lat.clone(), progress=False)
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-4)

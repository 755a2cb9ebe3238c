"""The one few-step sampler: TDM's eta-stochastic K-step rollout (SPEC section 2, step 1).

Shared by the TDM trainer (rollout with grad off, keeping every stage's noisy state),
training-time validation, `utils/inference.py` and the demo. From x ~ N(0, I) at
t_K = T - 1, stage k predicts (x0_k, eps_k); the next state is
    x = alpha(t_{k-1}) x0_k + sigma(t_{k-1}) (eta eps_k + sqrt(1 - eta^2) z),
with t_{k-1} = t_k - T/K, and the sample is the last stage's x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from videoblade.schedules import Schedule, stage_timesteps

__all__ = ["randn", "eta_step", "rollout", "guided", "sample"]

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B,...], t [B] long) -> output


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """float32 N(0, I) drawn on the generator's device (so a seed gives the same noise on any target).
    Noise drawn on the CPU for a CUDA target goes through page-locked memory without a host sync,
    so the draw overlaps the GPU's work instead of idling it."""
    gen_device = generator.device if generator is not None else torch.device(device)
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    target = torch.device(device)
    if noise.device.type == "cpu" and target.type == "cuda":
        return noise.pin_memory().to(target, non_blocking=True)
    return noise.to(target)


def eta_step(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t_next, eta: float,
             noise: torch.Tensor) -> torch.Tensor:
    """Land at t_next from a prediction: alpha x0 + sigma (eta eps + sqrt(1 - eta^2) z)."""
    eps_mix = eta * eps + math.sqrt(max(0.0, 1.0 - eta * eta)) * noise
    return schedule.add_noise(x0, eps_mix, t_next)


@torch.no_grad()
def rollout(predict: PredictFn, schedule: Schedule, x_init: torch.Tensor, timesteps: Sequence[int], eta: float,
            generator: torch.Generator | None = None, keep_states: bool = False,
            progress: Callable | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the K-step sampler from x_init at timesteps[0].

    Returns (x0 of the last stage, states) where states[j] is the noisy input of stage j
    (timesteps[j]) when keep_states, else []. `progress` wraps the step iterator (e.g. tqdm).
    """
    x = x_init.float()
    B = x.shape[0]
    states: list[torch.Tensor] = []
    steps = list(enumerate(timesteps))
    x0 = x
    for j, t in (progress(steps) if progress is not None else steps):
        if keep_states:
            states.append(x.clone())
        t_vec = torch.full((B,), int(t), dtype=torch.long, device=x.device)
        x0, eps = schedule.to_x0_eps(predict(x, t_vec), x, t_vec)
        if j + 1 < len(timesteps):
            t_next = torch.full((B,), int(timesteps[j + 1]), dtype=torch.long, device=x.device)
            x = eta_step(schedule, x0, eps, t_next, eta, randn(x.shape, generator, x.device))
    return x0, states


def guided(cond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, scale: float) -> PredictFn:
    """Classifier-free guidance on the network output: u + scale (c - u); scale 1 skips the uncond pass."""
    if scale == 1.0 or uncond is None:
        return cond

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = cond(x, t).float()
        u = uncond(x, t).float()
        return u + scale * (c - u)

    return predict


def _initial_latents(latents, prompt_embeds, geometry, generator):
    if latents is not None:
        return latents
    return randn((prompt_embeds.shape[0], *geometry.latent_shape), generator, prompt_embeds.device)


def _adapter_predictor(adapter, transformer, prompt_embeds, geometry, guidance, negative_embeds,
                       to_input=lambda t: t, schedule=None) -> PredictFn:
    """The guided network call both samplers use: cond (+ uncond from the negative embedding)."""

    def call(embeds):
        def predict(x, t):
            return adapter.predict(transformer, x, to_input(t), embeds, geometry, schedule=schedule)

        return predict

    uncond = None
    if guidance != 1.0:
        if negative_embeds is None:
            raise ValueError("guidance != 1 needs negative_embeds (the empty/negative prompt embedding)")
        B = prompt_embeds.shape[0]
        neg = negative_embeds.expand(B, *negative_embeds.shape[1:]) if negative_embeds.shape[0] == 1 else negative_embeds
        uncond = call(neg)
    return guided(call(prompt_embeds), uncond, guidance)


def _progress(progress: bool, desc: str) -> Callable | None:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False)


def sample(adapter, transformer, schedule: Schedule, prompt_embeds: torch.Tensor, geometry, steps: int = 8,
           eta: float = 0.9, generator: torch.Generator | None = None, guidance: float = 1.0,
           negative_embeds: torch.Tensor | None = None, latents: torch.Tensor | None = None,
           progress: bool = True, desc: str = "denoising") -> torch.Tensor:
    """Sample latents [B, C, F, H, W] (float32) with the eta sampler in `steps` stages."""
    latents = _initial_latents(latents, prompt_embeds, geometry, generator)
    predict = _adapter_predictor(adapter, transformer, prompt_embeds, geometry, guidance, negative_embeds)
    timesteps = stage_timesteps(steps, schedule.num_train_timesteps)
    x0, _ = rollout(predict, schedule, latents, timesteps, eta, generator, progress=_progress(progress, desc))
    return x0


# ---------------------------------------------------------------------------- UniPC (diffusers)
RawPredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,...], model timestep [B]) -> output


def unipc_scheduler(schedule: Schedule, flow_shift: float | None = None, timestep_spacing: str | None = None,
                    config: dict | None = None):
    """A diffusers ``UniPCMultistepScheduler`` on the same noise schedule as ``schedule``.

    Its settings are the model folder's own ``scheduler/scheduler_config.json`` (``config``, default
    the one ``schedule`` was built from: ``Schedule.from_model_folder`` / ``adapter.load`` record it),
    every key UniPC takes (solver_order, solver_type, lower_order_final, final_sigmas_type,
    disable_corrector, timestep spacing, ...), so ``--sampler unipc`` / ``--baseline`` run what
    ``WanPipeline`` / ``CogVideoXPipeline`` run with ``UniPCMultistepScheduler.from_config`` of that
    folder. Only the noise schedule is set from ``schedule``:

    flow (Wan): flow sigmas with ``flow_shift`` (an explicit value overrides; default the schedule's
    own shift, i.e. the folder's). v_prediction (CogVideoX): the schedule's alphas_cumprod passed as
    ``trained_betas`` (so the SNR shift and the zero-terminal-SNR rescale of the teacher's scheduler,
    which UniPC's own config keys cannot express, carry over; UniPC clamps the terminal alpha_bar to
    2**-24 itself); spacing the folder's, else trailing. ``timestep_spacing`` overrides the spacing.
    """
    import inspect

    from diffusers import UniPCMultistepScheduler

    T = schedule.num_train_timesteps
    cfg = config if config is not None else (schedule.scheduler_config or {})
    accepted = set(inspect.signature(UniPCMultistepScheduler.__init__).parameters) - {"self"}
    kw = {k: v for k, v in cfg.items() if k in accepted}  # what from_config keeps of another class's config
    if schedule.kind == "flow":
        shift = float(flow_shift if flow_shift is not None else schedule.shift)
        kw.update(num_train_timesteps=T, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                  trained_betas=None)
        kw.setdefault("timestep_spacing", "linspace")
    else:
        if flow_shift is not None:
            raise ValueError("flow_shift applies to flow-matching models (Wan) only")
        abar = (schedule.alphas.double() ** 2)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        betas = (1.0 - abar / prev).clamp(0.0, 1.0)
        zero_terminal = bool(abar[-1] < 1e-12)
        kw.update(num_train_timesteps=T, prediction_type="v_prediction", trained_betas=betas.numpy(),
                  rescale_betas_zero_snr=zero_terminal, use_flow_sigmas=False)
        kw.setdefault("timestep_spacing", "trailing")
    if timestep_spacing is not None:
        kw["timestep_spacing"] = timestep_spacing
    return UniPCMultistepScheduler(**kw)


@torch.no_grad()
def unipc_denoise(predict_raw: RawPredictFn, scheduler, latents: torch.Tensor, steps: int,
                  progress: Callable | None = None) -> torch.Tensor:
    """Run a diffusers multistep scheduler for ``steps`` steps from ``latents`` (pure noise).

    ``predict_raw`` takes the model timestep exactly as the scheduler lists it (for flow models
    sigma * T, for v-prediction the integer t) and returns the network output; the scheduler does
    the update. Returns the final latents (float32).
    """
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents.float()
    B = x.shape[0]
    ts = list(scheduler.timesteps)
    for t in (progress(ts) if progress is not None else ts):
        t_vec = t.reshape(1).expand(B).to(x.device)
        out = predict_raw(x, t_vec).float()
        x = scheduler.step(out, t, x, return_dict=False)[0].float()
    return x


__all__ += ["unipc_scheduler", "unipc_denoise"]


class _SchedulerTimesteps:
    """Stands in for a Schedule in `adapter.predict(..., schedule=)`: the timestep the scheduler
    lists is already the network's timestep input (sigma * T for flow, integer t for v-pred)."""

    @staticmethod
    def model_timestep(t):
        t = torch.as_tensor(t)
        return t.float() if t.is_floating_point() else t


def sample_unipc(adapter, transformer, schedule: Schedule, prompt_embeds: torch.Tensor, geometry, steps: int = 8,
                 guidance: float = 1.0, negative_embeds: torch.Tensor | None = None,
                 latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 flow_shift: float | None = None, progress: bool = True, desc: str = "denoising (unipc)"
                 ) -> torch.Tensor:
    """Sample latents [B, C, F, H, W] (float32) with diffusers' UniPC on the model's schedule and its
    folder's scheduler settings (`unipc_scheduler`: as WanPipeline / CogVideoXPipeline with
    `UniPCMultistepScheduler.from_config` of the folder; an explicit `flow_shift` overrides the folder's)."""
    latents = _initial_latents(latents, prompt_embeds, geometry, generator)
    # WanPipeline feeds the scheduler's float timestep (sigma * T); UniPC lists it as int64
    to_input = (lambda t: t.float()) if schedule.kind == "flow" else (lambda t: t.long())
    predict = _adapter_predictor(adapter, transformer, prompt_embeds, geometry, guidance, negative_embeds,
                                 to_input=to_input, schedule=_SchedulerTimesteps())
    scheduler = unipc_scheduler(schedule, flow_shift=flow_shift)
    return unipc_denoise(predict, scheduler, latents, steps, progress=_progress(progress, desc))


__all__.append("sample_unipc")

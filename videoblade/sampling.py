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
    """float32 N(0, I) drawn on the generator's device (so a seed gives the same noise on any target)."""
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32).to(device)


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


def sample(adapter, transformer, schedule: Schedule, prompt_embeds: torch.Tensor, geometry, steps: int = 8,
           eta: float = 0.9, generator: torch.Generator | None = None, guidance: float = 1.0,
           negative_embeds: torch.Tensor | None = None, latents: torch.Tensor | None = None,
           progress: bool = True, desc: str = "denoising") -> torch.Tensor:
    """Sample latents [B, C, F, H, W] (float32) with the eta sampler in `steps` stages."""
    B = prompt_embeds.shape[0]
    device = prompt_embeds.device
    if latents is None:
        latents = randn((B, *geometry.latent_shape), generator, device)

    def cond(x, t):
        return adapter.predict(transformer, x, t, prompt_embeds, geometry)

    uncond = None
    if guidance != 1.0:
        if negative_embeds is None:
            raise ValueError("guidance != 1 needs negative_embeds (the empty/negative prompt embedding)")
        neg = negative_embeds.expand(B, *negative_embeds.shape[1:]) if negative_embeds.shape[0] == 1 else negative_embeds

        def uncond(x, t):
            return adapter.predict(transformer, x, t, neg, geometry)

    wrap = None
    if progress:
        from tqdm.auto import tqdm

        def wrap(it):
            return tqdm(it, desc=desc, leave=False)

    timesteps = stage_timesteps(steps, schedule.num_train_timesteps)
    x0, _ = rollout(guided(cond, uncond, guidance), schedule, latents, timesteps, eta, generator, progress=wrap)
    return x0

"""TDM (trajectory distribution matching) step distillation as pure functions (SPEC section 2).

Everything here works on tensors and on `predict(x_t, t) -> network output` callables, over the
one `Schedule` interface, so the same code serves Wan (flow) and CogVideoX (v-prediction) and is
tested on small hand-checked tensors without any model. The trainer (`trainer.py`) owns models,
optimizers and distribution; it calls these functions in this order per step:

1. `sample_stages` twice (fake step, generator step) -> `StageSample`s;
2. `student_rollout` (no grad): the K-step eta sampler of `videoblade.sampling.rollout`, run only
   as deep as the deepest sampled stage, keeping every stage's noisy input and the student's
   output there (so the fake step needs no extra student forward);
3. fake step: `landed_noisy` (land at t_mid with eta-mixed noise, diffuse forward to t) from the
   student's no-grad prediction, then `fake_score_loss`;
4. generator step: the student predicts with grad at its stage state; `landed_noisy` from the
   *detached* landing point; teacher (CFG via `videoblade.sampling.guided`) and fake score (no
   CFG) predict without grad; `generator_loss` (pseudo-Huber towards x0_s + x0_R - x0_F).

Stage/timestep convention (T = num_train_timesteps, K = k_step): stage i in 1..K, t_g = i T/K - 1
(the rollout's timestep grid, `stage_timesteps`), t_mid = t_g - T/K + 1 = (i - 1) T/K, and
t ~ U{t_mid, ..., t_max - 1} (t = t_mid when t_mid >= t_max).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from videoblade.sampling import eta_step, randn, rollout
from videoblade.schedules import Schedule, stage_timesteps

__all__ = [
    "StageSample",
    "Rollout",
    "sample_stages",
    "student_rollout",
    "gather_stage",
    "landed_noisy",
    "fake_score_loss",
    "huber_constant",
    "generator_loss",
]

PredictFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StageSample:
    """Per-sample stage and timesteps (all LongTensor [B] on the batch's device)."""

    stage: torch.Tensor  # i in 1..K
    index: torch.Tensor  # position of t_g in stage_timesteps(K, T): K - i (0 is the pure-noise stage)
    t_g: torch.Tensor  # i T/K - 1
    t_mid: torch.Tensor  # (i - 1) T/K
    t: torch.Tensor  # U[t_mid, t_max)


def _stage_start(i: torch.Tensor, k_step: int, T: int) -> torch.Tensor:
    # floor(i T / K) - 1, the same integer grid as schedules.stage_timesteps.
    return torch.div(i * T, k_step, rounding_mode="floor") - 1


def sample_stages(batch: int, k_step: int, num_train_timesteps: int, t_max: int,
                  generator: torch.Generator | None, device: torch.device | str) -> StageSample:
    """Stage i ~ U{1..K} per sample, t_g, t_mid, and t ~ U{t_mid..t_max-1} (SPEC section 2, step 2)."""
    gen_device = generator.device if generator is not None else torch.device(device)
    stage = torch.randint(1, k_step + 1, (batch,), generator=generator, device=gen_device)
    u = torch.rand((batch,), generator=generator, device=gen_device, dtype=torch.float64)
    stage, u = stage.to(device), u.to(device)
    T = num_train_timesteps
    t_g = _stage_start(stage, k_step, T)
    t_mid = _stage_start(stage - 1, k_step, T) + 1
    span = (t_max - t_mid).clamp_min(1)
    t = torch.minimum(t_mid + torch.floor(u * span).long(), t_mid + span - 1)
    t = torch.maximum(t, t_mid).clamp_max(T - 1)
    return StageSample(stage=stage, index=k_step - stage, t_g=t_g, t_mid=t_mid, t=t)


@dataclass
class Rollout:
    """States and student outputs of the K-step rollout, stage by stage (index 0 = t_K = T - 1)."""

    timesteps: list[int]  # t_g of each stage run, descending
    states: list[torch.Tensor]  # noisy input of each stage run, float32 [B, ...]
    outputs: list[torch.Tensor]  # student network output at each stage run, float32 [B, ...]


def student_rollout(predict: PredictFn, schedule: Schedule, noise: torch.Tensor, k_step: int, eta: float,
                    generator: torch.Generator | None, depth: int | None = None) -> Rollout:
    """Run the shared eta sampler (`sampling.rollout`) for stages 0..depth (default all K), no grad.

    Returns every stage's noisy input and the student output the sampler computed there, so the
    fake-score step reuses them instead of a second student forward.
    """
    grid = stage_timesteps(k_step, schedule.num_train_timesteps)
    depth = k_step - 1 if depth is None else int(depth)
    if not 0 <= depth < k_step:
        raise ValueError(f"rollout depth must be in [0, {k_step}), got {depth}")
    outputs: list[torch.Tensor] = []

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = predict(x, t)
        outputs.append(out.detach().float())
        return out

    _, states = rollout(recording, schedule, noise, grid[: depth + 1], eta, generator, keep_states=True)
    return Rollout(timesteps=grid[: depth + 1], states=states, outputs=outputs)


def gather_stage(per_stage: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """Pick per sample b the tensor of stage index[b]: per_stage[index[b]][b]."""
    if int(index.max()) >= len(per_stage):
        raise ValueError(f"stage index {int(index.max())} beyond the {len(per_stage)} stages run")
    stacked = torch.stack(list(per_stage), 0)  # [S, B, ...]
    b = torch.arange(stacked.shape[1], device=stacked.device)
    return stacked[index.to(stacked.device), b]


def landed_noisy(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, sample: StageSample, eta: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Land at t_mid with eta-mixed noise (the sampler's `eta_step`), then diffuse forward to t.

    x_mid = alpha(t_mid) x0 + sigma(t_mid) (eta eps + sqrt(1 - eta^2) z1)
    x_t   = x_mid alpha(t)/alpha(t_mid) + sqrt(sigma(t)^2 - (alpha(t) sigma(t_mid)/alpha(t_mid))^2) z2
    x0 and eps are detached: the generator's gradient flows through x0_s only, never through x_t.
    """
    x0, eps = x0.detach().float(), eps.detach().float()
    z1 = randn(x0.shape, generator, x0.device)
    x_mid = eta_step(schedule, x0, eps, sample.t_mid, eta, z1)
    z2 = randn(x0.shape, generator, x0.device)
    return schedule.diffuse(x_mid, sample.t_mid, sample.t, z2)


def fake_score_loss(schedule: Schedule, fake_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    x0_s: torch.Tensor, teacher_out: torch.Tensor | None = None,
                    lambda_reg: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Denoising loss of the fake score at (x_t, t) towards x0_s, plus lambda_reg ||F - R||^2.

    The target is the network output that returns x0_s exactly (`Schedule.output_for`: for flow
    (x_t - x0_s)/sigma(t)). Returns (loss, {"dsm": ..., "reg": ...}) with detached parts.
    """
    target = schedule.output_for(x_t, t, x0_s.detach()).detach()
    f = fake_out.float()
    dsm = (f - target).pow(2).mean()
    loss = dsm
    reg = torch.zeros((), device=f.device)
    if lambda_reg > 0.0:
        if teacher_out is None:
            raise ValueError("lambda_reg > 0 needs the teacher's (no-CFG) output")
        reg = (f - teacher_out.detach().float()).pow(2).mean()
        loss = loss + lambda_reg * reg
    return loss, {"dsm": dsm.detach(), "reg": reg.detach()}


def huber_constant(x: torch.Tensor, huber_c: float = 1e-3) -> float:
    """SPEC's c = huber_c * sqrt(numel per sample) / sqrt(64 * 64 * 4)."""
    per_sample = x[0].numel() if x.ndim > 0 else 1
    return huber_c * math.sqrt(per_sample) / math.sqrt(64 * 64 * 4)


def generator_loss(x0_s: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, huber_c: float = 1e-3,
                   sample_weighting: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pseudo-Huber distance of x0_s to the detached target x0_s + x0_R - x0_F.

    loss = mean(sqrt((x0_s - target)^2 + c^2) - c); its gradient w.r.t. x0_s is
    (x0_F - x0_R) / sqrt((x0_F - x0_R)^2 + c^2) / numel: it pushes x0_s from the fake score's
    denoised estimate towards the teacher's. With `sample_weighting` each sample's mean is scaled
    by 1 / mean|x0_s - x0_R| (TDM's original normalisation, detached).
    """
    x0 = x0_s.float()
    real, fake = x0_real.detach().float(), x0_fake.detach().float()
    target = (x0.detach() + real - fake).detach()
    c = huber_constant(x0, huber_c)
    per_elem = torch.sqrt((x0 - target).pow(2) + c * c) - c
    per_sample = per_elem.flatten(1).mean(1)
    if sample_weighting:
        w = 1.0 / (x0.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-8)
        per_sample = per_sample * w
    loss = per_sample.mean()
    gap = (real - fake).flatten(1).pow(2).mean(1).sqrt().mean()
    return loss, {"huber_c": torch.tensor(c), "real_fake_gap": gap.detach()}

"""One noise-schedule interface for flow-matching (Wan) and v-prediction (CogVideoX) models.

Notation (SPEC section 2): x_t = alpha(t) x0 + sigma(t) eps for integer t in [0, T).

* flow (Wan): sigma = s(t), the scheduler's shifted sigma, alpha = 1 - s; the network predicts
  the velocity v = eps - x0, so x0 = x_t - s v and eps = x_t + (1 - s) v. Its timestep input is
  s * T (a float), as diffusers' Wan pipeline passes it.
* v_prediction (CogVideoX): alpha = sqrt(abar), sigma = sqrt(1 - abar) from the scheduler's
  alphas_cumprod (SNR shift and zero-terminal-SNR rescale included), x0 = alpha x_t - sigma v and
  eps = sigma x_t + alpha v. Its timestep input is the integer t.

Every quantity is computed in float32 and broadcast over the trailing dimensions of x.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Schedule", "expand"]


def expand(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector [B] (or scalar) to broadcast against x [B, ...]."""
    a = torch.as_tensor(a, device=x.device, dtype=torch.float32)
    if a.ndim == 0:
        return a
    return a.reshape(a.shape[0], *([1] * (x.ndim - 1)))


def _flow_sigmas(num_train_timesteps: int, shift: float) -> torch.Tensor:
    # sigma for integer t: (t + 1) / T shifted as in diffusers' flow schedulers:
    # s' = shift * s / (1 + (shift - 1) * s); t = T - 1 is pure noise (s' = 1).
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def _vpred_alphas_cumprod(config: dict) -> torch.Tensor:
    # Let diffusers compute alphas_cumprod from the folder's own scheduler config so the betas,
    # the SNR shift and the zero-terminal-SNR rescale are exactly the teacher's.
    import diffusers

    cls_name = config.get("_class_name", "CogVideoXDDIMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {cls_name!r} in scheduler config")
    sched = cls.from_config(config)
    return sched.alphas_cumprod.detach().double().clamp(0.0, 1.0).float()


@dataclass
class Schedule:
    """alpha(t), sigma(t) tables for integer t in [0, T) plus the conversions SPEC section 2 needs."""

    kind: str  # "flow" | "v_prediction"
    alphas: torch.Tensor  # float32 [T]
    sigmas: torch.Tensor  # float32 [T]
    shift: float = 1.0
    # the diffusers scheduler config this schedule was built from (None when built from tables):
    # `sampling.unipc_scheduler` takes the folder's solver settings from it, as the pipelines do
    scheduler_config: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "v_prediction"):
            raise ValueError(f"schedule kind must be 'flow' or 'v_prediction', got {self.kind!r}")
        if self.alphas.shape != self.sigmas.shape or self.alphas.ndim != 1:
            raise ValueError("alphas and sigmas must be 1-D tables of the same length")

    # ------------------------------------------------------------------ construction
    @classmethod
    def flow(cls, num_train_timesteps: int = 1000, shift: float = 1.0) -> Schedule:
        s = _flow_sigmas(num_train_timesteps, shift)
        return cls("flow", 1.0 - s, s, shift=shift)

    @classmethod
    def v_prediction(cls, alphas_cumprod: torch.Tensor) -> Schedule:
        abar = alphas_cumprod.double().clamp(0.0, 1.0)
        return cls("v_prediction", abar.sqrt().float(), (1.0 - abar).sqrt().float())

    @classmethod
    def from_scheduler_config(cls, config: dict) -> Schedule:
        """Build from a diffusers scheduler config (the dict in `<model>/scheduler/scheduler_config.json`)."""
        T = int(config.get("num_train_timesteps", 1000))
        pred = config.get("prediction_type", "epsilon")
        is_flow = pred == "flow_prediction" or config.get("use_flow_sigmas", False) or (
            "FlowMatch" in config.get("_class_name", "")
        )
        if is_flow and config.get("use_dynamic_shifting"):
            raise ValueError(
                "the scheduler config sets use_dynamic_shifting (a shift computed from the resolution, mu, at "
                "every call), which videoblade's fixed-shift flow schedule cannot follow: set "
                "use_dynamic_shifting to false and the shift the model was trained with as flow_shift"
            )
        if is_flow:
            shift = float(config.get("flow_shift", config.get("shift", 1.0)) or 1.0)
            sched = cls.flow(T, shift)
        elif pred != "v_prediction":
            raise ValueError(
                f"scheduler prediction_type {pred!r} is not supported: videoblade handles flow "
                "(Wan) and v_prediction (CogVideoX) teachers"
            )
        else:
            sched = cls.v_prediction(_vpred_alphas_cumprod(config))
        sched.scheduler_config = dict(config)
        return sched

    @classmethod
    def from_model_folder(cls, folder: str | Path, shift: float | None = None) -> Schedule:
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a diffusers model folder has scheduler/scheduler_config.json")
        config = json.loads(path.read_text())
        if shift is not None:
            config["flow_shift"] = shift
        return cls.from_scheduler_config(config)

    # ------------------------------------------------------------------ tables
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas.shape[0])

    def _lookup(self, table: torch.Tensor, t) -> torch.Tensor:
        t = self._checked(t)
        return self._table_on(table, t.device)[t]

    def _checked(self, t) -> torch.Tensor:
        """t as an integer tensor, checked to lie in [0, T) (fractional t is an error)."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("schedule timesteps are integers in [0, T)")
            t = t.long()
        T = self.num_train_timesteps
        if t.device.type == "cpu":
            if bool((t < 0).any()) or bool((t >= T).any()):
                raise ValueError(f"timestep out of range [0, {T})")
        else:
            # timesteps on an accelerator are checked there: a host check (and a blocking copy of
            # the table) would stall the sampler a few times per step (Wan 81x480x832, 8 steps on
            # an H200: 122 host syncs, the GPU idle 6 % of the run)
            torch._assert_async(((t >= 0) & (t < T)).all(), f"timestep out of range [0, {T})")
        return t

    def _table_on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``table`` on ``device``, copied there once (a table replaced later is copied again: the
        cache holds each table it copied, so its id stays its own)."""
        if table.device == device:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), str(device))
        if key not in cache:
            cache[key] = (table, table.to(device, non_blocking=True))
        return cache[key][1]

    def alpha(self, t) -> torch.Tensor:
        return self._lookup(self.alphas, t)

    def sigma(self, t) -> torch.Tensor:
        return self._lookup(self.sigmas, t)

    def model_timestep(self, t) -> torch.Tensor:
        """The timestep value the transformer takes: sigma * T (flow) or the integer t (v-pred)."""
        if self.kind == "flow":
            return self.sigma(t) * self.num_train_timesteps
        return self._checked(t).long()

    # ------------------------------------------------------------------ conversions
    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a network output at (x_t, t); float32."""
        a, s = expand(self.alpha(t), x_t), expand(self.sigma(t), x_t)
        out, x = output.float(), x_t.float()
        if self.kind == "flow":
            return x - s * out, x + a * out
        return a * x - s * out, s * x + a * out

    def output_for(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """The network output that gives exactly x0 at (x_t, t)."""
        a, s = expand(self.alpha(t), x_t), expand(self.sigma(t), x_t)
        x, x0 = x_t.float(), x0.float()
        if self.kind == "flow":
            return (x - x0) / s
        return (a * x - x0) / s

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        a, s = expand(self.alpha(t), x0), expand(self.sigma(t), x0)
        return a * x0.float() + s * eps.float()

    @staticmethod
    def _diffusion_ratio_var(a_s: torch.Tensor, sg_s: torch.Tensor, a_t: torch.Tensor,
                             sg_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ratio alpha(t)/alpha(s) and variance sigma(t)^2 - (ratio sigma(s))^2 (clamped at 0: rounding).
        # alpha(s) = 0 only at the pure-noise end s = T - 1 (flow's sigma = 1, zero terminal SNR), where
        # t >= s gives t = s: x_s is pure noise already and the transition keeps it (ratio 1, variance
        # 0, x_t = x_s exactly) instead of 0/0 = NaN. At t == s with alpha(s) > 0 the ratio is exactly 1.
        pos = a_s > 0
        ratio = torch.where(pos, a_t / torch.where(pos, a_s, torch.ones_like(a_s)), torch.ones_like(a_s))
        return ratio, (sg_t**2 - (ratio * sg_s) ** 2).clamp_min(0.0)

    def diffuse(self, x_s: torch.Tensor, s, t, z: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_s) from a less noisy s to t >= s:
        x_t = x_s alpha(t)/alpha(s) + sqrt(sigma(t)^2 - (alpha(t) sigma(s)/alpha(s))^2) z."""
        a_s, sg_s = expand(self.alpha(s), x_s), expand(self.sigma(s), x_s)
        a_t, sg_t = expand(self.alpha(t), x_s), expand(self.sigma(t), x_s)
        ratio, var = self._diffusion_ratio_var(a_s, sg_s, a_t, sg_t)
        return ratio * x_s.float() + var.sqrt() * z.float()

    def diffusion_std(self, s, t) -> torch.Tensor:
        """Standard deviation of q(x_t | x_s), for tests and logging."""
        _, var = self._diffusion_ratio_var(self.alpha(s), self.sigma(s), self.alpha(t), self.sigma(t))
        return var.sqrt()

    def __repr__(self) -> str:  # short: the tables are long
        return f"Schedule(kind={self.kind!r}, T={self.num_train_timesteps}, shift={self.shift})"


def stage_timesteps(k_step: int, num_train_timesteps: int = 1000) -> list[int]:
    """The K stage timesteps t_K > ... > t_1 of the TDM rollout and sampler: t_i = i T / K - 1.

    With T = 1000, K = 8: [999, 874, 749, 624, 499, 374, 249, 124].
    """
    if k_step < 1 or k_step > num_train_timesteps:
        raise ValueError(f"k_step must be in [1, {num_train_timesteps}], got {k_step}")
    return [int(math.floor(i * num_train_timesteps / k_step)) - 1 for i in range(k_step, 0, -1)]


__all__.append("stage_timesteps")

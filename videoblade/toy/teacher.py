"""Pretraining of the toy teacher: flow matching on the toy clips, in pixel space.

The teacher is a tiny `WanTransformer3DModel` in a toy-family diffusers folder
(`videoblade.models.toy`). Training uses the same schedule interface and `adapter.predict` as
distillation and sampling: x_t = alpha(t) x0 + sigma(t) eps for integer t ~ U[0, T), the target
is the network output that returns x0 exactly (for flow: v = eps - x0), and the loss is their
mean squared error (optionally read on the implied x0: `loss_weighting`). Prompts are dropped
(replaced by the empty prompt's embedding) with probability `cond_dropout` so that
classifier-free guidance has an unconditional model. The weights saved are an exponential moving
average of the trained ones.

The result is written back into the folder (`transformer/`) together with `teacher.json`, whose
stamp (data + model + training config) lets the demo reuse a finished teacher.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = ["TeacherConfig", "train_teacher", "teacher_loss", "teacher_is_trained", "STAMP"]

STAMP = "teacher.json"
LOSS_WEIGHTINGS = ("flow", "x0")  # see TeacherConfig.loss_weighting


@dataclass(frozen=True)
class TeacherConfig:
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to this fraction of the peak
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # "flow": mean squared error of the network output (v = eps - x0); "x0": the same error read on
    # the x0 it implies (x0 = x_t - sigma v, i.e. weighted by sigma(t)^2), which moves the weight
    # from nearly clean inputs to the noisy ones where sampling commits to a clip
    loss_weighting: str = "flow"

    def __post_init__(self) -> None:
        _check_weighting(self.loss_weighting)

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_is_trained(folder: str | Path, stamp: dict) -> bool:
    p = Path(folder) / STAMP
    if not p.is_file() or not (Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        return False
    try:
        return json.loads(p.read_text()).get("stamp") == stamp
    except json.JSONDecodeError:
        return False


def _lr_at(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _check_weighting(weighting: str) -> None:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


def teacher_loss(schedule, out: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Mean squared error of the network output against the output that returns x0 exactly;
    weighting "x0" reads the error on the implied x0 instead (flow: x0 = x_t - sigma v, so the
    per-sample weight is sigma(t)^2)."""
    _check_weighting(weighting)
    if weighting == "flow":
        return torch.nn.functional.mse_loss(out, target)
    if schedule.kind != "flow":
        raise ValueError("loss_weighting='x0' is written for the flow schedule (x0 = x_t - sigma v)")
    w = schedule.sigma(t).to(out.dtype).view(-1, *([1] * (out.ndim - 1))) ** 2
    return (w * (out - target) ** 2).mean()


def train_teacher(adapter, loaded, clips: torch.Tensor, prompts: list[str], cfg: TeacherConfig, stamp: dict,
                  progress: bool = True, log_every: int = 50) -> dict:
    """Train `loaded.transformer` (a LoadedModel from adapter.load) on clips [N, 3, F, H, W] with one
    prompt per clip; save the EMA weights and the stamp into `loaded.folder`. Returns a summary."""
    folder = Path(loaded.folder)
    schedule = loaded.schedule
    geometry = adapter.geometry(folder, height=clips.shape[-2], width=clips.shape[-1], frames=clips.shape[2])
    if tuple(clips.shape[1:]) != tuple(geometry.latent_shape):
        raise ValueError(f"clips {tuple(clips.shape[1:])} do not match the model's latent shape {geometry.latent_shape}")
    max_len = adapter.text_max_length(folder)
    unique = sorted(set(prompts))
    emb_table = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, unique + [""], max_length=max_len,
                                       dtype=torch.float32)
    # batches are drawn on the CPU from the seeded generator (the same batches on any device), then moved
    emb_table, clips = emb_table.cpu(), clips.float().cpu()
    empty = emb_table[-1]
    prompt_idx = torch.tensor([unique.index(p) for p in prompts])

    model = loaded.transformer.float().train().requires_grad_(True)
    device = next(model.parameters()).device
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    T = schedule.num_train_timesteps
    losses: list[float] = []
    t0, c0 = time.time(), time.process_time()
    bar = tqdm(range(cfg.steps), desc="teacher (flow matching)", disable=not progress)
    for step in bar:
        idx = torch.randint(0, clips.shape[0], (cfg.batch_size,), generator=gen)
        x0 = clips[idx]
        emb = emb_table[prompt_idx[idx]]
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        emb = torch.where(drop[:, None, None], empty.expand_as(emb), emb)
        t = torch.randint(0, T, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, eps, t)
        target = schedule.output_for(x_t, t, x0)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        x_t, t, emb, target = x_t.to(device), t.to(device), emb.to(device), target.to(device)
        out = adapter.predict(model, x_t, t, emb, geometry, schedule=schedule)
        loss = teacher_loss(schedule, out, target, t, cfg.loss_weighting)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / log_every:.4f}")
    bar.close()

    ema.save_pretrained(folder / "transformer", safe_serialization=True)
    loaded.transformer = ema
    window = max(1, min(100, len(losses) // 5))
    summary = {
        "stamp": stamp,
        "steps": cfg.steps,
        "final_loss": sum(losses[-window:]) / window,
        "first_loss": sum(losses[:window]) / window,
        "loss_curve": [round(sum(losses[i:i + window]) / len(losses[i:i + window]), 5)
                       for i in range(0, len(losses), window)],
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "params": sum(p.numel() for p in ema.parameters()),
    }
    (folder / STAMP).write_text(json.dumps(summary, indent=2))
    return summary

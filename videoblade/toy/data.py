"""Procedural toy video data: coloured shapes moving at constant velocity over a plain background.

Every clip is a pure function of five discrete factors

    shape in {square, diamond, cross}, colour in {red, green, blue, yellow},
    direction in {left, right, up, down}, start along the motion axis (``n_along`` values),
    position across the motion axis (``n_across`` values),

and its prompt names the first three ("a red square moving left"), so for one prompt the
remaining modes are the start positions: exactly the ambiguity that few-step sampling blurs
into an average of several positions. The training set is a seeded random subset (without
replacement) of the full factor grid, so every clip is distinct and the within-data
nearest-neighbour distance (the precision metric's unit) is never zero; fresh draws from the
same grid (another seed) are the "data itself" reference of the coverage metric.

Tensors are float32 in [-1, 1], layout [N, 3, F, H, W] (the pixel-space "latents" of the toy
family, see `videoblade.models.toy`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["ToyDataConfig", "ToyClip", "factor_grid", "render", "make_dataset", "draw_reference", "prompt_of",
           "parse_prompt", "all_prompts", "background", "SHAPES", "COLOURS", "DIRECTIONS", "BACKGROUND"]

SHAPES = ("square", "diamond", "cross")
COLOURS = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.25),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (1.00, 0.90, 0.10),
}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) unit steps
BACKGROUND = (0.12, 0.12, 0.12)
_MAX_RAMP = 0.3


@dataclass(frozen=True)
class ToyDataConfig:
    """Size and variety of the toy data. Defaults fit the CPU demo's time budget."""

    height: int = 16
    width: int = 16
    frames: int = 5  # 4k+1, as the project's configs require
    shape_size: int = 5
    speed: int = 2  # pixels per frame
    n_along: int = 4  # start positions along the motion axis
    n_across: int = 4  # positions across the motion axis
    n_clips: int = 384  # training clips, a subset of the factor grid
    seed: int = 0
    # 0: a plain grey background. > 0: the background's red, green and blue ramp up by this much
    # along x, y and the frame index, so every background pixel shows where and when it is (see
    # `background`)
    background_ramp: float = 0.0

    def __post_init__(self) -> None:
        # every clip of the factor grid must be distinct (the precision unit, the data's own
        # nearest-neighbour spacing, would be 0): refused here, before a teacher trains on them
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2 (one frame shows no motion, so the directions draw alike), "
                             f"got {self.frames}")
        if self.speed < 1:
            raise ValueError(f"speed must be >= 1 pixel per frame (a still shape looks the same moving left "
                             f"or right), got {self.speed}")
        if self.n_along < 1:
            raise ValueError(f"n_along must be >= 1, got {self.n_along}")
        masks = [_shape_mask(s, self.shape_size) for s in SHAPES] if self.shape_size >= 1 else []
        if not masks or not all(m.any() for m in masks) or any(
                np.array_equal(a, b) for a, b in itertools.combinations(masks, 2)):
            raise ValueError(f"at shape_size={self.shape_size} the shapes {SHAPES} are not all distinct "
                             "(some are empty or draw alike): use shape_size >= 4")
        travel = (self.frames - 1) * self.speed
        room = min(self.height, self.width) - self.shape_size  # top-left coordinate range [0, room]
        if travel + self.n_along - 1 > room:
            raise ValueError(
                f"a {self.shape_size}px shape moving {travel}px with {self.n_along} start positions does not fit "
                f"in {self.height}x{self.width}: lower speed, frames or n_along, or enlarge the frame"
            )
        if self.n_across < 1 or self.n_across - 1 > room:
            raise ValueError(f"n_across={self.n_across} positions do not fit across {room + 1} pixels")
        if not 0.0 <= self.background_ramp <= _MAX_RAMP:
            raise ValueError(f"background_ramp must be in [0, {_MAX_RAMP}] (shapes must stay far from the "
                             f"background), got {self.background_ramp}")
        n_grid = len(SHAPES) * len(COLOURS) * len(DIRECTIONS) * self.n_along * self.n_across
        if not 1 <= self.n_clips <= n_grid:
            raise ValueError(f"n_clips must be in [1, {n_grid}] (the size of the factor grid), got {self.n_clips}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ToyClip:
    shape: str
    colour: str
    direction: str
    along: int  # index of the start along the motion axis
    across: int  # index of the position across it

    @property
    def prompt(self) -> str:
        return prompt_of(self.shape, self.colour, self.direction)


def prompt_of(shape: str, colour: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(shape, colour, direction) named by a toy-data prompt; ValueError for any other text."""
    for s, c, d in itertools.product(SHAPES, COLOURS, DIRECTIONS):
        if prompt_of(s, c, d) == prompt:
            return s, c, d
    raise ValueError(f"{prompt!r} is not a toy-data prompt")


def all_prompts() -> list[str]:
    """Every prompt of the data, in a fixed order (shape, colour, direction)."""
    return [prompt_of(s, c, d) for s, c, d in itertools.product(SHAPES, COLOURS, DIRECTIONS)]


def factor_grid(cfg: ToyDataConfig) -> list[ToyClip]:
    return [ToyClip(s, c, d, a, x) for s, c, d, a, x in itertools.product(
        SHAPES, COLOURS, DIRECTIONS, range(cfg.n_along), range(cfg.n_across))]


def _shape_mask(shape: str, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    if shape == "square":
        return np.ones((n, n), bool)
    if shape == "diamond":
        return (np.abs(yy - c) + np.abs(xx - c)) <= c + 1e-6
    if shape == "cross":
        half = max(0.5, n / 6)  # arm half-width: 1px arms at 5px, wider on larger shapes
        return (np.abs(yy - c) < half) | (np.abs(xx - c) < half)
    raise ValueError(f"unknown shape {shape!r}: one of {SHAPES}")


def _positions(cfg: ToyDataConfig, clip: ToyClip) -> list[tuple[int, int]]:
    """Top-left (y, x) of the shape in every frame."""
    room_y, room_x = cfg.height - cfg.shape_size, cfg.width - cfg.shape_size
    travel = (cfg.frames - 1) * cfg.speed
    dy, dx = DIRECTIONS[clip.direction]
    across_room = room_x if dy != 0 else room_y

    def across_pos(i: int) -> int:  # n_across positions spread evenly over the free range
        return 0 if cfg.n_across == 1 else round(i * across_room / (cfg.n_across - 1))

    def along_start(i: int, room: int, sign: int) -> int:
        # starts are spread over the slack that leaves room for the whole motion
        slack = room - travel
        s = 0 if cfg.n_along == 1 else round(i * slack / (cfg.n_along - 1))
        return s if sign > 0 else room - s

    if dy == 0:  # horizontal motion
        y0, x0 = across_pos(clip.across), along_start(clip.along, room_x, dx)
    else:
        y0, x0 = along_start(clip.along, room_y, dy), across_pos(clip.across)
    return [(y0 + dy * cfg.speed * f, x0 + dx * cfg.speed * f) for f in range(cfg.frames)]


def background(cfg: ToyDataConfig) -> np.ndarray:
    """The background every clip shares: float32 [3, F, H, W] in [0, 1].

    Plain grey (`BACKGROUND`) unless `cfg.background_ramp` > 0; then red grows with x, green
    with y and blue with the frame index, each by up to `background_ramp`. Why: Wan's only
    positional signal is rotary (relative), so on a plain background a noisy clip says nothing
    about where a pixel is or which frame it is in, and the toy clips' start positions and
    motion are absolute. Measured (benchmarks/demo_teacher.py, `ramp*` variants): it does not
    make the teacher learn the motion, so the demo keeps the plain background.
    """
    F, H, W = cfg.frames, cfg.height, cfg.width
    out = np.empty((3, F, H, W), np.float32)
    out[:] = np.asarray(BACKGROUND, np.float32)[:, None, None, None]
    r = np.float32(cfg.background_ramp)
    if r > 0:
        out[0] += r * np.linspace(0, 1, W, dtype=np.float32)[None, None, :]
        out[1] += r * np.linspace(0, 1, H, dtype=np.float32)[None, :, None]
        out[2] += r * np.linspace(0, 1, F, dtype=np.float32)[:, None, None]
    return out


def render(cfg: ToyDataConfig, clips: list[ToyClip]) -> torch.Tensor:
    """Clips -> float32 [N, 3, F, H, W] in [-1, 1]."""
    n = cfg.shape_size
    out = np.empty((len(clips), 3, cfg.frames, cfg.height, cfg.width), np.float32)
    out[:] = background(cfg)[None]
    for i, clip in enumerate(clips):
        mask = _shape_mask(clip.shape, n)
        colour = np.asarray(COLOURS[clip.colour], np.float32)[:, None]
        for f, (y, x) in enumerate(_positions(cfg, clip)):
            view = out[i, :, f, y:y + n, x:x + n]  # [3, n, n]
            view[:, mask] = colour
    return torch.from_numpy(out * 2.0 - 1.0)


def make_dataset(cfg: ToyDataConfig) -> tuple[torch.Tensor, list[ToyClip]]:
    """The training set: `n_clips` distinct clips drawn from the factor grid with `cfg.seed`."""
    grid = factor_grid(cfg)
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(grid), size=cfg.n_clips, replace=False))
    clips = [grid[i] for i in idx]
    return render(cfg, clips), clips


def draw_reference(cfg: ToyDataConfig, prompts: list[str], seed: int) -> tuple[torch.Tensor, list[ToyClip]]:
    """One fresh clip from the data distribution per prompt in `prompts` (positions uniform).

    The coverage metric's reference: "as many clips drawn from the data itself" as there are
    generated samples, with the same prompts.
    """
    rng = np.random.default_rng(seed)
    by_prompt = {}
    for clip in factor_grid(cfg):
        by_prompt.setdefault(clip.prompt, []).append(clip)
    clips = []
    for p in prompts:
        if p not in by_prompt:
            raise ValueError(f"prompt {p!r} is not a toy-data prompt")
        options = by_prompt[p]
        clips.append(options[int(rng.integers(len(options)))])
    return render(cfg, clips), clips

"""The model-adapter interface: everything the rest of videoblade needs to know about a model family.

An adapter is a small stateless object. It reads a local diffusers-layout folder
(`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json`),
derives every shape from the folder's configs and the requested size, validates requests before
any weights load, and hides the family's calling conventions (layouts, timestep input, rotary
embeddings, latent normalisation) behind `predict` and `decode`.

Shapes (SPEC "Supported teachers"): latent F = (frames - 1) / temporal_compression + 1 (CogVideoX
1.5: padded up to its temporal patch, as its pipeline does), H = height / spatial_compression,
W likewise; token grid = (F / pt, H / ph, W / pw); text tokens inside self-attention: CogVideoX's
`max_text_seq_length`, Wan 0 (text enters by cross-attention).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from videoblade.schedules import Schedule

__all__ = [
    "ModelRequestError",
    "VideoGeometry",
    "ModelInfo",
    "LoadedModel",
    "ModelAdapter",
    "get_adapter",
    "register_adapter",
    "family_of_folder",
    "parse_dtype",
    "device_problem",
    "parse_decode_chunk",
    "attach_schedule",
    "schedule_of",
    "unwrap_model",
    "ALL_COMPONENTS",
]

ALL_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# per-VAE decode setting (``videoblade.inference.configure_vae``): True/False sets
# torch.backends.cudnn.benchmark for the decode only (restored after it); None leaves it alone
CUDNN_BENCHMARK_ATTR = "_videoblade_cudnn_benchmark"


@contextlib.contextmanager
def _cudnn_benchmark(on: bool | None):
    """cuDNN's autotuner on or off for the block, restored afterwards (None: untouched). With it on,
    cuDNN times its convolution algorithms once per input shape and keeps the fastest, so a decode's
    first call is slower and later calls of the same shapes may be faster."""
    if on is None:
        yield
        return
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


# file each component folder must hold (any one of them) for the request to be serviceable
_COMPONENT_FILES = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "spiece.model"),
    "scheduler": ("scheduler_config.json",),
}
# optional hint file written by videoblade.models.tiny: {"default_size": [h, w, frames], ...}
HINT_FILE = "videoblade.json"


class ModelRequestError(ValueError):
    """A request that cannot work with this model folder; the message says what to change."""


_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_decode_chunk(value) -> str | int:
    """A decode-chunk setting: "auto", "all" or a positive int (latent frames per decoder call)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "all"):
            return v
        try:
            value = int(v)
        except ValueError:
            raise ModelRequestError(f"decode chunk must be 'auto', 'all' or a positive integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelRequestError(f"decode chunk must be 'auto', 'all' or a positive integer, got {value!r}")
    return value


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelRequestError(f"dtype {dtype!r} is not supported: use bf16, fp16 or fp32") from None


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run on this machine (not a cpu/cuda device, or CUDA absent), or None.
    Callers raise their own request error with it before any weights load."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        return "use cpu, cuda or cuda:N"
    if kind == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available here: use cpu"
    return None


@dataclass(frozen=True)
class VideoGeometry:
    """Shapes of one request, all derived from the folder's configs and (height, width, frames)."""

    latent_shape: tuple[int, int, int, int]  # (C, F, H, W) latents as the sampler sees them
    token_grid: tuple[int, int, int]  # (f, h, w) video tokens in the transformer
    text_tokens: int  # text tokens concatenated before the video tokens in self-attention
    patch: tuple[int, int, int]  # (pt, ph, pw)
    height: int = 0  # the requested pixel size
    width: int = 0
    frames: int = 0
    spatial_compression: int = 8
    temporal_compression: int = 4

    @property
    def video_tokens(self) -> int:
        f, h, w = self.token_grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        """Length of the self-attention sequence: text tokens + video tokens."""
        return self.text_tokens + self.video_tokens


@dataclass(frozen=True)
class ModelInfo:
    """What `inspect` reads from a folder's configs (no weights)."""

    folder: Path
    family: str
    transformer_config: dict
    vae_config: dict | None
    scheduler_config: dict | None
    text_encoder_config: dict | None
    hints: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    """The components `load` returns; a component not requested is None."""

    folder: Path
    family: str
    info: ModelInfo
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None  # the diffusers scheduler object (for UniPC inference)
    schedule: Schedule | None = None  # videoblade's schedule interface (always built when scheduler/ exists)
    geometry: VideoGeometry | None = None  # set when load() was given a size


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelRequestError(f"{path} is not valid JSON ({e}); re-export the model folder") from None


def _nearest_multiples(value: int, m: int) -> str:
    lo = (value // m) * m
    hi = max(lo + m, m)  # a negative value's nearest valid size is m, not 0 or below
    return f"{lo} or {hi}" if lo > 0 else f"{hi}"


def unwrap_model(model):
    """The underlying diffusers model of a DDP / DeepSpeed / torch.compile wrapper (attributes live there)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel") and hasattr(
                model, "module"):
            model = model.module
        else:
            break
    return model


_SCHEDULE_ATTR = "_videoblade_schedule"


def attach_schedule(transformer, schedule: Schedule):
    """Remember the model's schedule on the transformer, so `predict` can convert integer t to the
    network's timestep input without every caller passing it (`load` does this)."""
    object.__setattr__(unwrap_model(transformer), _SCHEDULE_ATTR, schedule)
    return transformer


def schedule_of(transformer) -> Schedule | None:
    return getattr(unwrap_model(transformer), _SCHEDULE_ATTR, None)


# ---------------------------------------------------------------------------- registry
_ADAPTERS: dict[str, type[ModelAdapter]] = {}
_CLASS_TO_FAMILY: dict[str, str] = {}
_ALIASES = {"tiny-wan": "wan", "tiny-cogvideox": "cogvideox", "cogvideo": "cogvideox", "wanx": "wan"}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[cls.family] = cls
    for name in cls.transformer_classes:
        _CLASS_TO_FAMILY[name] = cls.family
    return cls


_DISCOVERED = False


def _ensure_registered() -> None:
    """Import every module of videoblade.models once: a family registers itself by being a file
    there (`@register_adapter`), so adding a family needs no edit anywhere else."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import importlib
    import pkgutil

    import videoblade.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "tiny"):
            importlib.import_module(f"videoblade.models.{mod.name}")


def family_of_folder(folder: str | Path) -> str:
    """The family of a diffusers folder, from `transformer/config.json`'s `_class_name`."""
    _ensure_registered()
    folder = Path(folder)
    cfg_path = folder / "transformer" / "config.json"
    if not folder.is_dir():
        raise ModelRequestError(f"model folder {folder} does not exist: set model.path to a local diffusers folder")
    if not cfg_path.is_file():
        raise ModelRequestError(
            f"{folder} has no transformer/config.json: model.path must be a diffusers-layout folder "
            "(transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    hint = folder / HINT_FILE  # a family sharing another's transformer class (toy: Wan's) names itself here
    if hint.is_file() and _read_json(hint).get("family") in _ADAPTERS:
        return _read_json(hint)["family"]
    cls_name = _read_json(cfg_path).get("_class_name")
    if cls_name not in _CLASS_TO_FAMILY:
        known = ", ".join(f"{k} ({v})" for k, v in sorted(_CLASS_TO_FAMILY.items()))
        raise ModelRequestError(f"{cfg_path}: transformer class {cls_name!r} is not supported; known: {known}")
    return _CLASS_TO_FAMILY[cls_name]


def get_adapter(family_or_folder: str | Path) -> ModelAdapter:
    """An adapter by family name ("wan", "cogvideox", "tiny-wan", ...) or for a model folder."""
    _ensure_registered()
    key = str(family_or_folder)
    fam = _ALIASES.get(key.lower(), key.lower())
    if fam in _ADAPTERS and not isinstance(family_or_folder, Path):
        return _ADAPTERS[fam]()
    if isinstance(family_or_folder, Path) or Path(key).exists() or "/" in key or "\\" in key:
        return _ADAPTERS[family_of_folder(key)]()
    raise ModelRequestError(
        f"unknown model family {key!r}: use one of {sorted(_ADAPTERS)} or a path to a diffusers model folder"
    )


def raise_recompile_limit(n: int) -> None:
    """Let dynamo keep at least ``n`` graphs per code object (the name differs across torch versions)."""
    dyn = torch._dynamo.config
    name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, name, max(getattr(dyn, name), n))


# ---------------------------------------------------------------------------- the interface
class ModelAdapter:
    """Base class; one subclass per family (`wan.py`, `cogvideox.py`). Stateless."""

    blocks_attr = ""  # name of the transformer's ModuleList of repeated blocks

    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    default_size: tuple[int, int, int] = (480, 832, 81)  # (height, width, frames)
    default_cfg: float = 5.0  # the distillation teacher's CFG (tdm.cfg: null)
    default_lambda_reg: float = 0.0  # the fake score's regulariser (tdm.lambda_reg: null; SPEC 2)
    default_fps: int = 16  # frames per second of written videos (sample.fps: null, --fps)
    default_asa_pool: int = 32  # tokens per compensation summary (asa.pool: null; SPEC 1.5)
    default_text_max_length: int = 512
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class: str = ""

    # ------------------------------------------------------------------ configs only
    def inspect(self, folder: str | Path) -> ModelInfo:
        """Read the folder's configs (never weights); check that it holds this family's model."""
        folder = Path(folder)
        fam = family_of_folder(folder)
        if fam != self.family:
            raise ModelRequestError(
                f"{folder} holds a {fam} model ({_read_json(folder / 'transformer' / 'config.json')['_class_name']}), "
                f"not a {self.family} model: set model.family={fam} (or auto)"
            )

        def opt(*parts):
            p = folder.joinpath(*parts)
            return _read_json(p) if p.is_file() else None

        hints = opt(HINT_FILE) or {}
        tcfg = _read_json(folder / "transformer" / "config.json")
        cin, cout = tcfg.get("in_channels"), tcfg.get("out_channels")
        if cin is not None and cout is not None and int(cin) != int(cout):
            # image-to-video transformers take the image latents concatenated to the noisy ones
            raise ModelRequestError(
                f"{folder}: its transformer takes {cin} input channels for {cout} latent channels (an "
                f"image-conditioned model, e.g. image-to-video); videoblade distils text-to-video models: "
                f"use the text-to-video checkpoint"
            )
        index = opt("model_index.json") or {}
        second = index.get("transformer_2")
        if isinstance(second, (list, tuple)) and any(x is not None for x in second):
            raise ModelRequestError(
                f"{folder} holds two transformers (transformer_2 denoises below boundary_ratio "
                f"{index.get('boundary_ratio')}, as Wan2.2's A14B experts); videoblade drives one transformer "
                f"per model: use a single-transformer checkpoint (e.g. Wan2.1-T2V or Wan2.2-TI2V-5B)"
            )
        return ModelInfo(
            folder=folder,
            family=fam,
            transformer_config=tcfg,
            vae_config=opt("vae", "config.json"),
            scheduler_config=opt("scheduler", "scheduler_config.json"),
            text_encoder_config=opt("text_encoder", "config.json"),
            hints=hints,
        )

    def check_components(self, folder: str | Path, components) -> None:
        """Raise if a requested component folder (or its config) is missing."""
        folder = Path(folder)
        for comp in components:
            if comp not in _COMPONENT_FILES:
                raise ModelRequestError(f"unknown component {comp!r}: choose from {ALL_COMPONENTS}")
            d = folder / comp
            if not d.is_dir() or not any((d / f).is_file() for f in _COMPONENT_FILES[comp]):
                raise ModelRequestError(
                    f"{folder} has no usable {comp}/ (need {comp}/{' or '.join(_COMPONENT_FILES[comp])}): "
                    f"copy the {comp} folder of the original diffusers checkpoint there, or do not request {comp}"
                )

    def _as_info(self, folder_or_info) -> ModelInfo:
        return folder_or_info if isinstance(folder_or_info, ModelInfo) else self.inspect(folder_or_info)

    # family-specific: compression factors and patch, from configs
    def vae_factors(self, info: ModelInfo) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE."""
        raise NotImplementedError

    def latent_channels(self, info: ModelInfo) -> int:
        return int(info.transformer_config.get("in_channels", 16))

    def patch_size(self, info: ModelInfo) -> tuple[int, int, int]:
        raise NotImplementedError

    def text_tokens(self, info: ModelInfo) -> int:
        """Text tokens inside self-attention (0 when text enters by cross-attention)."""
        return 0

    def text_max_length(self, folder_or_info) -> int:
        """Default prompt length (tokens) the text encoder pads to for this folder."""
        info = self._as_info(folder_or_info)
        return int(info.hints.get("text_max_length", self.default_text_max_length))

    def resolve_size(self, folder_or_info, height: int | None = None, width: int | None = None,
                     frames: int | None = None) -> tuple[int, int, int]:
        """Fill unset sizes from the folder's hint file (tiny models) or the family default."""
        info = self._as_info(folder_or_info)
        dh, dw, df = info.hints.get("default_size", self.default_size)
        return (int(dh if height is None else height), int(dw if width is None else width),
                int(df if frames is None else frames))

    def latent_frames(self, info: ModelInfo, frames: int) -> int:
        """Latent frames the transformer sees for a ``frames``-frame video (frames of the form tc k + 1)."""
        tc, _ = self.vae_factors(info)
        return (frames - 1) // tc + 1

    def _frames_ok(self, info: ModelInfo, frames: int) -> bool:
        """Whether a frame count passes every frame rule of :meth:`geometry` (VAE, temporal patch, family)."""
        tc, _ = self.vae_factors(info)
        pt = self.patch_size(info)[0]
        if frames < 1 or (frames - 1) % tc != 0:
            return False
        F = self.latent_frames(info, frames)
        return F % pt == 0 and self._latent_frames_problem(info, frames, F) is None

    def _nearest_frames(self, info: ModelInfo, frames: int) -> str:
        """The nearest valid frame counts below and above ``frames`` ("49 or 57"), for error messages."""
        below = next((n for n in range(frames - 1, 0, -1) if self._frames_ok(info, n)), None)
        above = next(n for n in range(max(frames + 1, 1), max(frames, 1) + 1000) if self._frames_ok(info, n))
        return f"{below} or {above}" if below is not None else str(above)

    def geometry(self, folder_or_info, height: int | None = None, width: int | None = None,
                 frames: int | None = None) -> VideoGeometry:
        """Validate (height, width, frames) against the configs and derive every shape."""
        info = self._as_info(folder_or_info)
        height, width, frames = self.resolve_size(info, height, width, frames)
        tc, sc = self.vae_factors(info)
        pt, ph, pw = self.patch_size(info)
        if frames < 1 or (frames - 1) % tc != 0:
            raise ModelRequestError(
                f"frames={frames} is not of the form {tc}k+1 (VAE temporal compression {tc}): "
                f"use {self._nearest_frames(info, frames)}"
            )
        for name, val, p in (("height", height, ph), ("width", width, pw)):
            m = sc * p
            if val <= 0 or val % m != 0:
                raise ModelRequestError(
                    f"{name}={val} is not {'divisible by' if val > 0 else 'a positive multiple of'} {m} "
                    f"(VAE spatial factor {sc} x patch {p}): "
                    f"use {_nearest_multiples(val, m)}"
                )
        F = self.latent_frames(info, frames)
        if F % pt != 0:
            raise ModelRequestError(
                f"frames={frames} gives {F} latent frames, not divisible by the temporal patch {pt}: "
                f"use {self._nearest_frames(info, frames)}"
            )
        problem = self._latent_frames_problem(info, frames, F)
        if problem:
            raise ModelRequestError(f"{problem}: use {self._nearest_frames(info, frames)}")
        H, W = height // sc, width // sc
        C = self.latent_channels(info)
        return VideoGeometry(
            latent_shape=(C, F, H, W),
            token_grid=(F // pt, H // ph, W // pw),
            text_tokens=self.text_tokens(info),
            patch=(pt, ph, pw),
            height=height, width=width, frames=frames,
            spatial_compression=sc, temporal_compression=tc,
        )

    def _latent_frames_problem(self, info: ModelInfo, frames: int, latent_frames: int) -> str | None:
        """Family-specific rule on the latent frame count: why ``frames`` is refused (geometry adds
        the nearest counts that pass every rule), or None; no rule by default."""
        return None

    def schedule(self, folder: str | Path, shift: float | None = None) -> Schedule:
        self.check_components(folder, ("scheduler",))
        return Schedule.from_model_folder(folder, shift=shift)

    # ------------------------------------------------------------------ weights
    def load(self, folder: str | Path, dtype: str | torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             components=("transformer", "vae", "text_encoder", "tokenizer"), *, height: int | None = None,
             width: int | None = None, frames: int | None = None, vae_dtype: str | torch.dtype | None = None,
             text_encoder_dtype: str | torch.dtype | None = None) -> LoadedModel:
        """Load the requested components. Every check (family, component folders, and the size
        when one is given) runs before any weights are read.

        dtype: the transformer's (and by default the text encoder's); vae_dtype defaults to float32
        (the decode is numerically sensitive and runs once per video).
        """
        folder = Path(folder)
        components = tuple(components)
        info = self.inspect(folder)
        self.check_components(folder, components)
        dtype = parse_dtype(dtype)
        vae_dtype = parse_dtype(vae_dtype) if vae_dtype is not None else torch.float32
        te_dtype = parse_dtype(text_encoder_dtype) if text_encoder_dtype is not None else dtype
        geometry = None
        if height is not None or width is not None or frames is not None:
            geometry = self.geometry(info, height, width, frames)
        schedule = None
        if (folder / "scheduler" / "scheduler_config.json").is_file():
            schedule = Schedule.from_model_folder(folder)

        out = LoadedModel(folder=folder, family=self.family, info=info, schedule=schedule, geometry=geometry)
        if "transformer" in components:
            out.transformer = self._load_transformer(folder, dtype).to(device).eval().requires_grad_(False)
            if schedule is not None:
                attach_schedule(out.transformer, schedule)
        if "vae" in components:
            out.vae = self._load_vae(folder, vae_dtype).to(device).eval().requires_grad_(False)
        if "text_encoder" in components:
            out.text_encoder = self._load_text_encoder(folder, te_dtype).to(device).eval().requires_grad_(False)
        if "tokenizer" in components:
            from transformers import AutoTokenizer

            out.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if "scheduler" in components:
            out.scheduler = self._load_scheduler(folder)
        return out

    def _load_transformer(self, folder: Path, dtype: torch.dtype):
        import diffusers

        cls = getattr(diffusers, _read_json(folder / "transformer" / "config.json")["_class_name"])
        return cls.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype)

    def _load_vae(self, folder: Path, dtype: torch.dtype):
        import diffusers

        cls = getattr(diffusers, _read_json(folder / "vae" / "config.json")["_class_name"])
        return cls.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)

    def _load_text_encoder(self, folder: Path, dtype: torch.dtype):
        import transformers

        cfg = _read_json(folder / "text_encoder" / "config.json")
        archs = cfg.get("architectures") or [self.text_encoder_class]
        cls = getattr(transformers, archs[0], None) or getattr(transformers, self.text_encoder_class)
        return cls.from_pretrained(folder / "text_encoder", torch_dtype=dtype)

    def _load_scheduler(self, folder: Path):
        import diffusers

        cfg = _read_json(folder / "scheduler" / "scheduler_config.json")
        cls = getattr(diffusers, cfg["_class_name"])
        return cls.from_pretrained(folder, subfolder="scheduler")

    text_encoder_class: str = "T5EncoderModel"

    # ------------------------------------------------------------------ compute
    @staticmethod
    def warn_if_truncated(tokenizer, prompts: list[str], max_length: int) -> None:
        """Warn (once per call) when prompts are longer than the ``max_length`` tokens the encoder
        sees: the pipelines cut them silently, and the cut words then have no effect on the video."""
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True).input_ids]
        over = [(n, p) for n, p in zip(lengths, prompts) if n > max_length]
        if over:
            n, p = max(over)
            warnings.warn(f"{len(over)} of {len(prompts)} prompts are longer than the text encoder's "
                          f"{max_length} tokens and were cut; the longest has {n}: {p[:80]!r}", stacklevel=3)

    def encode_prompts(self, text_encoder, tokenizer, prompts: list[str] | str, max_length: int | None = None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Prompt embeddings [B, max_length, C] exactly as the family's diffusers pipeline computes them."""
        raise NotImplementedError

    def predict(self, transformer, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                geometry: VideoGeometry, attention_kwargs: dict | None = None,
                schedule: Schedule | None = None) -> torch.Tensor:
        """Network output (float32, layout of x_t) for latents x_t [B, C, F, H, W] at integer timesteps t [B].

        t is converted with `schedule.model_timestep(t)`; the schedule is `schedule=` when given, else
        the one `load` attached to the transformer (`attach_schedule`). Differentiable (no no_grad).
        """
        raise NotImplementedError

    def _model_inputs(self, transformer, x_t, t, prompt_embeds, geometry, schedule):
        """(dtype, timestep input, x_t cast, prompt_embeds cast) with the shape checks shared by families."""
        if x_t.ndim != 5 or tuple(x_t.shape[1:]) != tuple(geometry.latent_shape):
            raise ModelRequestError(
                f"x_t must be [B, *{tuple(geometry.latent_shape)}] (the geometry's latent shape), got {tuple(x_t.shape)}"
            )
        schedule = schedule or schedule_of(transformer)
        if schedule is None:
            raise ModelRequestError(
                "predict() needs the model's schedule to convert t: pass schedule=..., or call "
                "videoblade.models.attach_schedule(transformer, adapter.schedule(folder)) once after loading"
            )
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dtype = unwrap_model(transformer).dtype
        timestep = schedule.model_timestep(t).to(x_t.device)
        if timestep.is_floating_point():
            timestep = timestep.float()
        return dtype, timestep, x_t.to(dtype), prompt_embeds.to(device=x_t.device, dtype=dtype)

    def denormalize_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Map sampler latents to the VAE's latent space (latents_mean/std or scaling_factor)."""
        cfg = vae.config
        z = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), *([1] * (z.ndim - 2)))
            mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
            std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
            return z * std_t + mean_t
        scale = getattr(cfg, "scaling_factor", None)
        if scale:
            z = z / scale
        shift = getattr(cfg, "shift_factor", None)
        if shift:
            z = z + shift
        return z

    @torch.no_grad()
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, H, W] -> uint8 frames [B, F', H', W', 3] (on CPU)."""
        if latents.ndim != 5:
            raise ModelRequestError(f"decode expects latents [B, C, F, H, W], got shape {tuple(latents.shape)}")
        z = self.denormalize_latents(vae, latents)
        with _cudnn_benchmark(getattr(vae, CUDNN_BENCHMARK_ATTR, None)):
            video = self.vae_decode(vae, z)  # [B, 3, F', H', W'] in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        frames = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        if not frames.is_cuda:
            return frames.contiguous()
        # through page-locked memory: a pageable copy of Wan's 81x480x832 frames (97 MB) takes
        # about 50 ms of the decode on an H200 host, a page-locked one a few
        host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        return host.copy_(frames)

    # ------------------------------------------------------------------ structure
    def blocks(self, transformer) -> torch.nn.ModuleList:
        """The transformer's repeated blocks, in layer order."""
        return getattr(unwrap_model(transformer), self.blocks_attr)

    def self_attention_modules(self, transformer) -> list[tuple[str, torch.nn.Module]]:
        """(name, module) of every self-attention module, in layer order."""
        return [(f"{self.blocks_attr}.{i}.attn1", b.attn1) for i, b in enumerate(self.blocks(transformer))]

    def compile_blocks(self, transformer, mode: str | None = None, dynamic: bool | None = False,
                       backend: str = "inductor") -> int:
        """Regional ``torch.compile``: every block compiled in place (``nn.Module.compile``, its
        hooks included), the embeddings and output head left eager.  Blocks share one graph per
        distinct role (first / middle / last block, sparse or dense step), so compiling costs a
        few graphs, not one per layer; works with ASA installed before or after (the ASA
        processors keep per-layer values out of the graph).  The feed-forward's first linear
        layer and its tanh GELU become one GEMM first (:func:`videoblade.models.ffn.fuse_feedforward`,
        forwards without gradient only).  Returns the number of blocks."""
        from videoblade.models.ffn import fuse_feedforward

        fuse_feedforward(transformer)
        blocks = self.blocks(transformer)
        raise_recompile_limit(64)  # a handful of graphs per block code object (roles x sparse/dense)
        for b in blocks:
            b.compile(backend=backend, mode=mode, dynamic=dynamic)
        return len(blocks)

    # ------------------------------------------------------------------ decode settings
    supports_decode_chunk = False  # the VAE decodes a chosen number of latent frames per call (Wan)

    def vae_decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latents -> video [B, 3, F', H', W'] in [-1, 1] (the VAE's own decode)."""
        return vae.decode(z, return_dict=False)[0]

    def last_decode_chunk(self, vae) -> int | None:
        """Latent frames per decoder call of the last decode (None when the family has no such setting)."""
        return None

    def check_decode_chunk(self, chunk="auto") -> str | int:
        """The parsed decode-chunk setting (``parse_decode_chunk``); only "auto" unless the family
        ``supports_decode_chunk``. Needs no weights, so requests are checked before loading."""
        chunk = parse_decode_chunk(chunk)
        if chunk != "auto" and not self.supports_decode_chunk:
            raise ModelRequestError(f"a decode chunk of {chunk!r} applies to Wan's causal VAE only; the "
                                    f"{self.family} VAE decodes its own way (leave it at 'auto')")
        return chunk

    def configure_decode_chunk(self, vae, chunk="auto") -> None:
        """Latent frames per decoder call on a loaded VAE (``check_decode_chunk``)."""
        self.check_decode_chunk(chunk)

    def compile_vae(self, vae, backend: str = "inductor") -> int:
        """``torch.compile`` of the VAE decoder as a whole (CogVideoX: 2.15 s -> 1.09 s bf16 at
        49x480x720 on an H200, after a one-time compile of about 100 s). Returns the number of
        modules compiled (0 when the VAE has no decoder, e.g. the toy family's identity, or when it
        is compiled already: torch.compile of the compiled module is not a module)."""
        if getattr(vae, "decoder", None) is None or isinstance(vae.decoder, torch._dynamo.eval_frame.OptimizedModule):
            return 0
        vae.decoder = torch.compile(vae.decoder, backend=backend)
        return 1

    def pipeline(self, folder: str | Path, **kwargs):
        """The family's diffusers pipeline loaded from the folder (for LoRA round trips and references)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(folder, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"

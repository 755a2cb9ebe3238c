"""Typed run configuration: dataclasses, YAML + dotted overrides, validation, resolved dump.

OmegaConf structured configs are used because they give exactly what researchers editing
YAML for ablations need: the dataclass is the schema (a misspelt key or a wrong type fails at
load time with the key's full path), `key=value` overrides come for free (`from_dotlist`; text
fields take the text as typed, see `_verbatim`), and
the merged result converts back to plain dataclasses, so the rest of the code never sees
OmegaConf. Field names follow Video-BLADE's (`k_step`, `cfg`, `eta`, `lambda_reg`, `rank`,
`lora_alpha`, `learning_rate`, `learning_rate_fake`, `max_train_steps`, `checkpointing_steps`).

Every component owns one small dataclass; `RunConfig` composes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError",
    "ModelConfig",
    "ASAConfig",
    "LoRAConfig",
    "TDMConfig",
    "OptimConfig",
    "TrainConfig",
    "SampleConfig",
    "RunConfig",
    "check_asa",
    "load_config",
    "dump_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to change."""


@dataclass
class ModelConfig:
    family: str = "auto"  # "wan" | "cogvideox" | "auto" (read from the folder's transformer config)
    path: str | None = None  # local diffusers-layout folder
    height: int | None = None  # None: the family's default (Wan 480, CogVideoX 480)
    width: int | None = None  # None: the family's default (Wan 832, CogVideoX 720)
    frames: int | None = None  # None: the family's default (Wan 81, CogVideoX 49); must be 4k+1
    dtype: str = "bf16"  # weights/compute dtype of the transformers: bf16 | fp16 | fp32
    text_max_length: int | None = None  # None: the family's default (Wan 512, CogVideoX 226)


@dataclass
class ASAConfig:
    """Adaptive block-sparse attention (SPEC section 1)."""

    enabled: bool = True
    block_size: int = 128
    samples_per_block: int = 16
    estimate: str = "sample"  # "sample" | "mean"
    mode: str = "energy"  # "energy" | "topk" | "levels" (SPEC 1.6 multi-level, below)
    energy_threshold: float = 0.95
    min_retain: float = 0.05
    max_retain: float = 0.15
    topk: float = 0.10  # fraction of key blocks kept in topk mode
    # levels mode: per row, the top level_fractions[0] of the key blocks (by estimated mass) are
    # attended exactly, the next level_fractions[i] through their level_pools[i-1]-token means,
    # the rest skipped (compensation still covers them); density counts a pooled block as 1/pool
    level_pools: list[int] = field(default_factory=lambda: [2, 4, 8])
    level_fractions: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.15, 0.20])
    # tokens per compensation summary; must divide block_size. None: the model family's (SPEC 1.5:
    # Wan 32, CogVideoX 16; the adapter's default_asa_pool), filled in when ASA is installed on a transformer
    pool: int | None = None
    compensation: bool = True
    reorder: bool = True  # Gilbert locality reordering
    dense_layers: list[int] = field(default_factory=list)  # layer indices that stay dense
    # steps whose model timestep input is above this stay dense: Wan's input is sigma * 1000 after the
    # flow shift (8-step grid at shift 3: 1000, 954, 900, 833, 750, ...), CogVideoX's the integer t; one
    # decision per forward, from the largest timestep in the batch
    dense_timestep_above: int | None = None
    apply_to_fake: bool = True  # the fake score model uses ASA too
    # CPU path (no Triton): "reference" = masked dense float32 (the kernels' spec); "gathered" = scores
    # only the kept blocks + summaries (same results to float rounding, several times less work;
    # levels mode always takes the reference)
    cpu_backend: str = "reference"


@dataclass
class LoRAConfig:
    rank: int = 64
    lora_alpha: int = 64
    target_modules: list[str] | None = None  # None: the model adapter's default targets
    lora_dropout: float = 0.0


@dataclass
class TDMConfig:
    """TDM distillation (SPEC section 2)."""

    k_step: int = 8
    eta: float = 0.9
    cfg: float | None = None  # teacher guidance scale; None: the family's (Wan 5.0, CogVideoX 3.5)
    lambda_reg: float | None = None  # fake-score regulariser towards the teacher; None: the family's (Wan 0, CogVideoX 0.5)
    num_train_timesteps: int = 1000
    t_max: int = 980  # upper bound of the diffusion timestep t ~ U[t_mid, t_max)
    huber_c: float = 1e-3  # c = huber_c * sqrt(numel per sample) / sqrt(64*64*4)
    sample_weighting: bool = False  # TDM's original 1 / mean|x0_s - x0_R| weighting
    max_fake_loss: float = 1e4  # a fake-score step whose loss is above this (or non-finite) is skipped
    # the teacher's CFG negative prompt: embedded once by utils/process_prompts.py --negative_prompt; the
    # trainer refuses a prompt store that embedded another one
    negative_prompt: str = ""


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    learning_rate_fake: float = 5e-4
    adam_beta1: float = 0.0
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-4
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 5
    lr_num_cycles: int = 1
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    prompt_store: str | None = None  # folder written by utils/process_prompts.py
    max_train_steps: int = 300
    train_batch_size: int = 5
    gradient_accumulation_steps: int = 4
    checkpointing_steps: int = 50
    checkpoints_total_limit: int = 3
    resume_from_checkpoint: str | None = "latest"  # "latest", a checkpoint folder, or null
    seed: int = 42
    mixed_precision: str = "bf16"  # accelerate mixed precision: no | fp16 | bf16
    gradient_checkpointing: bool = True
    report_to: str = "wandb"  # wandb (offline unless WANDB_MODE is set) | tensorboard | none
    logging_steps: int = 1
    validation_steps: int = 100
    validation_prompts: str | None = None  # text file, one prompt per line
    num_validation_videos: int = 2
    vae_slicing: bool = True
    vae_tiling: bool = False
    # --- trainer (videoblade/distill/trainer.py) ---
    share_base: bool = True  # student/fake/teacher share one frozen base (named peft adapters); off under DeepSpeed
    deepspeed_config: str | None = None  # DeepSpeed JSON (e.g. ds_config.json); also taken from `accelerate launch`
    stop_at_step: int | None = None  # save a checkpoint and exit at this step (LR schedule still spans max_train_steps)
    tracker_project: str = "videoblade"  # accelerate tracker project name
    export_comfy: bool = True  # also write the student LoRA in the original-Wan / ComfyUI layout (Wan only)
    compile: bool = False  # torch.compile every transformer block (regional); not with DeepSpeed
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" to debug a compile problem)


@dataclass
class SampleConfig:
    """How the trainer samples its validation videos (the student, through `videoblade.sampling`)."""

    steps: int | None = None  # None: tdm.k_step (the student's own step count)
    guidance: float = 1.0  # > 1: CFG against the prompt store's negative embedding (tdm.negative_prompt)
    eta: float | None = None  # tdm sampler stochasticity; None: tdm.eta. Not used by unipc
    sampler: str = "tdm"  # "tdm" (the eta-stochastic sampler) | "unipc"
    flow_shift: float | None = None  # unipc on flow models (Wan) only; None: the model folder's
    seed: int = 0
    fps: int | None = None  # None: the family's (Wan 16, CogVideoX 8)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    asa: ASAConfig = field(default_factory=ASAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tdm: TDMConfig = field(default_factory=TDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ---------------------------------------------------------------------------- validation
# diffusers.optimization.get_scheduler names the trainer can build (piecewise_constant needs step rules)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MAX_POOLED_LEVELS = 3  # the Triton kernels walk at most three pooled levels (kernels.block_sparse.MAX_LEVELS)


def family_asa_pool(family: str | None) -> int:
    """Tokens per compensation summary for a model family (SPEC 1.5; the adapter's
    ``default_asa_pool``, with the other per-family recipe values); no family: the base default."""
    from videoblade.models import ModelAdapter, ModelRequestError, get_adapter

    try:
        return int(get_adapter(family).default_asa_pool) if family else int(ModelAdapter.default_asa_pool)
    except ModelRequestError:
        return int(ModelAdapter.default_asa_pool)


def with_family_pool(a: ASAConfig, family: str | None) -> ASAConfig:
    """``a`` itself when its pool is set, else a copy with the family's pool (at most one block: a
    block_size below it, both powers of two, pools the whole block into one summary)."""
    if a.pool is not None:
        return a
    return dataclasses.replace(a, pool=min(family_asa_pool(family), max(1, int(a.block_size))))


def level_pools_error(block_size: int, pools) -> str | None:
    """What is wrong with a list of pooled levels, or None (the one rule for the config, the ASA
    object, ``kernels.pool_levels`` and the kernels, which add their own tile limit)."""
    pools = [int(p) for p in pools]
    if not 1 <= len(pools) <= MAX_POOLED_LEVELS:
        return f"level_pools needs 1 to {MAX_POOLED_LEVELS} pooled levels, got {pools}"
    if pools != sorted(set(pools)) or any(p < 2 or p & (p - 1) or block_size % p for p in pools):
        return f"level_pools must be distinct powers of two >= 2, ascending, dividing block_size={block_size}; got {pools}"
    return None


def level_config_error(block_size: int, pools, fractions) -> str | None:
    """What is wrong with a multi-level setting (ASA ``mode: levels``), or None."""
    err = level_pools_error(block_size, pools)
    if err:
        return err
    pools, fractions = [int(p) for p in pools], [float(f) for f in fractions]
    if len(fractions) != len(pools) + 1:
        return (f"level_fractions needs {len(pools) + 1} entries (the exact band, then one per pooled level), "
                f"got {fractions}")
    if any(not 0.0 <= f <= 1.0 for f in fractions) or fractions[0] <= 0.0 or sum(fractions) > 1.0 + 1e-9:
        return f"level_fractions must be in [0, 1] (the first > 0) and sum to at most 1, got {fractions}"
    return None


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_asa(a: ASAConfig, prefix: str = "asa.") -> None:
    """Raise :class:`ConfigError` naming the first invalid ASA setting (the one rule for a YAML run
    config and for an :class:`ASAConfig` built in Python and handed to ``AdaptiveSparseAttention``)."""
    bs = a.block_size
    _check(bs >= 16 and bs & (bs - 1) == 0, prefix + "block_size", f"must be a power of two >= 16, got {bs}")
    _check(a.pool is None or (a.pool >= 1 and bs % a.pool == 0), prefix + "pool",
           f"must divide {prefix}block_size={bs} (or be null: the model family's), got {a.pool}")
    sp = a.samples_per_block
    _check(1 <= sp <= bs, prefix + "samples_per_block", f"must be in [1, {bs}], got {sp}")
    # the sampled estimate splits every block into equal strides (kernels/importance.py)
    _check(a.estimate != "sample" or sp & (sp - 1) == 0, prefix + "samples_per_block",
           f"must be a power of two with estimate=sample, got {sp}")
    _check(a.estimate in ("sample", "mean"), prefix + "estimate", f"must be sample or mean, got {a.estimate!r}")
    _check(a.mode in ("energy", "topk", "levels"), prefix + "mode", f"must be energy, topk or levels, got {a.mode!r}")
    if a.mode == "levels":
        err = level_config_error(bs, a.level_pools, a.level_fractions)
        _check(err is None, prefix + "level_pools/level_fractions", err or "")
    _check(a.cpu_backend in ("reference", "gathered"), prefix + "cpu_backend",
           f"must be reference or gathered, got {a.cpu_backend!r}")
    _check(0.0 < a.energy_threshold <= 1.0, prefix + "energy_threshold", f"must be in (0, 1], got {a.energy_threshold}")
    # min_retain = 1 keeps every block whatever max_retain says (SPEC's exactness setting)
    _check(0.0 <= a.min_retain <= 1.0 and 0.0 <= a.max_retain <= 1.0
           and (a.min_retain <= a.max_retain or a.min_retain == 1.0), prefix + "min_retain/max_retain",
           f"need 0 <= min_retain <= max_retain <= 1 (or min_retain = 1: keep every block), "
           f"got {a.min_retain}, {a.max_retain}")
    _check(0.0 < a.topk <= 1.0, prefix + "topk", f"must be in (0, 1], got {a.topk}")
    _check(all(i >= 0 for i in a.dense_layers), prefix + "dense_layers", "layer indices are >= 0")


def _validate(cfg: RunConfig) -> None:
    m, a, lo, t, o, tr, s = cfg.model, cfg.asa, cfg.lora, cfg.tdm, cfg.optim, cfg.train, cfg.sample
    _check(m.family in ("auto", "wan", "cogvideox", "tiny-wan", "tiny-cogvideox"), "model.family",
           f"must be auto, wan or cogvideox, got {m.family!r}")
    _check(m.dtype in ("bf16", "fp16", "fp32"), "model.dtype", f"must be bf16, fp16 or fp32, got {m.dtype!r}")
    if m.frames is not None:
        _check(m.frames >= 1 and (m.frames - 1) % 4 == 0, "model.frames",
               f"must be of the form 4k+1 (e.g. {4 * max(0, (m.frames - 1) // 4) + 1} or "
               f"{4 * ((m.frames + 2) // 4) + 1}), got {m.frames}")
    for key, val in (("model.height", m.height), ("model.width", m.width)):
        _check(val is None or val > 0, key, f"must be positive, got {val}")
    _check(m.text_max_length is None or m.text_max_length >= 1, "model.text_max_length",
           f"must be >= 1 or null (the family's length), got {m.text_max_length}")

    check_asa(a)

    _check(lo.rank >= 1, "lora.rank", f"must be >= 1, got {lo.rank}")
    _check(lo.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {lo.lora_alpha}")
    _check(0.0 <= lo.lora_dropout < 1.0, "lora.lora_dropout", f"must be in [0, 1), got {lo.lora_dropout}")

    _check(1 <= t.k_step <= t.num_train_timesteps, "tdm.k_step", f"must be in [1, {t.num_train_timesteps}]")
    _check(0.0 <= t.eta <= 1.0, "tdm.eta", f"must be in [0, 1], got {t.eta}")
    _check(t.cfg is None or t.cfg >= 1.0, "tdm.cfg", f"teacher guidance must be >= 1, got {t.cfg}")
    _check(t.lambda_reg is None or t.lambda_reg >= 0.0, "tdm.lambda_reg", f"must be >= 0, got {t.lambda_reg}")
    _check(0 < t.t_max <= t.num_train_timesteps, "tdm.t_max", f"must be in (0, {t.num_train_timesteps}]")
    _check(t.max_fake_loss > 0, "tdm.max_fake_loss", "must be > 0")
    _check(t.huber_c > 0, "tdm.huber_c", f"must be > 0, got {t.huber_c}")

    _check(o.learning_rate > 0 and o.learning_rate_fake > 0, "optim.learning_rate", "learning rates must be > 0")
    _check(0.0 <= o.adam_beta1 < 1.0 and 0.0 <= o.adam_beta2 < 1.0, "optim.adam_beta", "betas in [0, 1)")
    _check(o.lr_warmup_steps >= 0 and o.max_grad_norm > 0, "optim", "lr_warmup_steps >= 0 and max_grad_norm > 0")
    _check(o.adam_epsilon >= 0 and o.adam_weight_decay >= 0, "optim.adam_epsilon/adam_weight_decay", "must be >= 0")
    _check(o.lr_scheduler in LR_SCHEDULERS, "optim.lr_scheduler",
           f"must be one of {', '.join(LR_SCHEDULERS)}, got {o.lr_scheduler!r}")
    _check(o.lr_num_cycles >= 1, "optim.lr_num_cycles", f"must be >= 1, got {o.lr_num_cycles}")

    _check(tr.max_train_steps >= 1, "train.max_train_steps", "must be >= 1")
    _check(tr.train_batch_size >= 1, "train.train_batch_size", "must be >= 1")
    _check(tr.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _check(tr.checkpointing_steps >= 1, "train.checkpointing_steps", "must be >= 1")
    _check(tr.checkpoints_total_limit >= 1, "train.checkpoints_total_limit", "must be >= 1")
    _check(tr.logging_steps >= 1, "train.logging_steps", "must be >= 1")
    _check(tr.validation_steps >= 0, "train.validation_steps", "must be >= 0 (0: no validation videos)")
    _check(tr.num_validation_videos >= 0, "train.num_validation_videos", "must be >= 0")
    _check(tr.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision", "must be no, fp16 or bf16")
    _check(tr.report_to in ("wandb", "tensorboard", "none"), "train.report_to", "must be wandb, tensorboard or none")
    _check(tr.stop_at_step is None or 1 <= tr.stop_at_step <= tr.max_train_steps, "train.stop_at_step",
           f"must be in [1, max_train_steps={tr.max_train_steps}] or null")
    _check(tr.compile_backend in ("inductor", "aot_eager", "eager"), "train.compile_backend",
           f"must be inductor, aot_eager or eager, got {tr.compile_backend!r}")

    _check(s.steps is None or 1 <= s.steps <= t.num_train_timesteps, "sample.steps",
           f"must be >= 1 and <= tdm.num_train_timesteps={t.num_train_timesteps}, or null (tdm.k_step), got {s.steps}")
    _check(s.guidance >= 1.0, "sample.guidance", "must be >= 1 (1 means no CFG pass)")
    _check(s.eta is None or 0.0 <= s.eta <= 1.0, "sample.eta", "must be in [0, 1] or null (tdm.eta)")
    _check(s.sampler in ("tdm", "unipc"), "sample.sampler", f"must be tdm or unipc, got {s.sampler!r}")
    # a setting the chosen sampler would not read is refused rather than silently ignored
    _check(s.eta is None or s.sampler == "tdm", "sample.eta",
           f"applies to sample.sampler=tdm only (got sample.sampler={s.sampler}): set sample.eta=null")
    _check(s.flow_shift is None or s.sampler == "unipc", "sample.flow_shift",
           f"applies to sample.sampler=unipc only (got sample.sampler={s.sampler}): set sample.flow_shift=null")
    _check(s.flow_shift is None or s.flow_shift > 0, "sample.flow_shift", f"must be > 0, got {s.flow_shift}")
    _check(s.fps is None or s.fps >= 1, "sample.fps", "must be >= 1 (or null: the family's)")


# ---------------------------------------------------------------------------- load / dump
def _field_type(schema: type, key: str) -> str | None:
    """The annotation (as written, e.g. "int | None") of the field the dotted ``key`` names, else None."""
    cls = schema
    parts = key.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        f = fields.get(name)
        if f is None:
            return None
        if i == len(parts) - 1:
            return f.type if isinstance(f.type, str) else None
        cls = f.default_factory if isinstance(f.default_factory, type) else None  # a section's class
    return None


def _field_kind(schema: type, key: str) -> str | None:
    """"str" or "str | None" when the dotted ``key`` names a text field of ``schema``, else None."""
    t = _field_type(schema, key)
    return t if t in ("str", "str | None") else None


def _verbatim(value: str, optional: bool) -> str | None:
    """A text override as typed: YAML would cut it at `` #``, read ``a: b`` as a mapping, ``[x]`` as
    a list and ``yes``/``no`` as booleans (a negative prompt or a folder name can hold any of them).
    One pair of enclosing quotes is removed; ``null``/``None``/``~`` (or nothing, as in YAML) clear an
    optional field.
    OmegaConf interpolations (``${oc.env:HOME}``) still resolve, as in the YAML file."""
    v = value.strip()
    if optional and v in ("", "null", "None", "none", "~"):
        return None
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    return v


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = RunConfig, require: tuple[str, ...] = ()) -> Any:
    """Load `schema` from YAML (optional), apply `key=value` overrides, validate, return dataclasses.

    `require` lists dotted keys that must be set (e.g. ("model.path", "train.prompt_store")).
    """
    try:
        base = OmegaConf.structured(schema)
        parts = [base]
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} not found")
            parts.append(OmegaConf.load(p))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(*parts)
        for o in overrides or ():
            key, value = o.split("=", 1)
            kind = _field_kind(schema, key.strip())
            ftype = _field_type(schema, key.strip()) or ""
            if kind is None and ftype.endswith("| None") and value.strip() in ("None", "none"):
                OmegaConf.update(merged, key.strip(), None)  # Python's spelling of null, as for text fields
            elif kind is None:  # numbers, bools, lists, unknown keys: parsed as YAML, checked by the schema
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o]))
            else:  # text fields take the text as typed (see _verbatim)
                OmegaConf.update(merged, key.strip(), _verbatim(value, optional=kind == "str | None"))
        for key in require:
            if OmegaConf.is_missing(merged, key) or OmegaConf.select(merged, key) is None:
                raise ConfigError(f"{key} must be set (in the YAML or as {key}=...)")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # unknown key, wrong type: re-raise with one clear line
        raise ConfigError(str(e).splitlines()[0] + f" (full key: {getattr(e, 'full_key', '?')})") from None
    if isinstance(obj, RunConfig):
        # YAML 1.1 reads a bare `no` as a boolean, which OmegaConf then stores as "False"
        if obj.train.mixed_precision in ("False", "false"):
            obj.train.mixed_precision = "no"
        # `key=None` (Python's spelling of null) reaches an optional string field as the text "None"
        for section in dataclasses.fields(obj):
            sub = getattr(obj, section.name)
            for f in dataclasses.fields(sub):
                if f.type == "str | None" and getattr(sub, f.name) in ("None", "none"):
                    setattr(sub, f.name, None)
        _validate(obj)
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (the file `load_config` reads back)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / name
    out.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return out

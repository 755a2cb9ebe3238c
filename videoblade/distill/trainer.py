"""Data-free TDM distillation trainer on accelerate (single process, DDP, DeepSpeed ZeRO-3).

    from videoblade.config import load_config
    from videoblade.distill.trainer import train
    summary = train(load_config("wanx/configs/tdm_asa.yaml", ["model.path=...", "train.prompt_store=..."]))

or `python -m videoblade.train --config X.yaml key=value ...` (under `accelerate launch` for several
GPUs). The step itself is SPEC section 2, built from `videoblade.distill.tdm`'s pure functions.

Roles. student = base + LoRA "student" + ASA; fake score = base + LoRA "fake" (ASA if
`asa.apply_to_fake`); teacher = the base with adapters disabled and ASA switched off, i.e. dense.
* `train.share_base=true` (single process and DDP): ONE frozen base transformer holds both named
  adapters; a role switch sets the active adapter / disables adapters and flips the ASA enable flag
  (`RoleSwitch`). Memory: one base + two LoRAs. Under DDP the shared module is wrapped once with
  `find_unused_parameters=True` (each backward touches one adapter; the other's grads stay None).
* DeepSpeed (ZeRO-3, optional CPU offload, from `ds_config.json`): each engine owns and partitions
  its module, so the two trained roles are two modules (student base + "student", fake base +
  "fake"), prepared with two `DeepSpeedPlugin`s (`accelerator.state.select_deepspeed_plugin`) and
  each stepped by its own engine; the teacher is the student module with its adapter disabled.
  Memory: two (partitioned) bases. `share_base` is ignored there, and the log says so.
A role switch must be undone before a backward: gradient checkpointing recomputes a block with the
module's *current* adapter and ASA state, so the step always re-selects the role whose graph it
back-propagates (see `_fake_step` / `_generator_step`).

Skipped fake steps: a fake-score loss that is non-finite or above `tdm.max_fake_loss` (on any rank:
the decision is all-reduced) gets no backward and is counted (`skipped_fake_steps`). A skipped micro-step
at an accumulation boundary still steps on the window's other micro-steps, in every mode: under DeepSpeed
the engine is stepped by hand (`_step_skipped_boundary_engine`: it steps inside the boundary's backward);
under DDP the window's gradients are averaged over the ranks by hand before the step
(`_average_unsynced_grads`: the skipped backward was the one that would have all-reduced them).

Checkpoints (`<output_dir>/checkpoints/checkpoint-<step>`): written into a temporary folder and
renamed, so a kill during a save leaves the previous checkpoint usable; the last
`checkpoints_total_limit` are kept. They hold both LoRAs, both optimizers and LR schedulers
(safetensors + JSON; DeepSpeed engines use DeepSpeed's own checkpoint format), every rank's RNG
states, the step, the prompt position and the skip counter, so a resumed run continues bit for bit.
A resume is checked before any weights load (`_check_resume`: launcher setup, prompt store and seed,
LoRA rank and targets), and an output folder holding checkpoints past the step a run starts from is
refused (the pruning would delete the new run's checkpoints, and `latest` would continue the other
run). metrics.jsonl rows past that step (logged after the last checkpoint of a killed run) are dropped.

Run folder: config.yaml (resolved), metrics.jsonl, logs/ (trackers), checkpoints/, samples/*.mp4,
pytorch_lora_weights.safetensors (student, diffusers layout), lora_comfy.safetensors (Wan),
fake/pytorch_lora_weights.safetensors, summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from videoblade.config import RunConfig, dump_config, to_dict, with_family_pool
from videoblade.distill import tdm
from videoblade.io.atomic import save_file_atomic, write_text_atomic
from videoblade.io.jsonfile import strict_json
from videoblade.sampling import guided, randn
from videoblade.schedules import Schedule

__all__ = ["TrainRequestError", "TrainRequest", "validate_request", "RoleSwitch", "TDMTrainer", "train",
           "latest_checkpoint"]

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainRequestError(ValueError):
    """The training request cannot run; the message says what to change."""


# ============================================================================ request validation
@dataclass
class TrainRequest:
    folder: Path
    family: str
    adapter: Any
    info: Any
    geometry: Any
    schedule: Schedule
    store: Any
    output_dir: Path
    use_deepspeed: bool
    ds_config: dict | None
    target_modules: list[str]
    validation_prompts: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    resume: Path | None = None  # the checkpoint to resume from (checked against the run by validate_request)


def _want_deepspeed(cfg: RunConfig) -> tuple[bool, str | None]:
    path = cfg.train.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if path in (None, "", "none"):
        if launched:
            raise TrainRequestError(
                "accelerate was launched with DeepSpeed but no DeepSpeed JSON was given: set "
                "deepspeed_config_file in the accelerate config or train.deepspeed_config=ds_config.json")
        return False, None
    return True, path


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fill_ds_config(path: str, cfg: RunConfig) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainRequestError(f"DeepSpeed config {p} not found (train.deepspeed_config)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TrainRequestError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    tr = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's world size is known here

    def contradiction(key: str, have, run_key: str, run_value, want) -> TrainRequestError:
        return TrainRequestError(
            f"DeepSpeed config {p}: {key} is {json.dumps(have)}, but the run config's {run_key} is {run_value}, "
            f"which needs {key}={json.dumps(want)}; DeepSpeed would train with the JSON's value while config.yaml "
            f"records the run config's: set {key} to \"auto\" in {p} (filled from the run config) or make the two agree")

    # "auto" is filled from the run config; an explicit number must agree with it
    for key, val, run_key in (("train_micro_batch_size_per_gpu", tr.train_batch_size, "train.train_batch_size"),
                              ("gradient_accumulation_steps", tr.gradient_accumulation_steps,
                               "train.gradient_accumulation_steps"),
                              ("gradient_clipping", cfg.optim.max_grad_norm, "optim.max_grad_norm"),
                              ("train_batch_size", tr.train_batch_size * tr.gradient_accumulation_steps * world,
                               f"train.train_batch_size x train.gradient_accumulation_steps x WORLD_SIZE={world}")):
        have = d.get(key, "auto")
        if have == "auto":
            d[key] = val
        elif _number(have) is None or not math.isclose(_number(have), val):
            raise contradiction(key, have, run_key, val, val)
    mp = tr.mixed_precision
    for key, on in (("bf16", mp == "bf16"), ("bfloat16", mp == "bf16"), ("fp16", mp == "fp16")):
        section = d.get(key)
        if not isinstance(section, dict):
            continue
        have = str(section.get("enabled", "auto")).lower()
        if have != "auto" and have != str(on).lower():
            raise contradiction(f"{key}.enabled", section.get("enabled"), "train.mixed_precision", mp, on)
    if d.get("optimizer") or d.get("scheduler"):
        raise TrainRequestError(
            f"{p}: remove the 'optimizer'/'scheduler' sections: the trainer builds its two AdamW optimizers "
            "(optim.*) and cosine-with-restarts schedulers itself and hands them to DeepSpeed")
    zs = d.get("zero_optimization", {}).get("stage", 0)
    if zs == 3:
        for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            if d["zero_optimization"].get(k) == "auto":
                raise TrainRequestError(f"{p}: zero_optimization.{k} must be a number (diffusers models have no "
                                        "config.hidden_size for accelerate to derive it from)")
    return d


# module types peft's LoRA wraps (a target matching anything else fails inside peft, after loading)
_LORA_MODULE_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def _check_targets(info, targets: list[str], comfy: bool) -> list[str]:
    """Refuse LoRA targets before the weights load (the module names come from a meta-device transformer
    built from its config.json): a target that matches no module, one that matches a module peft cannot
    wrap (a norm, a whole block), and with ``comfy`` (`train.export_comfy`, Wan) one the original-Wan /
    ComfyUI layout has no name for. Returns the names of the modules the LoRAs wrap."""
    import diffusers

    from videoblade.io.lora import LoRAError, _to_original_module

    cls = getattr(diffusers, info.transformer_config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(info.transformer_config)

    def hits(name: str, t: str) -> bool:  # peft's rule: a target matches the name or its dotted suffix
        return name == t or name.endswith("." + t)

    modules = [(n, m) for n, m in model.named_modules() if n and any(hits(n, t) for t in targets)]
    missing = [t for t in targets if not any(hits(n, t) for n, _ in modules)]
    if missing:
        raise TrainRequestError(f"lora.target_modules {missing} match no module of the transformer")
    wrong = sorted({f"{n} ({type(m).__name__})" for n, m in modules if not isinstance(m, _LORA_MODULE_TYPES)})
    if wrong:
        shown = ", ".join(wrong[:4]) + (f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else "")
        raise TrainRequestError(f"lora.target_modules={targets} matches {shown}: LoRA wraps linear, convolution "
                                "and embedding layers only; name those (e.g. to_q, ffn.net.0.proj)")
    if not comfy:
        return [n for n, _ in modules]
    unmapped = []
    for name, _ in modules:
        try:
            _to_original_module(name)
        except LoRAError:
            unmapped.append(name)
    if unmapped:
        shown = ", ".join(unmapped[:4]) + (f" (+{len(unmapped) - 4} more)" if len(unmapped) > 4 else "")
        raise TrainRequestError(
            f"lora.target_modules={targets} puts LoRAs on {shown}, which the original-Wan / ComfyUI layout "
            "(lora_comfy.safetensors) has no name for: it covers the blocks' attention (to_q, to_k, to_v, to_out.0) "
            "and feed-forward (ffn.net.0.proj, ffn.net.2) only. Set train.export_comfy=false to train these "
            "targets (the diffusers LoRA is still written), or drop them from lora.target_modules")
    return [n for n, _ in modules]


def validate_request(cfg: RunConfig) -> TrainRequest:
    """Check everything (model folder, sizes, prompt store, output dir, DeepSpeed JSON) before any weights load."""
    from videoblade.data import PromptStore, PromptStoreError, read_prompt_file
    from videoblade.models import ModelRequestError, get_adapter

    m, tr = cfg.model, cfg.train
    if not m.path:
        raise TrainRequestError("model.path must be set to a local diffusers model folder")
    if not tr.prompt_store:
        raise TrainRequestError("train.prompt_store must be set (build one with utils/process_prompts.py)")
    folder = Path(m.path)
    try:
        adapter = get_adapter(folder)
        if m.family not in ("auto",) and m.family.replace("tiny-", "") != adapter.family:
            raise TrainRequestError(f"model.family={m.family} but {folder} holds a {adapter.family} model: "
                                    f"set model.family={adapter.family} or auto")
        info = adapter.inspect(folder)
        comps = ["transformer", "scheduler"]
        if tr.validation_steps and tr.num_validation_videos > 0:
            comps.append("vae")
            if tr.validation_prompts:
                comps += ["text_encoder", "tokenizer"]
        adapter.check_components(folder, comps)
        geometry = adapter.geometry(info, m.height, m.width, m.frames)
        schedule = adapter.schedule(folder)
    except ModelRequestError as e:
        raise TrainRequestError(str(e)) from None
    try:
        store = PromptStore(tr.prompt_store)
        tcfg = info.transformer_config
        hidden = tcfg.get("text_dim", tcfg.get("text_embed_dim"))
        # model.text_max_length None means the family's length (Wan 512): the store must have it too, or
        # the teacher would be conditioned on other padding than WanPipeline's at inference
        expected_len = m.text_max_length if m.text_max_length is not None else adapter.text_max_length(folder)
        store.check(adapter.family, expected_len, hidden)
    except PromptStoreError as e:
        raise TrainRequestError(str(e)) from None
    notes: list[str] = []
    neg = cfg.tdm.negative_prompt
    reencode = f"`python utils/process_prompts.py --model {folder} --out {store.path} --negative_prompt {neg!r}`"
    if store.negative_prompt is None:  # an older store: its manifest does not say what it embedded
        if neg:
            raise TrainRequestError(
                f"tdm.negative_prompt={neg!r} but prompt store {store.path} does not record the negative prompt it "
                f"embedded (an older store): re-encode it with {reencode}")
        notes.append(f"prompt store {store.path} does not record its negative prompt (an older store): the teacher's "
                     "CFG uses its negative embedding as is (re-encode with utils/process_prompts.py to check it "
                     "against tdm.negative_prompt)")
    elif store.negative_prompt != neg:
        raise TrainRequestError(
            f"tdm.negative_prompt={neg!r} but prompt store {store.path} embedded the negative prompt "
            f"{store.negative_prompt!r} (the teacher's CFG uses the store's embedding): set "
            f"tdm.negative_prompt={store.negative_prompt!r}, or re-encode the store with {reencode}")
    if adapter.family == "cogvideox" and store.text_max_length != geometry.text_tokens:
        raise TrainRequestError(
            f"prompt store has {store.text_max_length} text tokens but the CogVideoX transformer concatenates "
            f"{geometry.text_tokens} (max_text_seq_length): re-encode with --max_length {geometry.text_tokens}")
    if tr.validation_steps and tr.num_validation_videos > 0:
        try:
            import imageio_ffmpeg  # noqa: F401  (write_video's encoder; checked before hours of training)
        except ImportError:
            raise TrainRequestError("validation videos need imageio-ffmpeg (pip install imageio-ffmpeg), "
                                    "or set train.validation_steps=0") from None
    if cfg.tdm.num_train_timesteps != schedule.num_train_timesteps:  # k_step, t_max, sample.steps were checked against it
        raise TrainRequestError(
            f"tdm.num_train_timesteps={cfg.tdm.num_train_timesteps} but {folder}'s scheduler has "
            f"{schedule.num_train_timesteps} training timesteps: set tdm.num_train_timesteps={schedule.num_train_timesteps}")
    if cfg.sample.flow_shift is not None and schedule.kind != "flow":
        raise TrainRequestError(f"sample.flow_shift applies to flow-matching models (Wan) only; {folder} is a "
                                f"{adapter.family} model: set sample.flow_shift=null")
    val_prompts = None
    if tr.validation_prompts:
        vp = Path(tr.validation_prompts)
        shipped = Path(__file__).resolve().parents[2] / vp  # the recipes name the shipped list from the repo root
        if not vp.is_absolute() and not vp.is_file() and shipped.is_file():
            vp = shipped
        try:
            val_prompts = read_prompt_file(vp)
        except PromptStoreError as e:
            raise TrainRequestError(f"train.validation_prompts: {e}") from None
    out = Path(tr.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainRequestError(f"train.output_dir {out} is not writable: {e}") from None
    _fill_model_defaults(cfg, adapter, geometry, store)
    use_ds, ds_path = _want_deepspeed(cfg)
    ds_config = _fill_ds_config(ds_path, cfg) if use_ds else None
    if tr.compile and use_ds:
        raise TrainRequestError("train.compile does not work under DeepSpeed ZeRO-3 (its parameter hooks gather "
                                "weights inside the blocks): set train.compile=false or run without DeepSpeed")
    targets = list(cfg.lora.target_modules or adapter.lora_target_modules)
    lora_modules = _check_targets(info, targets, comfy=tr.export_comfy and adapter.family == "wan")
    if tr.stop_at_step is not None and tr.stop_at_step > tr.max_train_steps:
        raise TrainRequestError("train.stop_at_step must be <= train.max_train_steps")
    resume = _check_resume(cfg, out, store, use_ds, lora_modules)
    return TrainRequest(folder=folder, family=adapter.family, adapter=adapter, info=info, geometry=geometry,
                        schedule=schedule, store=store, output_dir=out, use_deepspeed=use_ds, ds_config=ds_config,
                        target_modules=targets, validation_prompts=val_prompts, notes=notes, resume=resume)


def _fill_model_defaults(cfg: RunConfig, adapter, geometry, store) -> None:
    """Fill the settings left null for the model to decide into ``cfg``, so the run, its config.yaml
    and the LoRA's metadata all hold the values used: the family's teacher CFG, lambda_reg,
    compensation pool and video fps (SPEC: Wan 5.0 / 0 / 32, CogVideoX 3.5 / 0.5 / 16), the video
    size, the prompt store's text length and the validation sampler's steps / eta."""
    t, s, m = cfg.tdm, cfg.sample, cfg.model
    if t.cfg is None:
        t.cfg = float(adapter.default_cfg)
    if t.lambda_reg is None:
        t.lambda_reg = float(adapter.default_lambda_reg)
    cfg.asa = with_family_pool(cfg.asa, adapter.family)
    if s.fps is None:
        s.fps = int(adapter.default_fps)
    if s.steps is None:
        s.steps = t.k_step
    if s.eta is None and s.sampler == "tdm":
        s.eta = t.eta
    m.height, m.width, m.frames = geometry.height, geometry.width, geometry.frames
    if m.text_max_length is None:
        m.text_max_length = int(store.text_max_length)


def _resume_checkpoint(tr, out: Path) -> Path | None:
    """The checkpoint `train.resume_from_checkpoint` names ("latest": the newest complete one in
    `out`, if any), or None."""
    if tr.resume_from_checkpoint == "latest":
        return latest_checkpoint(out)
    if tr.resume_from_checkpoint:
        resume = Path(tr.resume_from_checkpoint)
        if not (resume / "state.json").is_file():
            raise TrainRequestError(f"train.resume_from_checkpoint={resume} is not a complete checkpoint")
        return resume
    return None


def _check_resume(cfg: RunConfig, out: Path, store, use_ds: bool, lora_modules: list[str]) -> Path | None:
    """Resolve the checkpoint to resume from and check, before any weights load, that this run can
    continue it: same launcher setup (DeepSpeed or not), prompt store and seed, LoRA rank and target
    modules; and that `out` holds no checkpoint past the step this run starts from (the pruning keeps
    the highest steps, so it would delete this run's own checkpoints as they are written, and a later
    `latest` resume would continue the other run instead)."""
    from videoblade.data import DistributedPromptSampler, PromptStoreError

    tr = cfg.train
    resume = _resume_checkpoint(tr, out)
    start = 0
    if resume is not None:
        try:
            state = json.loads((resume / "state.json").read_text())
            start = int(state["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainRequestError(f"{resume}/state.json is unreadable ({e}): resume from another checkpoint "
                                    "(train.resume_from_checkpoint=<folder>)") from None
        if bool(state.get("deepspeed")) != use_ds:
            raise TrainRequestError(f"{resume} was written {'with' if state.get('deepspeed') else 'without'} "
                                    "DeepSpeed; resume with the same launcher setup (or train.resume_from_checkpoint=null "
                                    "with another train.output_dir)")
        try:
            DistributedPromptSampler(len(store), tr.train_batch_size, seed=tr.seed).load_state_dict(state["sampler"])
        except PromptStoreError as e:
            raise TrainRequestError(f"{resume}: {e}") from None
        if not use_ds:
            _check_checkpoint_loras(resume, cfg.lora.rank, lora_modules)
    root = out / "checkpoints"
    steps = [CKPT_RE.match(d.name) for d in root.iterdir()] if root.is_dir() else []
    later = sorted(int(m.group(1)) for m in steps if m and int(m.group(1)) > start)
    if later:
        what = f"resumes from step {start} ({resume})" if resume is not None else "starts from step 0"
        raise TrainRequestError(
            f"{root} holds checkpoint-{later[-1]}, past the step this run {what}: this run's checkpoints would be "
            "pruned in favour of those, and a later train.resume_from_checkpoint=latest would continue the other run. "
            "Choose another train.output_dir, move those checkpoints away, or resume from the newest "
            "(train.resume_from_checkpoint=latest)")
    return resume


def _check_checkpoint_loras(path: Path, rank: int, lora_modules: list[str]) -> None:
    """The checkpoint's LoRAs (tensor names and shapes only) against lora.rank / lora.target_modules."""
    from safetensors import safe_open

    for role in ("student", "fake"):
        f = path / f"{role}_lora.safetensors"
        try:
            with safe_open(str(f), framework="pt") as st:
                shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
        except Exception as e:  # a missing or cut file
            raise TrainRequestError(f"{f} is unreadable ({e}): resume from another checkpoint") from None
        ranks = {s[0] for k, s in shapes.items() if f".lora_A.{role}." in k or f".lora_embedding_A.{role}" in k}
        if ranks and ranks != {rank}:
            raise TrainRequestError(f"{path}: its {role} LoRA has rank {sorted(ranks)}, this run lora.rank={rank}: "
                                    "resume with the checkpoint's lora.rank, or start over in another train.output_dir")
        have = {re.sub(r"\.lora_(embedding_)?[AB]\..*$", "", k) for k in shapes if ".lora_" in k}
        if have != set(lora_modules):
            extra, missing = sorted(have - set(lora_modules)), sorted(set(lora_modules) - have)
            raise TrainRequestError(
                f"{path}: its {role} LoRA wraps other modules than lora.target_modules selects (only in the "
                f"checkpoint: {extra[:4]}, only in this run: {missing[:4]}): resume with the checkpoint's "
                "lora.target_modules, or start over in another train.output_dir")


# ============================================================================ roles
class RoleSwitch:
    """Selects student / fake / teacher on one shared module or on two modules.

    `modules["student"]` and `modules["fake"]` are the *unwrapped* diffusers transformers (the same
    object when the base is shared). The teacher is the student module with adapters disabled.
    `asa[name]` is the AdaptiveSparseAttention installed on a module (or None); its `cfg.enabled`
    flag is flipped per role (the install object stays), so the teacher always runs dense.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], asa: dict[int, Any], fake_uses_asa: bool):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.modules = modules
        self.asa = asa  # id(module) -> AdaptiveSparseAttention | None
        self.fake_uses_asa = fake_uses_asa
        self.layers = {id(m): [x for x in m.modules() if isinstance(x, BaseTunerLayer)] for m in modules.values()}
        self.trainable = {id(m): [p for n, p in m.named_parameters() if ".lora_" in n] for m in modules.values()}
        self._state: dict[int, tuple] = {}

    def _apply(self, module, adapter: str | None, asa_on: bool) -> None:
        key = id(module)
        want = (adapter, asa_on)
        if self._state.get(key) != want:
            for layer in self.layers[key]:
                if adapter is None:
                    layer.enable_adapters(False)
                else:
                    layer.enable_adapters(True)
                    layer.set_adapter(adapter)
            for p in self.trainable[key]:  # peft toggles requires_grad; keep every LoRA param trainable
                p.requires_grad_(True)
            self._state[key] = want
        asa = self.asa.get(key)
        if asa is not None:
            asa.cfg.enabled = asa_on
            asa.record_stats = asa_on

    def select(self, role: str) -> torch.nn.Module:
        if role == "student":
            m = self.modules["student"]
            self._apply(m, "student", True)
        elif role == "fake":
            m = self.modules["fake"]
            self._apply(m, "fake", self.fake_uses_asa)
        elif role == "teacher":
            m = self.modules["student"]
            self._apply(m, None, False)
        else:
            raise ValueError(f"unknown role {role!r}")
        return m


# ============================================================================ state files
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {"_empty": torch.zeros(0)}
    save_file_atomic(tensors, path, {"json": json.dumps(meta)} if meta is not None else None)


@contextlib.contextmanager
def _whole_transformers_models(accelerator):
    """While accelerate's DeepSpeed ZeRO-3 config is registered, transformers partitions every model
    it loads (zero.Init): a frozen helper that one rank loads and runs alone (the validation text
    encoder) would come out with empty weights. Unregister it for the load, then put it back."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(plugin, "dschf", None) is not None:
            set_hf_deepspeed_config(plugin.dschf)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("json")
        t = {k: f.get_tensor(k) for k in f.keys() if k != "_empty"}
    return t, (json.loads(meta) if meta else None)


def _cache_meta(path: Path) -> Any:
    """The JSON metadata of a safetensors cache file (its header only), or None when it is missing or
    unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("json")
        return json.loads(meta) if meta else None
    except Exception:  # safetensors' header / JSON errors: a file cut short is no cache
        return None


def _optimizer_to_file(opt, path: Path) -> None:
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                rest.setdefault(str(idx), {})[k] = v
    _save_tensors(path, tensors, {"param_groups": sd["param_groups"], "state": rest})


def _optimizer_from_file(opt, path: Path) -> None:
    tensors, meta = _load_tensors(path)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in meta["state"].items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return None  # lambdas and other callables: schedulers rebuild them


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (temporary folders of an interrupted save are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    best = None
    for d in root.iterdir():
        m = CKPT_RE.match(d.name)
        if m and (d / "state.json").is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), d)
    return best[1] if best else None


def _deepspeed_keep_tuple_attributes() -> None:
    """ZeRO-3's module hooks rebuild every tuple they pass through as `type(t)(items)`, which drops
    the attributes of a tuple subclass (ASA's `RotaryWithContext` carries its forward context that
    way) or fails in its constructor. Rebuild such tuples with their attributes instead."""
    import deepspeed.runtime.zero.parameter_offload as po
    import deepspeed.runtime.zero.utils as zu

    orig = zu.apply_to_tensors_only
    if getattr(orig, "_videoblade", False):
        return

    def apply_to_tensors_only(function, value, warning_msg_fn=None):
        if isinstance(value, tuple) and type(value) is not tuple and hasattr(value, "__dict__") \
                and not zu.isinstance_namedtuple(value):
            new = tuple.__new__(type(value), [apply_to_tensors_only(function, e) for e in value])
            new.__dict__.update(value.__dict__)
            return new
        return orig(function, value, warning_msg_fn=warning_msg_fn)

    apply_to_tensors_only._videoblade = True
    zu.apply_to_tensors_only = apply_to_tensors_only
    po.apply_to_tensors_only = apply_to_tensors_only


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of `path` (metrics.jsonl) past `step`, the step this run starts from: rows an
    earlier run logged after its last checkpoint (or a run started over in the same folder), which
    this run logs again, and a line cut short by a kill. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for ln in lines:
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if keep != lines:
        write_text_atomic(path, "".join(keep))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ============================================================================ trainer
class TDMTrainer:
    def __init__(self, cfg: RunConfig, request: TrainRequest | None = None):
        self.cfg = cfg
        self.req = request or validate_request(cfg)
        self.out = self.req.output_dir
        self._setup_accelerator()
        self._build_models()
        self._build_optim()
        from videoblade.data import DistributedPromptSampler

        acc = self.accelerator
        self.sampler = DistributedPromptSampler(len(self.req.store), cfg.train.train_batch_size,
                                                acc.num_processes, acc.process_index, seed=cfg.train.seed)
        gdev = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.generator = torch.Generator(device=gdev).manual_seed(cfg.train.seed * 1000 + acc.process_index)
        self.negative = self.req.store.negative().to(self.device)
        self.global_step = 0
        self._engine_pending = {"student": False, "fake": False}  # DeepSpeed: a backward awaits its boundary step
        self.skipped_fake = 0
        self.fake_steps = 0

    # ------------------------------------------------------------------ setup
    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

        cfg, req = self.cfg, self.req
        tr = cfg.train
        log_with = None if tr.report_to == "none" else tr.report_to
        if log_with == "wandb":
            try:
                import wandb  # noqa: F401

                os.environ.setdefault("WANDB_MODE", "offline")
                os.environ.setdefault("WANDB_DIR", str(self.out))
            except ImportError:
                log_with = "tensorboard"
                req.notes.append("wandb is not installed: logging to tensorboard instead")
        if log_with == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                log_with = None
                req.notes.append("tensorboard is not installed: metrics go to metrics.jsonl only")
        kwargs: dict[str, Any] = {}
        cuda = torch.cuda.is_available()
        self.shared = bool(tr.share_base) and not req.use_deepspeed
        if req.use_deepspeed:
            from accelerate.utils import DeepSpeedPlugin

            if "RANK" not in os.environ:  # plain `python -m videoblade.train`: a world of one
                os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(_free_port()))
            if not cuda:
                # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (~100 s) that only
                # inference uses; gloo does the training collectives.
                import importlib

                # (not `import deepspeed.comm.torch as m`: that name resolves to PyTorch itself)
                importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            _deepspeed_keep_tuple_attributes()
            kwargs["deepspeed_plugins"] = {"student": DeepSpeedPlugin(hf_ds_config=copy.deepcopy(req.ds_config)),
                                           "fake": DeepSpeedPlugin(hf_ds_config=copy.deepcopy(req.ds_config))}
            if tr.share_base:
                req.notes.append("DeepSpeed: each engine partitions its own module, so student and fake get "
                                 "separate bases (train.share_base ignored)")
        else:
            kwargs["cpu"] = not cuda
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=self.shared)]
        self.accelerator = Accelerator(
            mixed_precision=tr.mixed_precision, gradient_accumulation_steps=tr.gradient_accumulation_steps,
            log_with=log_with, project_config=ProjectConfiguration(project_dir=str(self.out),
                                                                   logging_dir=str(self.out / "logs")),
            **kwargs)
        self.device = self.accelerator.device
        self.log_with = log_with
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.accelerator.num_processes:
            raise TrainRequestError(
                f"the launcher started {world} processes but accelerate sees {self.accelerator.num_processes} "
                "(multi-process DeepSpeed needs GPUs; on CPUs use DDP: accelerate launch --multi_gpu)")
        set_seed(tr.seed)  # LoRA init (peft uses the global RNG) is the same on every rank

    def _build_models(self) -> None:
        from peft import LoraConfig

        from videoblade.models import parse_dtype

        cfg, req = self.cfg, self.req
        dtype = parse_dtype(cfg.model.dtype)
        load_device = "cpu" if req.use_deepspeed else self.device
        base = req.adapter.load(req.folder, dtype=dtype, device=load_device, components=("transformer",)).transformer

        def lora(adapter_name: str) -> LoraConfig:
            return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.lora_alpha, target_modules=list(req.target_modules),
                              lora_dropout=cfg.lora.lora_dropout, init_lora_weights=True)

        def prepare_module(module, adapters: list[str]):
            module.requires_grad_(False)
            for name in adapters:
                with warnings.catch_warnings():
                    # the shared base carries two named adapters on purpose (student and fake score);
                    # peft warns about the second one on every launch
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    module.add_adapter(lora(name), adapter_name=name)
            for n, p in module.named_parameters():
                if ".lora_" in n:
                    p.requires_grad_(True)
                    if not req.use_deepspeed:
                        p.data = p.data.float()  # fp32 trainable weights; DeepSpeed keeps its own masters
            if cfg.train.gradient_checkpointing:
                module.enable_gradient_checkpointing()
            module.train()
            return module

        if self.shared:
            prepare_module(base, ["student", "fake"])
            student = fake = base
        else:
            fake = copy.deepcopy(base)
            student = prepare_module(base, ["student"])
            fake = prepare_module(fake, ["fake"])
        self._raw = {"student": student, "fake": fake}

    def _install_asa(self) -> dict[int, Any]:
        """ASA on the student module (and the fake's when separate and `asa.apply_to_fake`).

        Installed after `accelerator.prepare`: DeepSpeed ZeRO-3 registers forward hooks that rebuild
        a module's tuple outputs, which must run before ASA's rope hook attaches its context."""
        cfg = self.cfg
        student, fake = self._raw["student"], self._raw["fake"]
        asa_map: dict[int, Any] = {}
        if cfg.asa.enabled:
            from videoblade.attention import set_adaptive_sparse_attention

            asa_map[id(student)] = set_adaptive_sparse_attention(student, copy.deepcopy(cfg.asa))
            if fake is not student and cfg.asa.apply_to_fake:
                asa_map[id(fake)] = set_adaptive_sparse_attention(fake, copy.deepcopy(cfg.asa))
        return asa_map

    def _param_groups(self, module, adapter: str) -> list[torch.nn.Parameter]:
        return [p for n, p in module.named_parameters() if ".lora_" in n and f".{adapter}." in n]

    def _build_optim(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, req, acc = self.cfg, self.req, self.accelerator
        o = cfg.optim

        def make(params, lr):
            opt = torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                    weight_decay=o.adam_weight_decay)
            sch = get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.lr_warmup_steps,
                                num_training_steps=cfg.train.max_train_steps, num_cycles=o.lr_num_cycles)
            return opt, sch

        ps = self._param_groups(self._raw["student"], "student")
        pf = self._param_groups(self._raw["fake"], "fake")
        opt_s, sch_s = make(ps, o.learning_rate)
        opt_f, sch_f = make(pf, o.learning_rate_fake)
        self.params = {"student": ps, "fake": pf}
        if req.use_deepspeed:
            from accelerate.utils import DeepSpeedEngineWrapper

            acc.state.select_deepspeed_plugin("student")
            # the LR schedulers stay ours (DeepSpeed steps only its own scheduler types): stepped per
            # optimizer step in _optimizer_step and checkpointed as JSON in both modes
            eng_s, opt_s = acc.prepare(self._raw["student"], opt_s)
            acc.state.select_deepspeed_plugin("fake")
            eng_f, opt_f = acc.prepare(self._raw["fake"], opt_f)
            acc.state.select_deepspeed_plugin("student")
            self.grad_model = {"student": eng_s, "fake": eng_f}
            self.nograd_model = dict(self.grad_model)
            self.engines = {"student": DeepSpeedEngineWrapper(eng_s), "fake": DeepSpeedEngineWrapper(eng_f)}
            # the engines converted their modules (bf16): the roles act on those
            self._raw = {"student": eng_s.module, "fake": eng_f.module}
            self.params = {"student": self._param_groups(eng_s.module, "student"),
                           "fake": self._param_groups(eng_f.module, "fake")}
        else:
            if self.shared:
                model, opt_s, opt_f = acc.prepare(self._raw["student"], opt_s, opt_f)
                self.grad_model = {"student": model, "fake": model}
            else:
                ms, mf, opt_s, opt_f = acc.prepare(self._raw["student"], self._raw["fake"], opt_s, opt_f)
                self.grad_model = {"student": ms, "fake": mf}
            self.nograd_model = dict(self._raw)  # no DDP machinery for no-grad calls
            self.engines = None
        self.optimizers = {"student": opt_s, "fake": opt_f}
        self.schedulers = {"student": sch_s, "fake": sch_f}
        self._asa_map = self._install_asa()
        self.compiled_blocks = 0
        if cfg.train.compile:  # after ASA, so the graphs hold its processors; one set of graphs per role
            for module in dict.fromkeys(self._raw.values()):
                self.compiled_blocks += req.adapter.compile_blocks(module, backend=cfg.train.compile_backend)
        self.roles = RoleSwitch(self._raw, self._asa_map,
                                fake_uses_asa=bool(self.cfg.asa.enabled and self.cfg.asa.apply_to_fake))
        self.prepared = list(dict.fromkeys(self.grad_model.values()))

    # ------------------------------------------------------------------ model calls
    def _predict(self, role: str, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, grad: bool) -> torch.Tensor:
        self.roles.select(role)
        model = (self.grad_model if grad else self.nograd_model)["fake" if role == "fake" else "student"]
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            return self.req.adapter.predict(model, x, t, emb, self.req.geometry, schedule=self.req.schedule)

    def _fn(self, role: str, emb: torch.Tensor):
        return lambda x, t: self._predict(role, x, t, emb, grad=False)

    def _backward(self, role: str, loss: torch.Tensor) -> None:
        if self.engines is not None:
            sync = self.accelerator.sync_gradients
            self.engines[role].backward(loss, sync_gradients=sync)
            # a backward inside the window leaves gradients in the engine until its boundary step
            self._engine_pending[role] = not sync
        else:
            self.accelerator.backward(loss)

    def _step_skipped_boundary_engine(self, role: str) -> None:
        """DeepSpeed, at an accumulation boundary whose backward was skipped: the engine steps inside
        the boundary's backward, so without one the window's earlier micro-steps stayed in the engine
        and were folded into the next window's update (and lost in a checkpoint written meanwhile:
        a resume then trained on other gradients than the straight run). Step the engine on them here,
        as the DDP / single-process paths step on the window minus the skipped micro-step; a window
        with no backward at all steps nothing (like an optimizer whose gradients are all None)."""
        if self.engines is None or not self.accelerator.sync_gradients or not self._engine_pending.get(role):
            return
        engine = self.grad_model[role]
        # what DeepSpeed's own step does at a boundary it did not see in backward (its unmanaged
        # accumulation mode): ZeRO-2/3 reduced and partitioned every micro-step, so only finalize
        # the accumulated partitions (incl. offload); stages 0/1 reduce here
        engine.set_gradient_accumulation_boundary(True)
        if engine.zero_optimization_partition_gradients():
            engine.optimizer.finalize_gradient_accumulation_boundary()
        else:
            engine.allreduce_gradients()
        engine.step()
        self._engine_pending[role] = False

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        if self.accelerator.num_processes > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return bool(t.item() > 0)

    def _average_unsynced_grads(self, role: str) -> None:
        """Average ``role``'s gradients over the ranks by hand (DDP, at an accumulation boundary whose
        backward was skipped). DDP all-reduces only inside the boundary's backward: without it the
        gradients the window's earlier micro-steps gathered under ``no_sync`` are still each rank's
        own, and stepping on them would leave the LoRAs different on every rank. Averaged, every
        rank steps on what one process would have: the window minus the skipped micro-step."""
        acc = self.accelerator
        if self.engines is not None or acc.num_processes == 1 or not acc.sync_gradients:
            return
        # the same parameters hold gradients on every rank: the skip decisions are all-reduced, so every
        # rank ran the same backwards in this window (none at all: nothing to average)
        params = [p for p in self.params[role] if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        flat /= acc.num_processes
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _optimizer_step(self, role: str) -> float | None:
        """Clip + step + zero_grad (non-DeepSpeed; DeepSpeed stepped inside backward). Returns the grad norm."""
        acc = self.accelerator
        if self.engines is not None:
            if acc.sync_gradients:
                self.schedulers[role].step()
                n = self.grad_model[role].get_global_grad_norm()
                return None if n is None else float(n)
            return None
        norm = None
        if acc.sync_gradients:
            # unscale (fp16's GradScaler) this role's optimizer only: `acc.clip_grad_norm_` unscales every
            # prepared optimizer, so the fake step's clip would unscale the student's half-accumulated
            # window, and the student's own clip (after the fake's scaler.update reset that record)
            # would divide those micro-steps' gradients by the loss scale a second time
            acc.unscale_gradients(optimizer=self.optimizers[role])
            norm = float(torch.nn.utils.clip_grad_norm_(self.params[role], self.cfg.optim.max_grad_norm))
        self.optimizers[role].step()
        if acc.sync_gradients:
            self.schedulers[role].step()
        self.optimizers[role].zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ one TDM micro-step
    def _micro_step(self, emb: torch.Tensor) -> dict[str, float]:
        cfg, req = self.cfg, self.req
        sched, t_cfg, gen = req.schedule, cfg.tdm, self.generator
        B = emb.shape[0]
        T = sched.num_train_timesteps
        neg = self.negative.expand(B, *self.negative.shape[1:]).to(emb.dtype)
        s_fake = tdm.sample_stages(B, t_cfg.k_step, T, t_cfg.t_max, gen, self.device)
        s_gen = tdm.sample_stages(B, t_cfg.k_step, T, t_cfg.t_max, gen, self.device)
        depth = int(torch.maximum(s_fake.index, s_gen.index).max())
        noise = randn((B, *req.geometry.latent_shape), gen, self.device)
        roll = tdm.student_rollout(self._fn("student", emb), sched, noise, t_cfg.k_step, t_cfg.eta, gen, depth=depth)
        logs: dict[str, float] = {}

        # ---- fake-score step (SPEC 2.2)
        x_g = tdm.gather_stage(roll.states, s_fake.index)
        out_s = tdm.gather_stage(roll.outputs, s_fake.index)
        x0_s, eps_s = sched.to_x0_eps(out_s, x_g, s_fake.t_g)
        x_t = tdm.landed_noisy(sched, x0_s, eps_s, s_fake, t_cfg.eta, gen)
        teacher_out = None
        if t_cfg.lambda_reg > 0:
            teacher_out = self._predict("teacher", x_t, s_fake.t, emb, grad=False)
        fake_out = self._predict("fake", x_t, s_fake.t, emb, grad=True)
        loss_f, parts = tdm.fake_score_loss(sched, fake_out, x_t, s_fake.t, x0_s, teacher_out, t_cfg.lambda_reg)
        lf = loss_f.detach()
        bad = self._any_rank(not bool(torch.isfinite(lf)) or float(lf) > t_cfg.max_fake_loss)
        self.fake_steps += 1
        # shared base under DDP (find_unused_parameters): the window's earlier fake backwards (no_sync)
        # marked the fake LoRA as used in the reducer's per-window record, which only a synced backward
        # clears; skipped at the boundary, the generator's synced backward finds those parameters
        # unused with no gradient (zero_grad set them to None) and DDP raises ("Encountered gradient
        # which is undefined, but still allreduced"). Zero gradients through that backward, None after.
        hold = (bad and self.shared and self.engines is None and self.accelerator.num_processes > 1
                and self.accelerator.sync_gradients and any(p.grad is not None for p in self.params["fake"]))
        if bad:
            self.skipped_fake += 1
            del fake_out, loss_f
            self._average_unsynced_grads("fake")
            self._step_skipped_boundary_engine("fake")
        else:
            self.roles.select("fake")  # the recompute of checkpointed blocks sees the fake role
            self._backward("fake", loss_f)
        gn = self._optimizer_step("fake")
        if hold:
            for p in self.params["fake"]:
                p.grad = torch.zeros_like(p)
        logs.update(loss_fake=float(lf), loss_fake_dsm=float(parts["dsm"]), loss_fake_reg=float(parts["reg"]))
        if gn is not None:
            logs["grad_norm_fake"] = gn

        # ---- generator step (SPEC 2.3)
        x_g = tdm.gather_stage(roll.states, s_gen.index)
        out = self._predict("student", x_g, s_gen.t_g, emb, grad=True)
        x0_s, eps_s = sched.to_x0_eps(out, x_g, s_gen.t_g)
        x_t = tdm.landed_noisy(sched, x0_s, eps_s, s_gen, t_cfg.eta, gen)  # from the detached landing point
        with torch.no_grad():
            real = guided(self._fn("teacher", emb), self._fn("teacher", neg), t_cfg.cfg)(x_t, s_gen.t)
            x0_real, _ = sched.to_x0_eps(real, x_t, s_gen.t)
            fake = self._predict("fake", x_t, s_gen.t, emb, grad=False)
            x0_fake, _ = sched.to_x0_eps(fake, x_t, s_gen.t)
        loss_g, gstats = tdm.generator_loss(x0_s, x0_real, x0_fake, t_cfg.huber_c, t_cfg.sample_weighting)
        self.roles.select("student")  # the student's graph is recomputed under the student role
        self._backward("student", loss_g)
        if hold:
            for p in self.params["fake"]:
                p.grad = None
        gn = self._optimizer_step("student")
        logs.update(loss_gen=float(loss_g.detach()), real_fake_gap=float(gstats["real_fake_gap"]),
                    rollout_depth=depth + 1)
        if gn is not None:
            logs["grad_norm_student"] = gn
        return logs

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def _trainable_state(self, role: str) -> dict[str, torch.Tensor]:
        module = self._raw[role]
        return {n: p.detach() for n, p in module.named_parameters() if ".lora_" in n and f".{role}." in n}

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self._ckpt_root()
        step = self.global_step
        tmp = root / f".tmp-checkpoint-{step}"
        final = root / f"checkpoint-{step}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        if self.engines is not None:  # DeepSpeed's own format (partitioned LoRA + optimizer states)
            for role in ("student", "fake"):
                # the frozen base stays out: DeepSpeed otherwise writes each engine's whole module state
                # (under ZeRO-2 two full copies of the base transformer per checkpoint)
                self.grad_model[role].save_checkpoint(str(tmp / f"ds_{role}"), tag="state", save_latest=False,
                                                      exclude_frozen_parameters=True)
        elif acc.is_main_process:
            for role in ("student", "fake"):
                _save_tensors(tmp / f"{role}_lora.safetensors", self._trainable_state(role))
                _optimizer_to_file(self.optimizers[role], tmp / f"{role}_optimizer.safetensors")
        if acc.is_main_process:
            for role in ("student", "fake"):
                (tmp / f"{role}_scheduler.json").write_text(json.dumps(_jsonable(self.schedulers[role].state_dict())))
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        _save_tensors(tmp / f"rng_rank{acc.process_index}.safetensors", rng)
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"step": step, "sampler": self.sampler.state_dict(), "skipped_fake_steps": self.skipped_fake,
                     "fake_steps": self.fake_steps, "num_processes": acc.num_processes,
                     "deepspeed": self.engines is not None, "shared_base": self.shared}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))  # last file: marks it complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpts = sorted((int(CKPT_RE.match(d.name).group(1)), d) for d in root.iterdir()
                           if CKPT_RE.match(d.name))
            for _, d in ckpts[:-self.cfg.train.checkpoints_total_limit]:
                shutil.rmtree(d, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = json.loads((path / "state.json").read_text())  # checked against the run by _check_resume
        if self.engines is not None:
            for role in ("student", "fake"):
                # non-strict: the checkpoint holds the trainable (LoRA) parameters only; the base is the model folder's
                self.grad_model[role].load_checkpoint(str(path / f"ds_{role}"), tag="state", load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
                self.schedulers[role].load_state_dict(json.loads((path / f"{role}_scheduler.json").read_text()))
        else:
            for role in ("student", "fake"):
                tensors, _ = _load_tensors(path / f"{role}_lora.safetensors")
                own = dict(self._raw[role].named_parameters())
                if set(tensors) != {n for n in own if ".lora_" in n and f".{role}." in n}:
                    raise TrainRequestError(f"{path}: the {role} LoRA in the checkpoint does not match this model "
                                            "(another rank / target modules?)")
                with torch.no_grad():
                    for n, t in tensors.items():
                        own[n].copy_(t)
                _optimizer_from_file(self.optimizers[role], path / f"{role}_optimizer.safetensors")
                self.schedulers[role].load_state_dict(json.loads((path / f"{role}_scheduler.json").read_text()))
        rng_file = path / f"rng_rank{acc.process_index}.safetensors"
        if rng_file.is_file() and state["num_processes"] == acc.num_processes:
            rng, _ = _load_tensors(rng_file)
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["step"])
        self.skipped_fake = int(state["skipped_fake_steps"])
        self.fake_steps = int(state.get("fake_steps", 0))

    # ------------------------------------------------------------------ outputs
    def _gathered(self, role: str) -> dict[str, torch.Tensor]:
        params = dict(self._trainable_state(role))
        if self.engines is not None:
            import deepspeed

            live = [p for n, p in self._raw[role].named_parameters() if n in params]
            with deepspeed.zero.GatheredParameters(live, modifier_rank=None):
                return {re.sub(rf"\.{role}\.", ".", n): p.detach().float().cpu().clone()
                        for n, p in self._raw[role].named_parameters() if n in params}
        return {re.sub(rf"\.{role}\.", ".", n): t.float().cpu().clone() for n, t in params.items()}

    def export_loras(self) -> dict[str, str]:
        from videoblade.io.lora import export_comfy, save_lora

        cfg = self.cfg
        sd_s, sd_f = self._gathered("student"), self._gathered("fake")
        out: dict[str, str] = {}
        if self.accelerator.is_main_process:
            common = dict(family=self.req.family, rank=cfg.lora.rank, alpha=cfg.lora.lora_alpha,
                          target_modules=self.req.target_modules, k_step=cfg.tdm.k_step, eta=cfg.tdm.eta,
                          extra={"cfg": cfg.tdm.cfg, "lambda_reg": cfg.tdm.lambda_reg, "step": self.global_step,
                                 "base_model": str(self.req.folder)})
            p = save_lora(self.out, sd_s, asa=to_dict(cfg.asa) if cfg.asa.enabled else None, **common)
            out["student"] = str(p)
            f = save_lora(self.out / "fake", sd_f,
                          asa=to_dict(cfg.asa) if cfg.asa.enabled and cfg.asa.apply_to_fake else None,
                          **dict(common, extra=dict(common["extra"], role="fake_score")))
            out["fake"] = str(f)
            if cfg.train.export_comfy and self.req.family == "wan":
                out["comfy"] = str(export_comfy(p))
        self.accelerator.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ validation
    def _validation_embeds(self) -> torch.Tensor | None:
        tr = self.cfg.train
        if not tr.validation_steps or tr.num_validation_videos <= 0:
            return None
        n = tr.num_validation_videos
        if self.req.validation_prompts is None:
            return self.req.store.get(range(min(n, len(self.req.store)))).to(self.device)
        cache = self.out / "validation_embeds.safetensors"
        acc = self.accelerator
        # keyed on what they were encoded from: an output folder reused with other prompts or another
        # model re-encodes instead of validating on stale embeddings
        key = {"prompts": list(self.req.validation_prompts[:n]), "model": str(self.req.folder),
               "text_max_length": int(self.req.store.text_max_length)}
        if acc.is_main_process and _cache_meta(cache) != key:
            adapter = self.req.adapter
            with _whole_transformers_models(acc):
                te = adapter.load(self.req.folder, dtype=torch.float32 if self.device.type == "cpu" else torch.bfloat16,
                                  device=self.device, components=("text_encoder", "tokenizer"))
            emb = adapter.encode_prompts(te.text_encoder, te.tokenizer, self.req.validation_prompts[:n],
                                         max_length=self.req.store.text_max_length)
            _save_tensors(cache, {"embeds": emb.float()}, key)
            del te
        acc.wait_for_everyone()
        return _load_tensors(cache)[0]["embeds"].to(self.device)

    def _validation_latents(self, embeds: torch.Tensor) -> torch.Tensor:
        """The student's validation latents with the `sample.*` settings: the tdm eta sampler (steps /
        eta default to tdm.k_step / tdm.eta) or UniPC (flow_shift); guidance > 1 runs CFG against the
        prompt store's negative embedding."""
        from videoblade.sampling import sample, sample_unipc

        s, req = self.cfg.sample, self.req
        self.roles.select("student")
        g = torch.Generator(device=self.generator.device).manual_seed(s.seed)
        steps = s.steps if s.steps is not None else self.cfg.tdm.k_step
        neg = self.negative if s.guidance != 1.0 else None
        args = (req.adapter, self.nograd_model["student"], req.schedule, embeds.to(self.device), req.geometry)
        if s.sampler == "unipc":
            return sample_unipc(*args, steps=steps, guidance=s.guidance, negative_embeds=neg, generator=g,
                                flow_shift=s.flow_shift, progress=False, desc="validation")
        return sample(*args, steps=steps, eta=s.eta if s.eta is not None else self.cfg.tdm.eta, generator=g,
                      guidance=s.guidance, negative_embeds=neg, progress=False, desc="validation")

    def validate(self, embeds: torch.Tensor) -> list[str]:
        """Sample with the student through the shared sampler; write mp4s (main process). All ranks run
        the forwards (ZeRO-3 gathers parameters collectively); only the main one decodes and writes."""
        cfg, acc, req = self.cfg, self.accelerator, self.req
        student = self._raw["student"]
        was_training = student.training
        student.eval()  # LoRA dropout (lora.lora_dropout > 0) off while sampling, as at inference
        try:
            lat = self._validation_latents(embeds)
        finally:
            student.train(was_training)
        for a in self.roles.asa.values():
            a.reset_stats()
        paths: list[str] = []
        if acc.is_main_process:
            from videoblade.io.video import write_video

            if getattr(self, "_vae", None) is None:
                self._vae = req.adapter.load(req.folder, device=self.device, components=("vae",)).vae
                if cfg.train.vae_slicing and hasattr(self._vae, "enable_slicing"):
                    self._vae.enable_slicing()
                if cfg.train.vae_tiling and hasattr(self._vae, "enable_tiling"):
                    self._vae.enable_tiling()
                if req.adapter.supports_decode_chunk:  # diffusers' own loop: the least decode memory
                    req.adapter.configure_decode_chunk(self._vae, 1)  # while the training models stay resident
            frames = req.adapter.decode(self._vae, lat)
            d = self.out / "samples"
            d.mkdir(exist_ok=True)
            for i in range(frames.shape[0]):
                p = d / f"step{self.global_step:06d}_{i}.mp4"
                write_video(p, frames[i], fps=cfg.sample.fps)
                paths.append(str(p))
        acc.wait_for_everyone()
        return paths

    # ------------------------------------------------------------------ loop
    def _density(self) -> dict[str, float]:
        out = {}
        for name, role in (("density_student", "student"), ("density_fake", "fake")):
            a = self.roles.asa.get(id(self._raw[role]))
            if a is None or (name == "density_fake" and a is self.roles.asa.get(id(self._raw["student"]))):
                continue
            st = a.density_stats(reset=True)
            if st["mean"] is not None:
                out[name] = float(st["mean"])
        return out

    def run(self, progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        tr = cfg.train
        if acc.is_main_process:
            dump_config(cfg, self.out)
            # temporary folders of saves a kill interrupted (never read: latest_checkpoint skips them)
            for d in self._ckpt_root().glob(".tmp-checkpoint-*"):
                shutil.rmtree(d, ignore_errors=True)
        resume = self.req.resume
        if resume is not None:
            self.load_checkpoint(resume)
        if self.log_with is not None:
            flat = {}

            def walk(prefix, d):
                for k, v in d.items():
                    if isinstance(v, dict):
                        walk(f"{prefix}{k}.", v)
                    else:
                        flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
            walk("", to_dict(cfg))
            acc.init_trackers(tr.tracker_project, config=flat)
        for note in self.req.notes:
            acc.print(f"[videoblade] {note}")
        val_embeds = self._validation_embeds()
        stop = tr.stop_at_step or tr.max_train_steps
        metrics_f = None
        if acc.is_main_process:
            _truncate_metrics(self.out / "metrics.jsonl", self.global_step)
            metrics_f = open(self.out / "metrics.jsonl", "a")
        bar = tqdm(total=tr.max_train_steps, initial=self.global_step, desc="TDM", unit="step",
                   disable=not (progress and acc.is_local_main_process)
                   or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
                   dynamic_ncols=True)  # an explicit disable= overrides tqdm's own TQDM_DISABLE reading
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_prev = time.perf_counter()
        step_times: list[float] = []
        last: dict[str, float] = {}
        videos: list[str] = []
        try:
            while self.global_step < stop:
                agg: dict[str, list[float]] = {}
                # the rates this step's optimizer steps use (the schedulers step after them)
                lrs = {r: self.schedulers[r].get_last_lr()[0] for r in ("student", "fake")}
                for _ in range(tr.gradient_accumulation_steps):
                    idx = self.sampler.next_indices()
                    emb = self.req.store.get(idx).to(self.device)
                    with acc.accumulate(*self.prepared):
                        logs = self._micro_step(emb)
                    for k, v in logs.items():
                        agg.setdefault(k, []).append(v)
                self.global_step += 1
                now = time.perf_counter()
                step_times.append(now - t_prev)
                t_prev = now
                rec = {k: sum(v) / len(v) for k, v in agg.items()}
                rec.update(step=self.global_step, skipped_fake_steps=self.skipped_fake,
                           lr_student=lrs["student"], lr_fake=lrs["fake"], s_per_it=step_times[-1],
                           peak_memory_gb=_peak_memory_gb(self.device), epoch=self.sampler.epoch)
                rec.update(self._density())
                last = rec
                if self.global_step % tr.logging_steps == 0 or self.global_step == stop:
                    if self.log_with is not None:
                        acc.log({k: v for k, v in rec.items() if k != "step"}, step=self.global_step)
                    if metrics_f is not None:
                        metrics_f.write(json.dumps(strict_json(rec)) + "\n")
                        metrics_f.flush()
                bar.update(1)
                bar.set_postfix(loss_g=f"{rec['loss_gen']:.4g}", loss_f=f"{rec['loss_fake']:.4g}",
                                skip=self.skipped_fake)
                if self.global_step % tr.checkpointing_steps == 0 or self.global_step == stop:
                    self.save_checkpoint()
                if val_embeds is not None and self.global_step % tr.validation_steps == 0:
                    videos += self.validate(val_embeds)
                t_prev = time.perf_counter()  # s_per_it: the step itself, not the checkpoint or validation after it
        finally:
            bar.close()
            if metrics_f is not None:
                metrics_f.close()
        loras = self.export_loras() if self.global_step >= tr.max_train_steps else {}
        # every rank's LoRA checksum: equal across ranks when the gradients were all-reduced
        sums = torch.stack([torch.stack([p.detach().double().sum() for p in self.params[r]]).sum()
                            for r in ("student", "fake")]).to(self.device)
        if self.engines is not None:  # partitioned: checksum the gathered full tensors
            sums = torch.tensor([sum(float(v.double().sum()) for v in self._gathered(r).values())
                                 for r in ("student", "fake")], dtype=torch.float64, device=self.device)
        per_rank = acc.gather(sums[None]).cpu().tolist()
        timed = step_times[1:] if len(step_times) > 1 else step_times
        summary = {"step": self.global_step, "max_train_steps": tr.max_train_steps, "finished":
                   self.global_step >= tr.max_train_steps, "skipped_fake_steps": self.skipped_fake,
                   "fake_steps": self.fake_steps, "s_per_it": (sum(timed) / len(timed)) if timed else None,
                   "peak_memory_gb": _peak_memory_gb(self.device), "last": last, "loras": loras,
                   "videos": videos, "lora_checksums_per_rank": per_rank, "num_processes": acc.num_processes, "deepspeed": self.engines is not None,
                   "shared_base": self.shared, "resumed_from": str(resume) if resume else None,
                   "compiled_blocks": self.compiled_blocks,
                   # graphs dynamo compiled in this process: a number growing with the layer count
                   # or the steps would mean recompiles
                   "compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                   "family": self.req.family, "geometry": {"latent_shape": list(self.req.geometry.latent_shape),
                                                           "token_grid": list(self.req.geometry.token_grid)}}
        if acc.is_main_process:
            (self.out / "summary.json").write_text(json.dumps(strict_json(summary), indent=2))
        if self.log_with is not None:
            acc.end_training()
        return summary


def train(cfg: RunConfig, progress: bool = True) -> dict:
    """Validate the request, build the roles, run (or resume) TDM training; returns the summary dict.
    ``progress=False`` hides the training progress bar (as does tqdm's TQDM_DISABLE=1)."""
    req = validate_request(cfg)
    trainer = TDMTrainer(cfg, req)
    return trainer.run(progress=progress)

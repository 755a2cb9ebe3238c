"""Few-step inference from a distilled student (or the dense 50-step baseline): prompts -> mp4 + JSON.

`videoblade generate ...` and `python utils/inference.py ...` both land in `main`. The run goes in
three phases, and the first never touches weights:

1. **plan** (`plan_from_args`): resolve the request (family defaults, `--baseline` preset), read the
   model folder's configs, validate the size with the adapter, read the LoRA's safetensors header
   (metadata + shapes) and check it against the model config (family, rank, layer shapes), read the
   prompts, check the output folder is writable. Every problem raises `InferenceError` with one
   line that says what to change.
2. **load** (`load_components`): transformer (+ LoRA, + ASA when sparse), VAE in the decode dtype
   (+ tiling), text encoder and tokenizer.
3. **generate** (`generate`): per prompt encode -> sample -> decode -> write mp4, timing each stage
   (CUDA-synchronised), reading the realised ASA density; a prompt that fails is reported and the
   rest continue. The JSON report holds the exact settings, the per-stage timings and the density.

Output layout: `--out DIR` writes `DIR/<NNNN>-<prompt>-<k>.mp4` and `DIR/inference.json`;
`--eval-dir DIR` writes the VBench-style `DIR/<family>_videos/<method>/<prompt>-<k>.mp4` (method:
baseline, tdm, asa, blade, or any `--method` name) and the report next to that folder as `<method>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from videoblade.config import ASAConfig, ConfigError, load_config, to_dict, with_family_pool
from videoblade.io.atomic import write_text_atomic

__all__ = [
    "InferenceError",
    "METHODS",
    "VAE_DTYPE_DEFAULT",
    "build_parser",
    "plan_from_args",
    "load_components",
    "generate",
    "main",
    "video_filename",
    "sanitize_prompt",
    "inspect_lora",
    "compare_decode",
    "psnr",
]

METHODS = ("baseline", "tdm", "asa", "blade")
BASELINE_STEPS = 50
# The VAE decode dtype used when --vae-dtype is not given, chosen by benchmarks/e2e.py's decode comparison
# (benchmarks/results/e2e_h200.json, one H200, same latents): the fastest eager setting whose PSNR against
# the fp32 decode stays above 40 dB on both families. Wan 81x480x832 (at b3cd8f9): fp32 2.79 s, bf16 1.82 s
# (48.0 dB), fp16 1.84 s (58.5 dB), bf16 tiled 4.62 s (38.2 dB); CogVideoX 49x480x720: fp32 2.81 s, bf16
# 2.15 s (51.2 dB), fp16 2.17 s, bf16 tiled 3.20 s. fp16 ties bf16 on speed but risks overflow on trained
# activations, so bf16. --vae-compile (off by default; ModelAdapter.compile_vae) takes CogVideoX to 1.09 s
# after a one-time ~94 s compile of the whole decoder and Wan to 1.30 s after a ~44 s compile of its fused
# RMS norms (with the conv bias, SiLU and residual add around them in the residual blocks; the whole Wan
# decoder gave 1.80 s after ~88 s): worth it only for large batches. On CPU the decode defaults to fp32.
# --vae-chunk (Wan) defaults to auto: on CUDA videoblade's decode loop, all latent frames per decoder call,
# channels-last, upsamplers as phase convolutions (e2e_h200.json at b3cd8f9: bf16 1.82 -> 1.23 s,
# compiled 1.30 -> 0.73 s, for 25-42 GiB of decode memory instead of 4.4), halved while out of memory;
# diffusers' one frame per call on the CPU.
VAE_DTYPE_DEFAULT = "bf16"
REPORT_VERSION = 1


class InferenceError(ValueError):
    """A request that cannot run; raised before any weights load; the message says what to change."""


# ---------------------------------------------------------------------------- CLI
def build_parser(prog: str = "videoblade generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Generate videos with a distilled Video-BLADE student (8 steps, sparse attention) "
                    "or the dense 50-step CFG baseline; one mp4 per prompt plus a JSON report.",
    )
    p.add_argument("--model", required=True, help="local diffusers model folder (Wan2.1 or CogVideoX)")
    p.add_argument("--lora", default=None,
                   help="student LoRA: pytorch_lora_weights.safetensors (diffusers) or the original-Wan/ComfyUI "
                        "export, or a folder holding one")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--no-fuse-lora", dest="fuse_lora", action="store_false",
                   help="keep the LoRA as separate adapter layers (default: merged into the base weights once "
                        "after loading, so sampling runs no extra LoRA matmuls)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="expected LoRA rank; the run stops before loading if the file's rank differs")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    g.add_argument("--prompt-file", default=None, help="text file, one prompt per line (blank lines and # skipped)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for CFG (guidance > 1); default empty")
    p.add_argument("--height", type=int, default=None, help="default: the family's (Wan 480, CogVideoX 480)")
    p.add_argument("--width", type=int, default=None, help="default: the family's (Wan 832, CogVideoX 720)")
    p.add_argument("--frames", type=int, default=None, help="default: the family's (Wan 81, CogVideoX 49); 4k+1")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the k_step recorded in the LoRA, else 8; --baseline: 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale; 1 = no unconditional pass (default 1.0; --baseline: the family's, Wan 5.0, "
                        "CogVideoX 3.5)")
    p.add_argument("--sampler", choices=("tdm", "unipc"), default=None,
                   help="tdm: the eta-stochastic sampler the student was distilled with (default); unipc: "
                        "diffusers' UniPC (with flow shift for Wan; the --baseline default)")
    p.add_argument("--eta", type=float, default=None,
                   help="tdm sampler stochasticity (default: the eta recorded in the LoRA, else 0.9)")
    p.add_argument("--flow-shift", type=float, default=None, help="UniPC flow shift (default: the model folder's)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--sparse", dest="sparse", action="store_true", default=None,
                    help="adaptive sparse attention in the transformer (default when --lora is given)")
    sp.add_argument("--dense", dest="sparse", action="store_false", help="dense attention everywhere")
    p.add_argument("--asa-config", default=None,
                   help="YAML with ASA settings (either top-level ASA keys or under 'asa:'); default: "
                        "ASAConfig defaults, or the ones recorded in the LoRA's metadata")
    p.add_argument("--baseline", action="store_true",
                   help="the teacher preset: no LoRA, 50 steps, the family's CFG with the negative prompt, "
                        "dense attention, UniPC")
    p.add_argument("--seed", type=int, default=0, help="video k of every prompt uses seed + k")
    p.add_argument("--num-videos-per-prompt", type=int, default=1, help="videos per prompt (VBench uses 5)")
    p.add_argument("--out", default=None, help="output folder (videos + inference.json; default runs/inference)")
    p.add_argument("--eval-dir", default=None,
                   help="write <dir>/<family>_videos/<method>/<prompt>-<k>.mp4 (VBench layout) instead of --out")
    p.add_argument("--method", default=None,
                   help="method folder name under --eval-dir, any name of letters, digits, '.', '_', '-' (default: "
                        "baseline with --baseline, blade = LoRA + sparse, tdm = LoRA + dense, asa = sparse without "
                        "LoRA; a dense run without LoRA and without --baseline must name itself)")
    p.add_argument("--vae-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help=f"VAE decode dtype (default: {VAE_DTYPE_DEFAULT} on CUDA, chosen by benchmarks/e2e.py; "
                        "fp32 on CPU)")
    p.add_argument("--vae-tiling", action="store_true", help="tiled VAE decode (less memory, slower)")
    p.add_argument("--vae-chunk", default="auto",
                   help="Wan: latent frames per VAE decoder call, an integer or 'all' (default auto: all on CUDA, "
                        "halved while out of memory; 1, diffusers' own loop, on CPU)")
    p.add_argument("--vae-compile", action="store_true", help="torch.compile the VAE decoder (Wan: its RMS norms, fused; pays off over many videos)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (regional; the first step pays a one-time compile)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="transformer/text-encoder dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--fps", type=int, default=None, help="mp4 frame rate (default: Wan 16, CogVideoX 8)")
    p.add_argument("--max-text-length", type=int, default=None, help="prompt tokens (default: the family's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


# ---------------------------------------------------------------------------- names
_BAD = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".mkv", ".webm", ".avi")


def sanitize_prompt(prompt: str, max_bytes: int = 240) -> str:
    """A prompt as a file-name stem: path separators and characters Windows or shells reject removed,
    whitespace collapsed, trimmed of spaces and leading dots (no hidden files), cut to `max_bytes` of
    UTF-8. Anything else is kept as written, a final '.' included: VBench's standard mode looks for
    exactly '<prompt>-<k>.mp4' (its prompts include 'Fireworks.' and ones of 210 bytes), and the stem
    is always followed by '-<k>.mp4'. 240 bytes leave room for '<NNNN>-' and '-<k>.mp4' in the 255 bytes
    of a file name."""
    s = _BAD.sub("", re.sub(r"\s+", " ", prompt))
    s = re.sub(r" +", " ", s).strip().lstrip(".").strip()
    b = s.encode("utf-8")[:max_bytes]
    s = b.decode("utf-8", errors="ignore").rstrip()
    return s or "prompt"


def video_filename(prompt: str, index: int) -> str:
    """VBench-style name: '<prompt>-<index>.mp4' with the prompt sanitised."""
    return f"{sanitize_prompt(prompt)}-{int(index)}.mp4"


# ---------------------------------------------------------------------------- LoRA header
@dataclass
class LoRAInfo:
    path: Path
    layout: str  # "diffusers" | "wan_original" | "peft" (videoblade.io.lora.lora_layout)
    rank: int
    alpha: float | None
    family: str | None  # from metadata (None when the file does not say)
    metadata: dict
    asa: dict | None  # ASA config recorded at training time (metadata), if any
    num_tensors: int
    target_modules: list[str]
    k_step: int | None = None  # the student's step count and sampler eta recorded at training time, if any
    eta: float | None = None
    trained_dense: bool = False  # videoblade's record says the student was trained without ASA


def _resolve_lora_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        cands = [p / "pytorch_lora_weights.safetensors"] + sorted(p.glob("*.safetensors"))
        for c in cands:
            if c.is_file():
                return c
        raise InferenceError(f"--lora {p}: the folder holds no .safetensors file "
                             "(expected pytorch_lora_weights.safetensors)")
    if not p.is_file():
        raise InferenceError(f"--lora {p} does not exist: pass the student's pytorch_lora_weights.safetensors "
                             "(or its folder)")
    if p.suffix != ".safetensors":
        raise InferenceError(f"--lora {p}: only .safetensors LoRA files are read (no pickles)")
    return p


def _json_or_none(s):
    if s is None:
        return None
    if isinstance(s, dict):
        return s
    try:
        v = json.loads(s)
        return v if isinstance(v, dict) else None
    except (TypeError, ValueError):
        return None


_WAN_ORIG_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def _module_of_key(key: str) -> tuple[str, str] | None:
    """(diffusers module name, 'A' | 'B') of a LoRA tensor key in either layout, or None."""
    for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_down.weight", "A"),
                          (".lora_up.weight", "B"), (".lora_A.default.weight", "A"), (".lora_B.default.weight", "B")):
        if key.endswith(suffix):
            mod, part = key[: -len(suffix)], which
            break
    else:
        return None
    for prefix in ("transformer.", "diffusion_model.", "base_model.model.", "model."):
        if mod.startswith(prefix):
            mod = mod[len(prefix):]
            break
    m = re.match(r"^(blocks\.\d+)\.(.+)$", mod)
    if m and m.group(2) in _WAN_ORIG_TO_DIFFUSERS:
        mod = f"{m.group(1)}.{_WAN_ORIG_TO_DIFFUSERS[m.group(2)]}"
    return mod, part


def inspect_lora(path: str | Path) -> LoRAInfo:
    """Read a LoRA's safetensors header (metadata + shapes; no tensor data)."""
    from safetensors import safe_open

    from videoblade.io.lora import LoRAError, lora_layout

    f = _resolve_lora_file(path)
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = dict(st.metadata() or {})
            shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception as e:  # noqa: BLE001 - a broken file is a request problem
        raise InferenceError(f"--lora {f} is not a readable safetensors file ({e})") from None
    if not shapes:
        raise InferenceError(f"--lora {f} holds no tensors")
    keys = list(shapes)
    try:  # the layout rule read_lora applies when the weights load, checked here on the header alone
        layout = lora_layout(keys, f"--lora {f}")[0]
    except LoRAError as e:
        raise InferenceError(str(e)) from None
    ranks = {}
    mods = set()
    for k, shp in shapes.items():
        mp = _module_of_key(k)
        if mp is None:
            continue
        mods.add(mp[0])
        if mp[1] == "A" and len(shp) == 2:
            ranks[k] = shp[0]
    if not ranks:
        raise InferenceError(f"--lora {f}: no lora_A/lora_down tensors found; is it a LoRA file?")
    rank_set = sorted(set(ranks.values()))
    # videoblade.io.lora records {"family", "rank", "lora_alpha", "asa", ...} as JSON under "videoblade" and
    # diffusers' adapter config ("transformer.r", "transformer.lora_alpha") under "lora_adapter_metadata"
    record = _json_or_none(meta.get("videoblade")) or {}
    adapter_meta = _json_or_none(meta.get("lora_adapter_metadata")) or {}
    meta_rank = record.get("rank", adapter_meta.get("transformer.r"))
    alpha = record.get("lora_alpha", adapter_meta.get("transformer.lora_alpha"))
    if alpha is None:
        alpha_keys = [k for k in keys if k.endswith(".alpha")]
        if alpha_keys:
            with safe_open(str(f), framework="pt") as st:
                alpha = float(st.get_tensor(alpha_keys[0]))
    if len(rank_set) != 1:
        raise InferenceError(f"--lora {f}: tensors have mixed ranks {rank_set}; the file is inconsistent, re-export it")
    rank = int(rank_set[0])
    if meta_rank is not None and int(meta_rank) != rank:
        raise InferenceError(f"--lora {f}: its metadata says rank {int(meta_rank)} but the tensors have rank "
                             f"{rank}; the file is inconsistent, re-export it")
    family = record.get("family")
    asa = record.get("asa") if isinstance(record.get("asa"), dict) else None
    k_step, eta = record.get("k_step"), record.get("eta")
    return LoRAInfo(path=f, layout=layout, rank=rank, alpha=float(alpha) if alpha is not None else None,
                    family=str(family).lower().replace("tiny-", "") if family else None, metadata=meta, asa=asa,
                    num_tensors=len(shapes), target_modules=sorted(mods),
                    k_step=int(k_step) if isinstance(k_step, (int, float)) and k_step >= 1 else None,
                    eta=float(eta) if isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0 else None,
                    trained_dense="asa" in record and record["asa"] is None)  # the trainer writes null when off


def _check_lora_against_model(lora: LoRAInfo, adapter, info, expected_rank: int | None) -> None:
    """Family, rank and per-module shapes of a LoRA against the model config (a meta-device
    transformer built from config.json: no weights are read or allocated)."""
    if lora.family is not None and lora.family != adapter.family:
        raise InferenceError(f"--lora {lora.path} was trained for a {lora.family} model, but --model "
                             f"{info.folder} is a {adapter.family} model: use the matching LoRA or model")
    if expected_rank is not None and expected_rank != lora.rank:
        raise InferenceError(f"--lora {lora.path} has rank {lora.rank}, but --lora-rank {expected_rank} was "
                             "expected: pass the LoRA of that rank (or drop --lora-rank)")
    import diffusers

    cls = getattr(diffusers, info.transformer_config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(info.transformer_config)
    modules = dict(model.named_modules())
    from safetensors import safe_open

    with safe_open(str(lora.path), framework="pt") as st:
        for k in st.keys():
            mp = _module_of_key(k)
            if mp is None:
                continue
            name, part = mp
            mod = modules.get(name)
            if mod is None or not hasattr(mod, "in_features"):
                fam = "cogvideox" if name.startswith("transformer_blocks.") else (
                    "wan" if name.startswith("blocks.") else None)
                hint = (f"it looks like a {fam} LoRA, but --model is a {adapter.family} model"
                        if fam and fam != adapter.family else "the LoRA does not belong to this model")
                raise InferenceError(f"--lora {lora.path}: module {name!r} does not exist in {info.folder}'s "
                                     f"transformer ({hint}): use the matching LoRA or model")
            shp = tuple(st.get_slice(k).get_shape())
            want = (lora.rank, mod.in_features) if part == "A" else (mod.out_features, lora.rank)
            if shp != want:
                raise InferenceError(f"--lora {lora.path}: {k} has shape {list(shp)} but {name} of {info.folder} "
                                     f"needs {list(want)} (a LoRA for a different model size): use the matching LoRA")


# ---------------------------------------------------------------------------- plan
@dataclass
class Job:
    prompt_index: int
    prompt: str
    sample_index: int
    seed: int
    path: Path


@dataclass
class Plan:
    adapter: Any
    family: str
    model: Path
    info: Any
    geometry: Any
    prompts: list[str]
    jobs: list[Job]
    lora: LoRAInfo | None
    asa: ASAConfig | None  # None: dense
    method: str
    steps: int
    guidance: float
    sampler: str
    eta: float
    flow_shift: float | None
    negative_prompt: str
    seed: int
    dtype: str
    vae_dtype: str
    vae_tiling: bool
    vae_chunk: str | int
    vae_compile: bool
    compile: bool
    device: str
    fps: int
    text_max_length: int
    lora_scale: float
    out_dir: Path
    report_path: Path
    fuse_lora: bool = True
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict:
        """The exact settings of the run, as recorded in the JSON report."""
        g = self.geometry
        return {
            "model": str(self.model), "family": self.family, "method": self.method,
            "lora": None if self.lora is None else {
                "path": str(self.lora.path), "layout": self.lora.layout, "rank": self.lora.rank,
                "alpha": self.lora.alpha, "family": self.lora.family, "scale": self.lora_scale,
                "fused": self.fuse_lora},
            "height": g.height, "width": g.width, "frames": g.frames,
            "latent_shape": list(g.latent_shape), "token_grid": list(g.token_grid),
            "text_tokens_in_self_attention": g.text_tokens,
            "steps": self.steps, "guidance": self.guidance, "sampler": self.sampler,
            "eta": self.eta if self.sampler == "tdm" else None,
            "flow_shift": self.flow_shift if self.sampler == "unipc" else None,
            "negative_prompt": self.negative_prompt if self.guidance != 1.0 else None,
            "attention": "sparse" if self.asa is not None else "dense",
            "asa": to_dict(self.asa) if self.asa is not None else None,
            "seed": self.seed, "num_videos_per_prompt": max(j.sample_index for j in self.jobs) + 1,
            "dtype": self.dtype, "vae_dtype": self.vae_dtype, "vae_tiling": self.vae_tiling,
            "vae_chunk": self.vae_chunk, "vae_compile": self.vae_compile, "compile": self.compile, "device": self.device, "fps": self.fps,
            "text_max_length": self.text_max_length, "out_dir": str(self.out_dir),
        }


def _read_prompts(args) -> list[str]:
    if args.prompt_file is not None:
        # the reader utils/process_prompts.py uses: the same file gives the same prompts (BOM dropped,
        # split on line ends only, blank and # lines skipped)
        from videoblade.data import PromptStoreError, read_prompt_file

        try:
            return read_prompt_file(args.prompt_file)
        except PromptStoreError as e:
            raise InferenceError(f"--prompt-file: {e}") from None
    prompts = [p.strip() for p in (args.prompt or [])]
    if not prompts or any(not p for p in prompts):
        raise InferenceError("--prompt must be non-empty text")
    return prompts


def _check_writable(folder: Path, what: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise InferenceError(f"{what} {folder} exists and is not a folder: choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InferenceError(f"{what} {folder} cannot be written ({e.strerror or e}): choose a writable path") from None


def _load_asa_yaml(path: str) -> ASAConfig:
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"--asa-config {p} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p)) or {}
    except Exception as e:  # noqa: BLE001
        raise InferenceError(f"--asa-config {p} is not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise InferenceError(f"--asa-config {p} must be a mapping of ASA keys")
    section = raw.get("asa", raw)
    if section is None:  # `asa:` with nothing under it: the defaults
        section = {}
    if not isinstance(section, dict):
        raise InferenceError(f"--asa-config {p}: 'asa:' must be a mapping of ASA keys, got {section!r}")
    return _asa_from_dict(section, f"--asa-config {p}")


def _asa_from_dict(d: dict, where: str) -> ASAConfig:
    names = {f.name for f in dataclasses.fields(ASAConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InferenceError(f"{where}: unknown ASA keys {unknown}; known: {sorted(names)}")
    overrides = [f"asa.{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}" for k, v in d.items()]
    try:
        return load_config(overrides=overrides).asa
    except ConfigError as e:
        raise InferenceError(f"{where}: {e}") from None


def _check_unipc_steps(schedule, flow_shift: float | None, steps: int) -> None:
    """UniPC's timesteps are integers: past some step count they repeat (Wan's shifted flow sigmas
    crowd near t = T), and diffusers' UniPC then fails on the first repeat. Refuse such a count,
    naming a smaller one that gives distinct timesteps (configs only; the scheduler holds no weights)."""
    from videoblade.sampling import unipc_scheduler

    def distinct(n: int) -> bool:
        sch = unipc_scheduler(schedule, flow_shift=flow_shift)
        try:
            sch.set_timesteps(n)
        except ValueError:
            return False
        ts = sch.timesteps.tolist()
        return len(set(ts)) == len(ts)

    if distinct(steps):
        return
    lo, hi = 1, steps  # distinct(lo), not distinct(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if distinct(mid) else (lo, mid)
    raise InferenceError(f"--steps {steps} with --sampler unipc repeats timesteps on this model's schedule (UniPC "
                         f"needs distinct ones): use fewer, e.g. {lo}")


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Resolve and validate a request without loading any weights (configs and file headers only)."""
    from videoblade.models import ModelRequestError, device_problem, get_adapter

    model = Path(args.model)
    try:
        adapter = get_adapter(model)
        info = adapter.inspect(model)
        adapter.check_components(model, ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"))
        geometry = adapter.geometry(info, args.height, args.width, args.frames)
    except ModelRequestError as e:
        raise InferenceError(f"--model: {e}") from None
    family = adapter.family
    notes: list[str] = []

    # presets
    baseline = bool(args.baseline)
    lora_arg = args.lora
    if baseline and lora_arg:
        notes.append("--baseline ignores --lora (the baseline is the teacher)")
        lora_arg = None
    guidance = args.guidance if args.guidance is not None else (float(adapter.default_cfg) if baseline else 1.0)
    sampler = args.sampler or ("unipc" if baseline else "tdm")
    if args.sparse is None:
        sparse = (not baseline) and lora_arg is not None
    else:
        sparse = bool(args.sparse)
        if baseline and sparse:
            raise InferenceError("--baseline is dense by definition: drop --sparse (or drop --baseline)")
    if not math.isfinite(guidance) or guidance < 1.0:
        raise InferenceError(f"--guidance must be >= 1 (1 = no CFG pass), got {guidance}")
    if args.flow_shift is not None and sampler != "unipc":
        raise InferenceError("--flow-shift applies to --sampler unipc only")
    try:
        model_schedule = adapter.schedule(model)  # the scheduler config only (it knows FlowMatch* classes too)
    except ValueError as e:
        raise InferenceError(f"--model: {e}") from None
    schedule_kind = model_schedule.kind
    if args.flow_shift is not None and schedule_kind != "flow":
        raise InferenceError("--flow-shift applies to flow-matching models (Wan) only")
    if args.flow_shift is not None and not (math.isfinite(args.flow_shift) and args.flow_shift > 0):
        raise InferenceError(f"--flow-shift must be a positive number, got {args.flow_shift:g}")
    if args.eta is not None and sampler != "tdm":
        raise InferenceError("--eta applies to --sampler tdm only (UniPC takes no eta): drop --eta")
    if args.negative_prompt is not None and guidance == 1.0:
        raise InferenceError("--negative-prompt needs --guidance > 1: at guidance 1 there is no unconditional pass "
                             "to use it")
    negative_prompt = args.negative_prompt if args.negative_prompt is not None else ""
    if not math.isfinite(args.lora_scale):
        raise InferenceError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if args.num_videos_per_prompt < 1:
        raise InferenceError("--num-videos-per-prompt must be >= 1")

    # LoRA header against the model config
    lora = None
    if lora_arg:
        lora = inspect_lora(lora_arg)
        _check_lora_against_model(lora, adapter, info, args.lora_rank)
    else:
        for flag, given in (("--lora-rank", args.lora_rank is not None), ("--lora-scale", args.lora_scale != 1.0)):
            if given and baseline:
                notes.append(f"--baseline ignores {flag} (the baseline is the teacher, without a LoRA)")
            elif given:
                raise InferenceError(f"{flag} needs --lora")

    # steps and eta: the flags, else what the student was trained for (its LoRA's record), else 8 / 0.9
    steps, eta = args.steps, args.eta
    if steps is None:
        steps = BASELINE_STEPS if baseline else (lora.k_step if lora is not None and lora.k_step else 8)
        if lora is not None and lora.k_step and not baseline:
            notes.append(f"--steps {steps}: the k_step the LoRA was trained with (its metadata)")
    if eta is None:
        eta = lora.eta if lora is not None and lora.eta is not None else 0.9
        if lora is not None and lora.eta is not None and sampler == "tdm":
            notes.append(f"--eta {eta:g}: the eta the LoRA was trained with (its metadata)")
    eta = float(eta)
    if steps < 1:
        raise InferenceError(f"--steps must be >= 1, got {steps}")
    n_train = model_schedule.num_train_timesteps
    if sampler == "tdm" and steps > n_train:
        raise InferenceError(f"--steps {steps} is more than the model's {n_train} training timesteps: "
                             f"use at most {n_train}")
    n_videos = args.num_videos_per_prompt
    if not -(2**63) <= args.seed <= 2**64 - n_videos:  # torch.Generator.manual_seed's range, for every seed + k
        raise InferenceError(f"--seed {args.seed} is out of range: seeds are 64-bit, use one in "
                             f"[0, {2**64 - n_videos}]")
    if not 0.0 <= eta <= 1.0:
        raise InferenceError(f"--eta must be in [0, 1], got {eta}")

    # ASA: sparse by default with a LoRA, unless the LoRA was trained dense or the ASA file turns it off
    asa_file = _load_asa_yaml(args.asa_config) if (sparse and args.asa_config) else None
    if args.sparse is None and sparse and asa_file is not None and not asa_file.enabled:
        sparse = False
        notes.append(f"--asa-config {args.asa_config} says enabled: false: dense attention (--sparse turns it on)")
    elif args.sparse is None and sparse and asa_file is None and lora is not None and lora.trained_dense:
        sparse = False
        notes.append("the LoRA was trained with dense attention (its metadata): dense, as trained "
                     "(--sparse for adaptive sparse attention)")
    asa = None
    if sparse:
        if asa_file is not None:
            asa = asa_file
        elif lora is not None and lora.asa:
            known = {f.name for f in dataclasses.fields(ASAConfig)}
            asa = _asa_from_dict({k: v for k, v in lora.asa.items() if k in known}, f"--lora {lora.path} metadata")
            notes.append("ASA settings read from the LoRA's metadata (the ones it was trained with)")
        else:
            asa = ASAConfig()
        asa = with_family_pool(asa, family)  # pool unset: the family's (SPEC 1.5), as the install would
        asa.enabled = True
    elif args.asa_config and asa_file is None:
        notes.append("--asa-config ignored: the run is dense")

    prompts = _read_prompts(args)

    # method and outputs
    if args.method is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.method):
        raise InferenceError(f"--method {args.method!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    method = args.method or ("baseline" if baseline else
                             "blade" if (lora is not None and sparse) else
                             "tdm" if lora is not None else
                             "asa" if sparse else None)
    if method is None:  # the base model with other settings than the --baseline preset: not the baseline
        if args.eval_dir:
            raise InferenceError("this run is neither the --baseline preset nor a student (no --lora, dense): "
                                 "name its --eval-dir folder with --method, or add --baseline")
        method = "teacher"
    if args.eval_dir:
        if args.out is not None:
            raise InferenceError("--out and --eval-dir both say where the videos go: pass one of them (--eval-dir "
                                 "writes <dir>/<family>_videos/<method>/)")
        root = Path(args.eval_dir) / f"{family}_videos"
        out_dir = root / method
        report_path = root / f"{method}.json"
        by_stem: dict[str, str] = {}
        uniq = []
        for pr in prompts:
            stem = sanitize_prompt(pr)
            if stem in by_stem:
                if by_stem[stem] != pr:
                    raise InferenceError(
                        f"--eval-dir names each video after its prompt: {by_stem[stem]!r} and {pr!r} both become "
                        f"'{stem}-<k>.mp4'; reword one of them (--out numbers the files instead)")
                notes.append(f"duplicate prompt skipped in eval layout: {pr!r}")
                continue
            by_stem[stem] = pr
            uniq.append(pr)
        prompts = uniq
        _check_writable(out_dir, "--eval-dir")
    else:
        out_dir = Path(args.out if args.out is not None else "runs/inference")
        if out_dir.suffix.lower() in VIDEO_SUFFIXES and not out_dir.is_dir():
            raise InferenceError(f"--out names the output folder (the videos and inference.json go inside it), but "
                                 f"{out_dir} looks like a video file name: pass a folder, e.g. --out "
                                 f"{out_dir.with_suffix('')}")
        report_path = out_dir / "inference.json"
        _check_writable(out_dir, "--out")
    if report_path.is_dir():
        raise InferenceError(f"report {report_path} is a folder: move it or choose another output folder")
    if report_path.exists() and not os.access(report_path, os.W_OK):
        raise InferenceError(f"report {report_path} exists and cannot be overwritten: choose another --out")

    jobs = []
    for i, pr in enumerate(prompts):
        for k in range(args.num_videos_per_prompt):
            name = video_filename(pr, k) if args.eval_dir else f"{i:04d}-{video_filename(pr, k)}"
            jobs.append(Job(i, pr, k, int(args.seed) + k, out_dir / name))
    if args.eval_dir:  # a scorer reads every video of the method folder, this run's or not
        ours = {j.path.name for j in jobs}
        stale = sorted(q.name for q in out_dir.iterdir()
                       if q.suffix.lower() in VIDEO_SUFFIXES and q.name not in ours and q.is_file())
        if stale:
            notes.append(f"{out_dir} already holds {len(stale)} video(s) this run does not write (e.g. {stale[0]!r}), "
                         "from an earlier run: a VBench-style scorer reads every video in the folder; remove them "
                         "or name this run's folder with --method")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    if problem:
        raise InferenceError(f"--device {device!r}: {problem}")
    on_cuda = device.startswith("cuda")
    dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    vae_dtype = args.vae_dtype or (VAE_DTYPE_DEFAULT if on_cuda else "fp32")
    fps = args.fps if args.fps is not None else adapter.default_fps
    if fps <= 0:
        raise InferenceError(f"--fps must be positive, got {fps}")
    try:
        vae_chunk = adapter.check_decode_chunk(args.vae_chunk)
    except ModelRequestError as e:
        raise InferenceError(str(e).replace("decode chunk", "--vae-chunk")) from None
    if args.vae_tiling and vae_chunk != "auto":
        raise InferenceError("--vae-chunk does not apply with --vae-tiling (the tiled decode runs diffusers' own "
                             "tile loop): drop one of them")
    text_max_length = args.max_text_length if args.max_text_length is not None else adapter.text_max_length(info)
    if text_max_length < 1:
        raise InferenceError(f"--max-text-length must be >= 1, got {text_max_length}")
    if family == "cogvideox" and text_max_length != geometry.text_tokens:
        raise InferenceError(f"--max-text-length must be {geometry.text_tokens} for this CogVideoX model "
                             "(its max_text_seq_length)")
    flow_shift = args.flow_shift
    if sampler == "unipc" and schedule_kind == "flow" and flow_shift is None:
        flow_shift = float(model_schedule.shift)  # the folder's: recorded as used, not as null
    if sampler == "unipc":
        _check_unipc_steps(model_schedule, flow_shift, int(steps))
    return Plan(adapter=adapter, family=family, model=model, info=info, geometry=geometry, prompts=prompts,
                jobs=jobs, lora=lora, asa=asa, method=method, steps=int(steps), guidance=float(guidance),
                sampler=sampler, eta=eta, flow_shift=flow_shift, negative_prompt=negative_prompt,
                seed=int(args.seed), dtype=dtype, vae_dtype=vae_dtype, vae_tiling=bool(args.vae_tiling),
                vae_chunk=vae_chunk, vae_compile=bool(args.vae_compile), compile=bool(args.compile), device=device, fps=int(fps),
                text_max_length=int(text_max_length), lora_scale=float(args.lora_scale), out_dir=out_dir,
                report_path=report_path, fuse_lora=bool(args.fuse_lora), progress=bool(args.progress), notes=notes)


# ---------------------------------------------------------------------------- load
@dataclass
class Components:
    transformer: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    schedule: Any
    asa: Any  # AdaptiveSparseAttention or None
    load_s: float


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _apply_lora(transformer, plan: Plan):
    """Load the plan's LoRA into the transformer at its scale; then, unless ``--no-fuse-lora``,
    merge it into the base weights and drop the adapter layers. Unmerged, every adapted linear
    layer runs two more (rank-r) matmuls plus a scale-and-add pass over its full-size output on
    every step; merged, a sampling step costs what the base model's does."""
    from videoblade.io import lora as lora_io

    info = lora_io.load_lora_into(transformer, plan.lora.path, family=plan.family, rank=plan.lora.rank,
                                  scale=plan.lora_scale if plan.lora_scale != 1.0 else None)
    if plan.fuse_lora:
        merge_lora(transformer)
    return info


def merge_lora(transformer) -> None:
    """Merge the loaded peft LoRA into the base weights (W += scale * B @ A, in the weights' dtype)
    and drop the adapter layers: the transformer is left with plain linear layers."""
    transformer.fuse_lora()
    transformer.unload_lora()


def configure_vae(vae, tiling: bool = False, compile: bool = False, adapter=None, chunk="auto",
                  cudnn_benchmark: bool | None = None):
    """Decode settings on a loaded VAE: tiling on/off, the decoder compiled the family's way
    (`ModelAdapter.compile_vae`: CogVideoX's decoder whole, Wan's RMS norms fused), latent frames
    per decoder call (`ModelAdapter.configure_decode_chunk`; Wan only, ignored while tiling), and
    cuDNN's convolution autotuner during the decode (`torch.backends.cudnn.benchmark`, set for the
    decode only; None leaves the global setting alone)."""
    from videoblade.models.base import CUDNN_BENCHMARK_ATTR

    setattr(vae, CUDNN_BENCHMARK_ATTR, cudnn_benchmark)
    if tiling:
        vae.enable_tiling()
    elif hasattr(vae, "disable_tiling"):
        vae.disable_tiling()
    from videoblade.models import parse_decode_chunk

    if adapter is not None:
        adapter.configure_decode_chunk(vae, chunk)
    elif parse_decode_chunk(chunk) != "auto":
        raise ValueError("a decode chunk needs the family's adapter (configure_vae(..., adapter=...))")
    if compile:
        if adapter is None:
            raise ValueError("compiling the VAE needs the family's adapter (configure_vae(..., adapter=...))")
        adapter.compile_vae(vae)
    return vae


def load_components(plan: Plan) -> Components:
    """Load weights (after `plan_from_args` validated everything), apply the LoRA, install ASA."""
    t0 = time.perf_counter()
    loaded = plan.adapter.load(plan.model, dtype=plan.dtype, device=plan.device,
                               components=("transformer", "vae", "text_encoder", "tokenizer"),
                               vae_dtype=plan.vae_dtype)
    transformer = loaded.transformer
    if plan.lora is not None:
        _apply_lora(transformer, plan)
        transformer.to(plan.device).eval().requires_grad_(False)
    asa = None
    if plan.asa is not None:
        from videoblade.attention import set_adaptive_sparse_attention

        asa = set_adaptive_sparse_attention(transformer, plan.asa)
    if plan.compile:
        plan.adapter.compile_blocks(transformer)
    configure_vae(loaded.vae, plan.vae_tiling, plan.vae_compile, plan.adapter, plan.vae_chunk)
    _sync(plan.device)
    return Components(transformer=transformer, vae=loaded.vae, text_encoder=loaded.text_encoder,
                      tokenizer=loaded.tokenizer, schedule=loaded.schedule, asa=asa,
                      load_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------- sampling
def denoise(plan: Plan, comps: Components, embeds: torch.Tensor, negative: torch.Tensor | None,
            generator: torch.Generator, progress: bool = True) -> torch.Tensor:
    """Latents [1, C, F, H, W] for one prompt with the plan's sampler."""
    from videoblade.sampling import randn, sample, sample_unipc

    latents = randn((embeds.shape[0], *plan.geometry.latent_shape), generator, embeds.device)
    if plan.sampler == "tdm":
        return sample(plan.adapter, comps.transformer, comps.schedule, embeds, plan.geometry, steps=plan.steps,
                      eta=plan.eta, generator=generator, guidance=plan.guidance, negative_embeds=negative,
                      latents=latents, progress=progress)
    return sample_unipc(plan.adapter, comps.transformer, comps.schedule, embeds, plan.geometry, steps=plan.steps,
                        guidance=plan.guidance, negative_embeds=negative, latents=latents,
                        flow_shift=plan.flow_shift, progress=progress)


def _write_video(path: Path, frames: torch.Tensor, fps: int) -> None:
    from videoblade.io.video import write_video

    write_video(path, frames, fps=fps)


def _environment(device: str) -> dict:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def generate(plan: Plan, comps: Components | None = None) -> dict:
    """Run every job; write the videos and the JSON report; return the report."""
    from tqdm.auto import tqdm

    if comps is None:
        comps = load_components(plan)
    dev = plan.device
    report: dict = {
        "version": REPORT_VERSION,
        "settings": plan.settings(),
        "environment": _environment(dev),
        "notes": list(plan.notes),
        "timings": {"load_s": comps.load_s},
        "prompts": [],
    }
    te_dtype = next(comps.text_encoder.parameters()).dtype

    def encode(texts):
        return plan.adapter.encode_prompts(comps.text_encoder, comps.tokenizer, texts, max_length=plan.text_max_length,
                                           device=dev, dtype=te_dtype)

    negative = None
    if plan.guidance != 1.0:
        _sync(dev)
        t0 = time.perf_counter()
        negative = encode([plan.negative_prompt])
        _sync(dev)
        report["timings"]["negative_prompt_encoding_s"] = time.perf_counter() - t0

    by_prompt: dict[int, list[Job]] = {}
    for j in plan.jobs:
        by_prompt.setdefault(j.prompt_index, []).append(j)
    n_failed = 0
    bar = tqdm(total=len(plan.jobs), desc="videos", disable=not plan.progress)
    for pi, jobs in by_prompt.items():
        entry: dict = {"index": pi, "prompt": jobs[0].prompt, "text_encoding_s": None, "videos": []}
        report["prompts"].append(entry)
        try:
            _sync(dev)
            t0 = time.perf_counter()
            embeds = encode([jobs[0].prompt])
            _sync(dev)
            entry["text_encoding_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one prompt's failure must not stop the rest
            entry["error"] = _error_text(e)
            entry["videos"] = [{"sample_index": j.sample_index, "seed": j.seed, "path": str(j.path),
                                "error": "prompt encoding failed"} for j in jobs]
            n_failed += len(jobs)
            bar.update(len(jobs))
            print(f"[videoblade] prompt {pi} failed during text encoding: {entry['error']}", file=sys.stderr)
            continue
        for job in jobs:
            vid: dict = {"sample_index": job.sample_index, "seed": job.seed, "path": str(job.path)}
            entry["videos"].append(vid)
            try:
                gen = torch.Generator(device="cpu").manual_seed(job.seed)
                if comps.asa is not None:
                    comps.asa.reset_stats()
                _sync(dev)
                t0 = time.perf_counter()
                latents = denoise(plan, comps, embeds, negative, gen, progress=plan.progress)
                _sync(dev)
                t1 = time.perf_counter()
                if not bool(torch.isfinite(latents).all()):  # would decode to a flat video that passes for one
                    raise RuntimeError("the sampler produced non-finite latents (NaN/inf); with --dtype fp16 "
                                       "try bf16 or fp32")
                frames = plan.adapter.decode(comps.vae, latents)
                _sync(dev)
                t2 = time.perf_counter()
                _write_video(job.path, frames[0], plan.fps)
                t3 = time.perf_counter()
                vid.update(denoising_s=t1 - t0, decoding_s=t2 - t1, writing_s=t3 - t2,
                           decode_frames_per_call=plan.adapter.last_decode_chunk(comps.vae),
                           frames=int(frames.shape[1]), height=int(frames.shape[2]), width=int(frames.shape[3]))
                if comps.asa is not None:
                    st = comps.asa.density_stats(reset=True)
                    vid["density"] = st["mean"]
                    vid["density_per_layer"] = {str(k): v["mean"] for k, v in st["layers"].items()}
                else:
                    vid["density"] = 1.0
                if not all(math.isfinite(v) for v in (t1 - t0, t2 - t1)):
                    raise RuntimeError("non-finite timing")
            except Exception as e:  # noqa: BLE001
                vid["error"] = _error_text(e)
                n_failed += 1
                print(f"[videoblade] prompt {pi} video {job.sample_index} failed: {vid['error']}", file=sys.stderr)
            finally:
                bar.update(1)
        _write_report(plan, report, n_failed, complete=False)  # a killed run keeps what it made
    bar.close()
    _write_report(plan, report, n_failed, complete=True)
    return report


def _write_report(plan: Plan, report: dict, n_failed: int, complete: bool) -> None:
    """Fill the report's summary and write it atomically (temporary file, then rename). Called after
    every prompt (``summary.complete`` false) and once at the end."""
    ok = [v for e in report["prompts"] for v in e["videos"] if "error" not in v]
    te = [e["text_encoding_s"] for e in report["prompts"] if e["text_encoding_s"] is not None]
    report["summary"] = {
        "videos": len(plan.jobs), "ok": len(ok), "failed": n_failed, "complete": complete,
        "mean_text_encoding_s": sum(te) / len(te) if te else None,
        "mean_denoising_s": sum(v["denoising_s"] for v in ok) / len(ok) if ok else None,
        "mean_decoding_s": sum(v["decoding_s"] for v in ok) / len(ok) if ok else None,
        "mean_density": (sum(v["density"] for v in ok) / len(ok)) if ok else None,
        "first_video_includes_warmup": True,
    }
    path = plan.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2))


def _error_text(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


# ---------------------------------------------------------------------------- fast decode
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 videos (peak 255); inf when identical."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def compare_decode(adapter, vae_fp32, latents: torch.Tensor, settings: list[dict], repeats: int = 3,
                   timer=None) -> list[dict]:
    """Decode the same latents with several VAE settings; time each and compare with the fp32 decode.

    settings: dicts with keys dtype ("bf16" | "fp16" | "fp32"), tiling (bool), compile (bool) and
    optionally chunk (latent frames per decoder call, Wan; default "auto").
    `vae_fp32` is the fp32 VAE (copied per setting). Returns rows {setting, median_s, psnr_db,
    times_s}; the fp32 untiled uncompiled decode is the reference (always measured first; for Wan
    with diffusers' own one-frame-per-call loop).
    `timer(fn) -> seconds` defaults to a synchronised wall clock.
    """
    import copy

    from videoblade.models import parse_dtype

    device = next(vae_fp32.parameters()).device

    def default_timer(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    timer = timer or default_timer
    ref_setting = {"dtype": "fp32", "tiling": False, "compile": False}
    if adapter.supports_decode_chunk:
        ref_setting["chunk"] = 1
    settings = [ref_setting] + [s for s in settings if s != ref_setting]
    rows = []
    ref = None
    for s in settings:
        vae = vae_fp32 if s == ref_setting else copy.deepcopy(vae_fp32).to(parse_dtype(s["dtype"]))
        configure_vae(vae, s.get("tiling", False), s.get("compile", False), adapter, s.get("chunk", "auto"))
        times = []
        out = None
        for _ in range(repeats + (1 if s.get("compile") else 0)):
            dt, out = timer(lambda vae=vae: adapter.decode(vae, latents))
            times.append(dt)
        if s.get("compile"):
            times = times[1:]  # the first call compiles
        if ref is None:
            ref = out
        times_sorted = sorted(times)
        rows.append({"setting": dict(s), "median_s": times_sorted[len(times_sorted) // 2], "times_s": times,
                     "psnr_db": psnr(out, ref)})
        if vae is not vae_fp32:
            del vae
    return rows


def choose_decode(rows: list[dict], min_psnr: float = 40.0) -> dict:
    """The fastest setting whose PSNR against fp32 exceeds `min_psnr` (fp32 itself always qualifies)."""
    ok = [r for r in rows if r["psnr_db"] > min_psnr]
    return min(ok, key=lambda r: r["median_s"])


# ---------------------------------------------------------------------------- entry
def main(argv: list[str] | None = None, prog: str = "videoblade generate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        plan = plan_from_args(args)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"[videoblade] note: {note}", file=sys.stderr)
    report = generate(plan)
    s = report["summary"]
    print(f"[videoblade] {s['ok']}/{s['videos']} videos in {plan.out_dir}; report {plan.report_path}")
    if s["failed"]:
        print(f"[videoblade] {s['failed']} video(s) failed; see the report's 'error' fields", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

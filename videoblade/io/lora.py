"""LoRA files: save (diffusers layout), export (original-Wan / ComfyUI layout), detect and load.

* `save_lora(out_dir, state_dict, ...)` writes `pytorch_lora_weights.safetensors` with keys
  `transformer.<module>.lora_A.weight` / `.lora_B.weight`, exactly what
  `WanPipeline.load_lora_weights` / `CogVideoXPipeline.load_lora_weights` read. Its safetensors
  metadata carries diffusers' `lora_adapter_metadata` (rank, alpha, target modules, so a LoRA with
  alpha != rank loads with the right scale) and a `videoblade` JSON record: base family, k_step,
  eta, rank, alpha, the ASA config and anything else the trainer adds.
* `export_comfy(src, dst)` rewrites a Wan LoRA in the original-Wan / ComfyUI layout
  (`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `.alpha`), which
  diffusers' own converter (`_convert_non_diffusers_wan_lora_to_diffusers`) reads back to the same
  effective weights (bit-identical when alpha == rank). This is the file for ComfyUI (native
  `LoraLoader` and kijai's WanVideoWrapper): ComfyUI maps no diffusers-named Wan keys (each one is
  skipped with "lora key not loaded"), and the wrapper renames `attn1` to `cross_attn` and reads no
  `lora_adapter_metadata` alpha, so `pytorch_lora_weights.safetensors` would load wrong there.
* `read_lora(path)` detects the layout (diffusers / original-Wan / bare peft keys) and returns the
  tensors plus the recorded metadata; `check_lora(info, family=..., rank=...)` raises `LoRAError`
  with a clear message for a LoRA of another model family or rank; `load_lora_into(...)` loads a
  file into a transformer (as a named peft adapter) or a pipeline after those checks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from videoblade.io.atomic import save_file_atomic

__all__ = [
    "LORA_FILE",
    "COMFY_FILE",
    "LoRAError",
    "LoRAInfo",
    "transformer_lora_state_dict",
    "save_lora",
    "export_comfy",
    "read_lora",
    "check_lora",
    "load_lora_into",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
COMFY_FILE = "lora_comfy.safetensors"
_META_KEY = "videoblade"
_DIFFUSERS_META_KEY = "lora_adapter_metadata"


class LoRAError(ValueError):
    """A LoRA file that cannot be used as asked; the message says why and what to do."""


@dataclass
class LoRAInfo:
    path: Path
    layout: str  # "diffusers" | "wan_original" | "peft"
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # the videoblade record ({} for a foreign file)
    adapter_metadata: dict[str, Any] | None  # diffusers' lora_adapter_metadata (rank, alpha, targets)
    rank: int
    alpha: float | None
    family: str | None  # from the metadata, else guessed from the key layout


def transformer_lora_state_dict(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The peft LoRA tensors of one adapter, keys `<module>.lora_A.weight` (no adapter name), on CPU.

    Under DeepSpeed ZeRO-3 gather the parameters first (the trainer does).
    """
    from peft import get_peft_model_state_dict

    from videoblade.models import unwrap_model

    sd = get_peft_model_state_dict(unwrap_model(transformer), adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return x


def _rank_of(sd: dict[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in sd.items() if re.search(r"(lora_A|lora_down)\.weight$", k)}
    if not ranks:
        raise LoRAError("no lora_A / lora_down weights found: not a LoRA file")
    if len(ranks) != 1:
        raise LoRAError(f"mixed LoRA ranks {sorted(ranks)} in one file are not supported")
    return ranks.pop()


def save_lora(out_dir: str | Path, state_dict: dict[str, torch.Tensor], *, family: str, rank: int,
              alpha: float, target_modules: list[str] | None = None, k_step: int | None = None,
              eta: float | None = None, asa: Any = None, dtype: torch.dtype | None = None,
              extra: dict | None = None, filename: str = LORA_FILE) -> Path:
    """Write `state_dict` (peft keys, as `transformer_lora_state_dict` returns) as a diffusers LoRA file.

    `asa`: the ASA config the LoRA was trained with; None is recorded as null, which
    `videoblade generate` reads as "trained dense" (dense attention unless --sparse)."""
    if not state_dict:
        raise LoRAError("empty LoRA state dict")
    tensors = {}
    for k, v in state_dict.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        t = v.detach().to("cpu")
        tensors["transformer." + k] = (t.to(dtype) if dtype is not None else t).contiguous()
    found_rank = _rank_of(tensors)
    if found_rank != int(rank):
        raise LoRAError(f"state dict has rank {found_rank} but rank={rank} was given")
    targets = sorted(target_modules) if target_modules else sorted(
        {re.sub(r"\.lora_[AB]\.weight$", "", k).split(".", 1)[1] for k in tensors})
    adapter_meta = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": targets, "lora_dropout": 0.0,
                    "bias": "none", "use_dora": False}
    record = {"family": family.replace("tiny-", ""), "rank": int(rank), "lora_alpha": float(alpha),
              "k_step": k_step, "eta": eta, "asa": _jsonable(asa), "layout": "diffusers", **(extra or {})}
    # diffusers keys the adapter config by component ("transformer.r", ...), as save_lora_weights writes it
    packed = {f"transformer.{k}": v for k, v in adapter_meta.items()}
    meta = {"format": "pt", _DIFFUSERS_META_KEY: json.dumps(packed, sort_keys=True),
            _META_KEY: json.dumps(record, sort_keys=True, default=str)}
    path = Path(out_dir) / filename
    save_file_atomic(tensors, path, meta)
    return path


# ---------------------------------------------------------------------------- original-Wan / ComfyUI
_WAN_TO_ORIG = [
    (r"^blocks\.(\d+)\.attn1\.to_q$", r"blocks.\1.self_attn.q"),
    (r"^blocks\.(\d+)\.attn1\.to_k$", r"blocks.\1.self_attn.k"),
    (r"^blocks\.(\d+)\.attn1\.to_v$", r"blocks.\1.self_attn.v"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.to_q$", r"blocks.\1.cross_attn.q"),
    (r"^blocks\.(\d+)\.attn2\.to_k$", r"blocks.\1.cross_attn.k"),
    (r"^blocks\.(\d+)\.attn2\.to_v$", r"blocks.\1.cross_attn.v"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
]


def _to_original_module(module: str) -> str:
    for pat, rep in _WAN_TO_ORIG:
        if re.match(pat, module):
            return re.sub(pat, rep, module)
    raise LoRAError(
        f"module {module!r} has no original-Wan name: the ComfyUI export covers the blocks' attention "
        "(attn1/attn2 to_q/to_k/to_v/to_out.0) and feed-forward (ffn.net.0.proj, ffn.net.2) LoRAs"
    )


def export_comfy(src: str | Path, dst: str | Path | None = None) -> Path:
    """Write a Wan LoRA (a diffusers-layout file from `save_lora`) in the original-Wan / ComfyUI layout."""
    info = read_lora(src)
    if info.family not in (None, "wan"):
        raise LoRAError(f"{src} is a {info.family} LoRA: the original-Wan / ComfyUI layout exists for Wan only")
    if info.layout == "wan_original":
        raise LoRAError(f"{src} is already in the original-Wan layout")
    alpha = float(info.alpha if info.alpha is not None else info.rank)
    out: dict[str, torch.Tensor] = {}
    for k, v in info.state_dict.items():
        m = re.match(r"^(?:transformer\.)?(.+)\.(lora_A|lora_B)\.weight$", k)
        if not m:
            raise LoRAError(f"unexpected key {k!r} in {src}")
        orig = "diffusion_model." + _to_original_module(m.group(1))
        out[f"{orig}.{'lora_down' if m.group(2) == 'lora_A' else 'lora_up'}.weight"] = v
        out[f"{orig}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    record = dict(info.meta, layout="wan_original")
    dst = Path(dst) if dst is not None else info.path.with_name(COMFY_FILE)  # src may be the run folder
    save_file_atomic(out, dst, {"format": "pt", _META_KEY: json.dumps(record, sort_keys=True, default=str)})
    return dst


# ---------------------------------------------------------------------------- read / check / load
def lora_layout(keys, path: str | Path = "LoRA") -> tuple[str, str | None]:
    """(layout, family guessed from the key names or None) of a LoRA's tensor keys: "wan_original"
    (diffusion_model.*), "diffusers" (transformer.*) or "peft" (bare *.lora_A/B.weight); anything
    else raises LoRAError. The one rule for every reader (inference checks it on the header alone)."""
    keys = list(keys)
    if keys and all(k.startswith("diffusion_model.") for k in keys):
        return "wan_original", "wan"
    tensors_ok = keys and all(re.search(r"\.lora_[AB]\.weight$", k) for k in keys)
    if tensors_ok and all(k.startswith("transformer.") for k in keys):
        layout = "diffusers"
    elif tensors_ok:
        layout = "peft"
    else:
        raise LoRAError(f"{path}: unknown LoRA key layout (first keys: {keys[:3]}); expected diffusers "
                        "(transformer.*.lora_A.weight) or original-Wan / ComfyUI (diffusion_model.*.lora_down.weight)")
    if any(re.search(r"(^|\.)blocks\.\d+\.attn1\.", k) for k in keys):  # transformer.blocks.* or bare blocks.*
        return layout, "wan"
    if any("transformer_blocks." in k for k in keys):
        return layout, "cogvideox"
    return layout, None


def read_lora(path: str | Path) -> LoRAInfo:
    """Read a LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) and detect its layout."""
    p = Path(path)
    if p.is_dir():
        p = p / LORA_FILE
    if not p.is_file():
        raise LoRAError(f"LoRA file {p} not found")
    if p.suffix != ".safetensors":
        raise LoRAError(f"{p}: only .safetensors LoRA files are read (never pickles)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta_raw = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LoRAError(f"{p} is not a readable safetensors file ({e}): re-export or re-download it") from None
    meta = json.loads(meta_raw[_META_KEY]) if _META_KEY in meta_raw else {}
    adapter_meta = None
    if _DIFFUSERS_META_KEY in meta_raw:
        packed = json.loads(meta_raw[_DIFFUSERS_META_KEY])
        adapter_meta = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")} or None
    keys = list(sd)
    layout, fam_guess = lora_layout(keys, p)
    if layout == "wan_original":
        alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
        alpha = alphas.pop() if len(alphas) == 1 else None
    else:
        alpha = adapter_meta.get("lora_alpha") if adapter_meta else None
    family = meta.get("family") or fam_guess
    if alpha is None:
        alpha = meta.get("lora_alpha")
    return LoRAInfo(path=p, layout=layout, state_dict=sd, meta=meta, adapter_metadata=adapter_meta,
                    rank=_rank_of(sd), alpha=None if alpha is None else float(alpha), family=family)


def check_lora(info: LoRAInfo, family: str | None = None, rank: int | None = None) -> None:
    """Raise LoRAError when the file is for another model family or has another rank than expected."""
    if family is not None:
        fam = family.replace("tiny-", "")
        if info.family is not None and info.family != fam:
            raise LoRAError(f"{info.path} is a LoRA for a {info.family} model, not for {fam}: load it into a "
                            f"{info.family} model, or use a LoRA trained on this model")
    if rank is not None and info.rank != int(rank):
        raise LoRAError(f"{info.path} has LoRA rank {info.rank}, expected {rank}: set lora.rank={info.rank}")


def _diffusers_state_dict(info: LoRAInfo) -> dict[str, torch.Tensor]:
    """The file's tensors as diffusers-layout keys `transformer.<module>.lora_A.weight`."""
    if info.layout == "diffusers":
        return dict(info.state_dict)
    if info.layout == "peft":
        return {"transformer." + k: v for k, v in info.state_dict.items()}
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    # copies: the converter scales some tensors in place (`*=`), which would change info.state_dict
    conv = _convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in info.state_dict.items()})
    return {k if k.startswith("transformer.") else "transformer." + k: v for k, v in conv.items()}


def load_lora_into(target, path: str | Path, *, family: str | None = None, rank: int | None = None,
                   adapter_name: str = "default", scale: float | None = None) -> LoRAInfo:
    """Load a LoRA file (any supported layout) into a transformer or a diffusers pipeline.

    `target`: a pipeline (has `load_lora_weights`) or a diffusers transformer (has `load_lora_adapter`).
    `family` defaults to the target's family; the file's family and (if given) rank are checked first.
    Every layout loads with one scale whatever the target: diffusers' `lora_adapter_metadata` alpha, else
    the videoblade record's, and alpha = rank for the original-Wan layout (its converter folds alpha / rank
    into the tensors). The returned `LoRAInfo.state_dict` holds the file's tensors unchanged.
    """
    info = read_lora(path)
    transformer = getattr(target, "transformer", None) if hasattr(target, "load_lora_weights") else target
    if family is None and transformer is not None:
        from videoblade.attention import model_family

        try:
            family = model_family(transformer)
        except TypeError:
            family = None
    check_lora(info, family=family, rank=rank)
    sd = _diffusers_state_dict(info)
    adapter_meta = info.adapter_metadata
    if adapter_meta is None:  # the converter folded alpha / rank into the weights; other layouts keep the record's
        alpha = info.alpha if info.alpha is not None and info.layout != "wan_original" else info.rank
        adapter_meta = {"r": info.rank, "lora_alpha": float(alpha),
                        "target_modules": sorted({re.sub(r"\.lora_[AB]\.(weight|bias)$", "", k)[len("transformer."):]
                                                  for k in sd})}
    if (hasattr(target, "load_lora_weights") and transformer is not None
            and (info.layout == "peft" or (info.layout == "diffusers" and info.adapter_metadata is None))):
        # diffusers' pipeline loader keeps only `transformer.*` keys (bare peft keys go in directly), and
        # without lora_adapter_metadata it loads with alpha = rank: the record's alpha goes in with the keys
        target = transformer
    if hasattr(target, "load_lora_weights"):  # the pipeline reads the file itself (and converts layouts)
        target.load_lora_weights(str(info.path.parent), weight_name=info.path.name, adapter_name=adapter_name)
        if scale is not None:
            target.set_adapters([adapter_name], [scale])
    else:
        target.load_lora_adapter(sd, prefix="transformer", adapter_name=adapter_name,
                                 metadata={f"transformer.{k}": v for k, v in adapter_meta.items()})
        if scale is not None:
            target.set_adapters([adapter_name], weights=[scale])
    return info

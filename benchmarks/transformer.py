"""Full-size transformer forward with adaptive sparse attention vs dense (one GPU, bf16).

Rows:
* ``forward``: one no-grad forward of random-weight Wan2.1-T2V-1.3B at 81x480x832
  (21x30x52 = 32,760 tokens) and CogVideoX-5B at 49x480x720 (13x30x45 = 17,550 video + 226
  text tokens), with (a) diffusers' default attention, (b) dense cuDNN SDPA
  (``sdpa_kernel(CUDNN_ATTENTION)``), (c) ASA at the default ``ASAConfig`` (CogVideoX with
  pool 16, SPEC 1.5); the realised density of (c) is read from the installed ASA.
* ``forward, ASA + rank-64 LoRA`` (compiled rows): the student as inference loads it, with the LoRA
  kept as peft adapter layers (``--no-fuse-lora``) and merged into the base weights (the default).
* ``A/B VIDEOBLADE_KERNEL_TMA=0|1`` (compiled rows): the ASA forward with the kernels' TMA loads
  flipped against the default for the model's head dim (Wan 128: off, CogVideoX 64: forced on),
  alternating rounds in one process (skipped when the run sets the switch, and under a CUDA-graph
  ``--compile-mode``, whose replays never re-read it).
* ``attn_error``: relative L2 error of ASA's attention output against fp32 dense attention on
  q/k/v with 3D locality (``videoblade.attention.synthetic.local_qkv``) at density 0.15 (and
  multi-level ASA, SPEC 1.6, at about the same cost density)
  (top-k), for raster order / Gilbert reordering / reordering + compensation.

With ``--compile`` (default) the dense, floor and ASA forwards are repeated with every block
under ``torch.compile`` (regional, ``ModelAdapter.compile_blocks``, which also runs each
feed-forward's first linear layer and GELU as one GEMM: ``videoblade.models.ffn``), the first
call's compile time reported. Dense and ASA compiled rows get the same treatment.

Targets: ``wan_forward_speedup_vs_best_dense`` >= 3, ``cog_forward_speedup_vs_best_dense`` >= 1.5:
the fastest ASA forward against the fastest dense forward of any variant (default or cuDNN
SDPA, eager or compiled), so compiling never flatters ASA; and each error step lowering the error.

The model configs are the published ``transformer/config.json`` values (no download); the
weights are random (diffusers' default init), so the dense/sparse *times* are meaningful and
the realised density reflects random-weight attention maps, not a trained model's.

    python benchmarks/transformer.py [--only wan|cog] [--out DIR]

The results file is rewritten after every part (errors, each model, profile), so a run cut short
keeps what it measured; with ``--merge-from`` the parts it did not (or not yet) measure keep the
earlier file's rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    carry_over,
    cast_like_from_pretrained,
    cuda_median_ms,
    gpu_tag,
    print_table,
    print_targets,
    read_merge_source,
    switched_env,
    target,
    write_results,
)
from videoblade.attention import (  # noqa: E402
    AdaptiveSparseAttention,
    set_adaptive_sparse_attention,
    unset_adaptive_sparse_attention,
)
from videoblade.attention.synthetic import local_qkv  # noqa: E402
from videoblade.config import ASAConfig  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# THUDM/CogVideoX-5b transformer/config.json
COG_5B = dict(
    num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
)
VAE_T, VAE_S = 4, 8  # both VAEs: 4x temporal, 8x spatial compression

# --smoke: the same code path on the CPU with toy widths (checks the script, measures nothing)
SMOKE = False
DEVICE = "cuda"
COMPILE_MODE = None  # torch.compile mode of the compiled-block rows (--compile-mode)
WAN_SMOKE = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2, text_dim=32)
COG_SMOKE = dict(COG_5B, num_attention_heads=2, attention_head_dim=32, num_layers=2, text_embed_dim=32, time_embed_dim=32,
                 max_text_seq_length=20)


def _timer(fn, warmup, reps, min_reps, max_total_ms):
    if not SMOKE:
        return cuda_median_ms(fn, warmup=warmup, reps=reps, min_reps=min_reps, max_total_ms=max_total_ms)
    import statistics
    import time

    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def _latent_fhw(frames, height, width):
    return (frames - 1) // VAE_T + 1, height // VAE_S, width // VAE_S


def _token_grid(frames, height, width, patch_t, patch_s):
    F, H, W = _latent_fhw(frames, height, width)
    return F // patch_t, H // patch_s, W // patch_s


def build(family: str, dtype=torch.bfloat16):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel

    cls, cfg = (WanTransformer3DModel, WAN_1_3B) if family == "wan" else (CogVideoXTransformer3DModel, COG_5B)
    if SMOKE:
        cfg, dtype = (WAN_SMOKE if family == "wan" else COG_SMOKE), torch.float32
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = cls(**cfg)
    return cast_like_from_pretrained(model, dtype).eval().requires_grad_(False)


def make_inputs(family: str, model, frames, height, width, dtype=torch.bfloat16):
    # the dtype of the model's input projection (its first parameter may be a float32-kept table)
    proj = model.patch_embedding if family == "wan" else model.patch_embed.proj
    dtype = proj.weight.dtype
    g = torch.Generator(device=DEVICE).manual_seed(0)
    f, h, w = _latent_fhw(frames, height, width)
    cfg = model.config
    if family == "wan":
        x = torch.randn(1, cfg.in_channels, f, h, w, device=DEVICE, dtype=dtype, generator=g)
        enc = torch.randn(1, 512, cfg.text_dim, device=DEVICE, dtype=dtype, generator=g)
        t = torch.tensor([700.0], device=DEVICE)
        tokens = (f, h // cfg.patch_size[1], w // cfg.patch_size[2])
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False), tokens, 0
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = cfg.patch_size
    x = torch.randn(1, f, cfg.in_channels, h, w, device=DEVICE, dtype=dtype, generator=g)
    text = cfg.max_text_seq_length
    enc = torch.randn(1, text, cfg.text_embed_dim, device=DEVICE, dtype=dtype, generator=g)
    t = torch.tensor([700], device=DEVICE)
    gh, gw = h // p, w // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                   temporal_size=f, device=torch.device(DEVICE))
    return (dict(hidden_states=x, encoder_hidden_states=enc, timestep=t, image_rotary_emb=rope, return_dict=False),
            (f, gh, gw), text)


def _floor_attention(query, key, value, *args, **kwargs):
    """Stand-in for attention in the floor rows: q plus the sequence means of k and v. It reads
    k and v once, so under torch.compile their projections, norms and RoPE stay live (returning q
    alone let inductor drop them: 141 ms instead of the real non-attention cost on Wan)."""
    return query + key.mean(-2, keepdim=True) + value.mean(-2, keepdim=True)


def forward_rows(family: str, frames, height, width, asa_cfg: ASAConfig, reps: int,
                 compile_blocks: bool = False) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(family)
    inp, grid, text = make_inputs(family, model, frames, height, width)
    shape = f"{frames}x{height}x{width} -> tokens {grid[0]}x{grid[1]}x{grid[2]}" + (f" + {text} text" if text else "")
    rows = []
    name = "Wan2.1-1.3B" if family == "wan" else "CogVideoX-5B"

    def fwd():
        with torch.no_grad():
            return model(**inp)[0]

    def fwd_cudnn():
        import contextlib

        ctx = contextlib.nullcontext() if SMOKE else sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        with torch.no_grad(), ctx:
            return model(**inp)[0]

    dense_out = fwd().float()
    t_def = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=4000)
    rows.append(dict(what=f"{name} forward, dense (diffusers default SDPA)", shape=shape, density=1.0, median_ms=t_def,
                     peer=None, **{"pass": bool(torch.isfinite(dense_out).all())}))
    cud_out = fwd_cudnn().float()
    t_cud = _timer(fwd_cudnn, warmup=1, reps=reps, min_reps=3, max_total_ms=4000)
    rel_cud = _rel_l2(cud_out, dense_out)
    rows.append(dict(what=f"{name} forward, dense (cuDNN SDPA)", shape=shape, density=1.0, median_ms=t_cud,
                     peer="dense default", rel_l2_vs_default=rel_cud, **{"pass": rel_cud < 2e-2}))

    best = min(t_def, t_cud)

    # the floor: every attention call (self and cross) replaced by one cheap pass over q, k, v
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _floor_attention
    try:
        t_floor = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=3000)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    rows.append(dict(what=f"{name} forward, attention replaced by one pass over q, k, v (non-attention floor)", shape=shape,
                     density=0.0, median_ms=t_floor, peer=f"best dense {best:.1f} ms",
                     max_possible_speedup=best / t_floor, **{"pass": True}))

    for label, cfg in ((f"{name} forward, ASA defaults", asa_cfg),
                       (f"{name} forward, ASA defaults without compensation",
                        dataclasses.replace(asa_cfg, compensation=False))):
        asa = set_adaptive_sparse_attention(model, cfg)
        asa_out = fwd().float()  # also compiles / autotunes the kernels
        asa.reset_stats()
        t_asa = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=4000)
        dens = asa.density_stats()
        rel_asa = _rel_l2(asa_out, dense_out)
        rows.append(dict(what=label, shape=shape, density=dens["mean"], median_ms=t_asa,
                         peer=f"best dense {best:.1f} ms", speedup_vs_best_dense=best / t_asa,
                         rel_l2_vs_dense_output=rel_asa, asa_config=dataclasses.asdict(asa.cfg),
                         density_min_layer=min(v["mean"] for v in dens["layers"].values()),
                         density_max_layer=max(v["mean"] for v in dens["layers"].values()),
                         **{"pass": bool(torch.isfinite(asa_out).all())}))
    unset_adaptive_sparse_attention(model)
    if compile_blocks:
        rows += compiled_rows(family, name, model, fwd, shape, dense_out, asa_cfg, reps, best)
    return rows


def compiled_rows(family, name, model, fwd, shape, dense_out, asa_cfg, reps, best_eager) -> list[dict]:
    """The same forwards with every block under torch.compile (regional, inductor): dense,
    the non-attention floor, and ASA. The compile time of the first call is reported."""
    import time

    _adapter(family).compile_blocks(model, mode=COMPILE_MODE)
    rows = []

    def first_call():
        t0 = time.perf_counter()
        out = fwd().float()
        if not SMOKE:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    out, comp_s = first_call()
    t_dense = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=4000)
    rel = _rel_l2(out, dense_out)
    tag = f", mode {COMPILE_MODE}" if COMPILE_MODE else ""
    rows.append(dict(what=f"{name} forward, dense, compiled blocks{tag}", shape=shape, density=1.0, median_ms=t_dense,
                     peer=f"best eager dense {best_eager:.1f} ms", compile_s=comp_s, rel_l2_vs_dense_output=rel,
                     **{"pass": rel < 2e-2}))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _floor_attention
    try:
        _, comp_f = first_call()
        t_floor = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=3000)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    best = min(best_eager, t_dense)
    rows.append(dict(what=f"{name} forward, compiled blocks{tag}, attention replaced by one pass over q, k, v (floor)", shape=shape,
                     density=0.0, median_ms=t_floor, peer=f"best dense {best:.1f} ms", compile_s=comp_f,
                     max_possible_speedup=best / t_floor, **{"pass": True}))
    asa = set_adaptive_sparse_attention(model, asa_cfg)
    out, comp_a = first_call()
    asa.reset_stats()
    t_asa = _timer(fwd, warmup=1, reps=reps, min_reps=3, max_total_ms=4000)
    dens = asa.density_stats()
    rel = _rel_l2(out, dense_out)
    rows.append(dict(what=f"{name} forward, ASA defaults, compiled blocks{tag}", shape=shape, density=dens["mean"],
                     median_ms=t_asa, peer=f"best dense {best:.1f} ms (compiled {t_dense:.1f})",
                     speedup_vs_best_dense=best / t_asa, speedup_vs_compiled_dense=t_dense / t_asa,
                     compile_s=comp_a, rel_l2_vs_dense_output=rel, asa_config=dataclasses.asdict(asa.cfg),
                     **{"pass": bool(torch.isfinite(out).all())}))
    rows.append(kernel_breakdown(f"{name} forward, ASA defaults, compiled blocks{tag}", fwd, model, shape))
    if "VIDEOBLADE_KERNEL_TMA" not in os.environ:  # a run that sets it records it as kernel_env instead
        if _cudagraphs(COMPILE_MODE):
            # the kernels read the switch when they launch; a CUDA-graph replay launches nothing, so
            # both sides would replay the same captured kernels
            print(f"skip the TMA A/B: compile mode {COMPILE_MODE} replays CUDA graphs", flush=True)
        else:
            rows.append(switch_ab_row(f"{name} forward, ASA defaults, compiled blocks{tag}", fwd, shape,
                                      "VIDEOBLADE_KERNEL_TMA", tma_flip(model.config.attention_head_dim),
                                      dens["mean"]))
    rows += lora_rows(family, name, model, fwd, shape, t_asa, dens["mean"], out, tag)
    unset_adaptive_sparse_attention(model)
    return rows


LORA_RANK = 64


def lora_rows(family, name, model, fwd, shape, t_asa, density, asa_out, tag) -> list[dict]:
    """The student as inference loads it: ASA + a rank-64 LoRA on the family's trained targets, kept as
    peft adapter layers (``--no-fuse-lora``) and merged the way inference merges it (the default). The LoRA
    has random non-zero up and down weights; the model's own weights are restored afterwards."""
    from peft import LoraConfig

    from videoblade.inference import merge_lora

    targets = list(_adapter(family).lora_target_modules)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets, init_lora_weights="gaussian"))
    # the adapted layers' own weights, by their names once the adapter layers are gone
    base = {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    # gaussian init leaves B at zero; B is drawn large enough that the LoRA changes the output well past
    # bf16 rounding of the merged weights (at std 2e-2 the change was 6 % against 1.5 % merged-vs-unmerged
    # on an H100), so the merge check means something
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=1e-1)
    rows = []
    try:
        outs = {}
        for merged in (False, True):
            if merged:
                merge_lora(model)
            outs[merged] = fwd().float()  # recompiles the blocks for the changed modules
            t = _timer(fwd, warmup=1, reps=10, min_reps=3, max_total_ms=4000)
            how = "merged into the base weights (inference default)" if merged else "unmerged peft layers (--no-fuse-lora)"
            rows.append(dict(what=f"{name} forward, ASA + rank-{LORA_RANK} LoRA {how}, compiled blocks{tag}", shape=shape,
                             density=density, median_ms=t, peer=f"ASA compiled without LoRA {t_asa:.1f} ms", overhead_vs_no_lora=t / t_asa,
                             lora_targets=targets, **{"pass": bool(torch.isfinite(outs[merged]).all())}))
        rel = _rel_l2(outs[True], outs[False])
        effect = _rel_l2(outs[False], asa_out)  # what the LoRA changes at all
        rows[-1].update(rel_l2_vs_unmerged=rel, lora_effect_rel_l2=effect,
                        speedup_vs_unmerged=rows[0]["median_ms"] / rows[-1]["median_ms"])
        rows[-1]["pass"] = rows[-1]["pass"] and rel < 2e-2 and rel < effect / 4
    finally:
        if getattr(model, "peft_config", None):  # not merged: the adapter layers are still there
            model.unload_lora()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, w in base.items():
                params[n].copy_(w)
    return rows


def tma_flip(head_dim: int) -> str:
    """The VIDEOBLADE_KERNEL_TMA value that flips this GPU's default at ``head_dim`` (``auto`` is on
    for Hopper at head dim 128 only: Wan's 128 -> "0", CogVideoX's 64 -> "1"), so the A/B row
    compares two different kernels whatever the model."""
    from videoblade.kernels.block_sparse import _tma_wanted

    capability = None if SMOKE else torch.cuda.get_device_capability()
    return "0" if _tma_wanted("auto", head_dim, capability) else "1"


def _cudagraphs(mode: str | None) -> bool:
    """Whether torch.compile ``mode`` replays CUDA graphs (reduce-overhead, max-autotune)."""
    if not mode:
        return False
    try:
        import torch._inductor

        return bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs"))
    except Exception:  # noqa: BLE001 - an unknown mode fails in torch.compile itself, later
        return mode in ("reduce-overhead", "max-autotune")


def switch_ab_row(label: str, fwd, shape, var: str, value: str, density: float, rounds: int = 4) -> dict:
    """One kernel switch (an environment variable the kernels read per launch) flipped against the
    default in the same process, timed in alternating rounds so drift hits both sides alike."""
    times = {"default": [], value: []}
    for _ in range(rounds):
        for side in times:
            with switched_env(var, None if side == "default" else value):
                times[side].append(_timer(fwd, warmup=1, reps=5, min_reps=3, max_total_ms=3000))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return dict(what=f"{label}: A/B {var}={value} against the default", shape=shape, density=density,
                median_ms=med["default"], peer=f"{var}={value}", switched_ms=med[value], rounds_ms=times,
                default_speedup_vs_switched=med[value] / med["default"], **{"pass": True})


def _adapter(family: str):
    from videoblade.models import get_adapter

    return get_adapter("wan" if family == "wan" else "cogvideox")


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if "_fwd_kernel" in n:
        return "block-sparse attention kernel (with compensation)"
    if "_estimate_kernel" in n or "_estimate_fix_kernel" in n:
        return "block-importance estimate"
    if any(k in n for k in ("_select_kernel", "_pool_kernel", "_summary_table_kernel")):
        return "block selection + compensation pooling and table (Triton)"
    if not n.startswith("triton_") and any(k in n for k in ("sdpa", "flash", "fmha")):  # (inductor names
        # its fused kernels after the ops they feed, e.g. "..._scaled_dot_product_cudnn_attention_...")
        return "dense attention (cross-attention)"
    if "fprop" not in n and any(k in n for k in ("nvjet", "gemm", "cutlass", "xmma")):
        return "matmul (linear layers)"
    return "other (norms, RoPE, GELU, modulation, pooling, mask, copies)"


def kernel_breakdown(label: str, fwd, model, shape: str) -> dict:
    """One forward under torch.profiler: GPU busy time, time per kind of kernel, the largest kernels,
    and the linear layers' matmul rate (FLOPs counted from the model's own Linear modules)."""
    from torch.profiler import ProfilerActivity, profile

    sync = (lambda: None) if SMOKE else torch.cuda.synchronize
    fwd()
    sync()
    flops = []

    def count(mod, inp, out):  # 2 * tokens * in * out per Linear call
        flops.append(2 * inp[0].numel() // inp[0].shape[-1] * mod.in_features * mod.out_features)

    # counted in an eager forward: a hook added to a compiled block would make it recompile
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.compiler.set_stance("force_eager"):
            fwd()
    finally:
        for h in hooks:
            h.remove()
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])) as prof:
        fwd()
        sync()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    if not kernels:  # --smoke on the CPU: no GPU kernels to account
        return dict(what=f"{label}: kernel time by kind (no GPU kernels recorded)", shape=shape, peer=None,
                    linear_gflop=sum(flops) / 1e9, **{"pass": True})
    end = max(e_ for _, e_, _ in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s_, e_, _ in kernels:  # union of kernel intervals
        if cur_e is None or s_ > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    busy += cur_e - cur_s
    kinds: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for s_, e_, n in kernels:
        kind = _kernel_kind(n)
        kinds[kind] = kinds.get(kind, 0.0) + (e_ - s_) / 1e3
        d = by_name.setdefault(n[:100], [0, 0.0])
        d[0] += 1
        d[1] += (e_ - s_) / 1e3
    mm_ms = kinds.get("matmul (linear layers)", 0.0)
    return dict(what=f"{label}: kernel time by kind (torch.profiler, one forward)", shape=shape,
                span_ms=(end - kernels[0][0]) / 1e3, gpu_busy_ms=busy / 1e3,
                busy_fraction=busy / (end - kernels[0][0]), kernels=len(kernels),
                ms_by_kind={k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                linear_tflops_per_s=(sum(flops) / (mm_ms * 1e-3) / 1e12) if mm_ms else None,
                top_kernels=[[n, c, round(ms, 2)] for n, (c, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]],
                peer=None, **{"pass": True})


def forward_target(rows: list[dict]) -> float:
    """Fastest ASA forward over the fastest dense forward (eager or compiled, any SDPA backend)."""
    timed = [r for r in rows if r.get("median_ms") is not None]
    dense = min(r["median_ms"] for r in timed if r["density"] == 1.0)
    asa = min(r["median_ms"] for r in timed if "ASA defaults" in r["what"] and "without" not in r["what"])
    return dense / asa


def error_rows(label: str, grid, text: int, heads: int, head_dim: int, pool: int) -> list[dict]:
    from videoblade.kernels.reference import dense_attention_ref

    q, k, v = local_qkv(grid, heads, head_dim, text_tokens=text, length_scale=ERR_LENGTH_SCALE, noise=ERR_NOISE,
                        dtype=torch.float32 if SMOKE else torch.bfloat16, device=DEVICE)
    ref = dense_attention_ref(q, k, v)
    rows = []
    topk = dict(mode="topk", topk=0.15)
    # multi-level (SPEC 1.6) at about the same cost: exact 3 %, then 10 % 2x, 15 % 4x, 20 % 8x pooled
    levels = dict(mode="levels", level_pools=[2, 4, 8], level_fractions=[0.03, 0.10, 0.15, 0.20])
    for variant, reorder, comp, mode in [("raster order", False, False, topk), ("Gilbert reorder", True, False, topk),
                                         ("reorder + compensation", True, True, topk),
                                         ("reorder + compensation, multi-level", True, True, levels)]:
        asa = AdaptiveSparseAttention(ASAConfig(**mode, reorder=reorder, compensation=comp, pool=pool))
        with torch.no_grad():
            out = asa(q, k, v, grid=grid, text_tokens=text)
        err = _rel_l2(out.float(), ref)
        rows.append(dict(what=f"attn_error {label}: {variant}", shape=list(q.shape), density=asa.density_stats()["mean"],
                         rel_l2_error=err, median_ms=None, peer="fp32 dense attention",
                         **{"pass": bool(math.isfinite(err))}))
    del q, k, v, ref
    torch.cuda.empty_cache()
    return rows


ERR_LENGTH_SCALE = 3.0
ERR_NOISE = 0.5


def profile_rows(label: str, grid, text: int, heads: int, head_dim: int, pool: int, layers: int) -> list[dict]:
    """Per-layer cost of every ASA piece at one model's attention shape (``--profile``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from videoblade.kernels import (
        block_sparse_attention,
        block_sparse_attention_ref,
        mask_to_block_lists,
        pool_summaries,
    )

    if SMOKE:
        block_sparse_attention = block_sparse_attention_ref  # noqa: F811

    q, k, v = local_qkv(grid, heads, head_dim, text_tokens=text, length_scale=ERR_LENGTH_SCALE, noise=ERR_NOISE,
                        dtype=torch.bfloat16, device=DEVICE)
    # the layout the Wan processor hands over: [B, L, H, D] transposed to [B, H, L, D] (strided)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    cfg = ASAConfig(pool=pool)
    asa = AdaptiveSparseAttention(cfg)
    P = asa.estimate(q, k)
    mask = asa.make_mask(P, text)
    idx, cnt = mask_to_block_lists(mask)
    summ = pool_summaries(k, v, cfg.block_size, pool)
    bs = cfg.block_size

    def dense():
        import contextlib

        with contextlib.nullcontext() if SMOKE else sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    pieces = [
        ("dense cuDNN attention", dense),
        ("ASA call (ordered, all pieces)", lambda: asa(q, k, v, grid=grid, text_tokens=text, ordered=True)),
        ("  estimate_block_importance", lambda: asa.estimate(q, k)),
        ("  make_mask (torch policy)", lambda: asa.make_mask(P, text)),
        ("  mask_to_block_lists", lambda: mask_to_block_lists(mask)),
        ("  make_lists (what the call uses: one Triton launch on CUDA)", lambda: asa.make_lists(P, text)),
        ("  pool_summaries (what the call uses: Triton on CUDA)", lambda: pool_summaries(k, v, bs, pool)),
        ("  pool_summaries, torch (eager)", lambda: pool_summaries(k, v, bs, pool, backend="torch")),
        ("  block_sparse_attention, no compensation", lambda: block_sparse_attention(q, k, v, idx, cnt, bs)),
        ("  block_sparse_attention + compensation", lambda: block_sparse_attention(q, k, v, idx, cnt, bs, summary=summ)),
        ("  Gilbert index_select of q,k,v + inverse of out",
         lambda: [t.index_select(2, torch.arange(t.shape[2], device=t.device)) for t in (q, k, v, q)]),
    ]
    rows = []
    with torch.no_grad():
        dens = float(mask.float().mean())
        for what, fn in pieces:
            ms = _timer(fn, warmup=3, reps=20, min_reps=5, max_total_ms=1000)
            rows.append(dict(what=f"profile {label}: {what}", shape=list(q.shape), density=dens, median_ms=ms,
                             ms_per_forward=ms * layers, peer=None, **{"pass": True}))
    return rows


def forward_op_table(family: str, frames, height, width, asa_cfg: ASAConfig, top: int = 25) -> None:
    """torch.profiler table (CUDA time by op) of one ASA forward (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    model = build(family)
    inp, _, _ = make_inputs(family, model, frames, height, width)
    set_adaptive_sparse_attention(model, asa_cfg)
    with torch.no_grad():
        model(**inp)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(**inp)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60))


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row_part(what: str):
    """The part of a run a row belongs to, for ``--merge-from``: "error", "profile", (family, "eager"),
    (family, "compiled") or (family, "ab") (the TMA A/B of the compiled rows); None for anything else."""
    if what.startswith("attn_error"):
        return "error"
    if what.startswith("profile "):
        return "profile"
    for fam, prefix in (("wan", "Wan2.1"), ("cog", "CogVideoX-5B")):
        if what.startswith(prefix):
            if "compiled blocks" not in what:
                return fam, "eager"
            return (fam, "ab") if ": A/B " in what else (fam, "compiled")
    return None


def merge_rows(rows: list[dict], source, targets: dict) -> list[dict]:
    """``source``'s rows (a path, or the file as ``read_merge_source`` returned it) for the parts this
    run has not measured (``row_part``: skipped by a flag, not reached yet, or an A/B this run did not
    make), tagged where they were measured, then ``rows``; its targets not in ``targets`` are added."""
    redone = {r["what"] for r in rows}
    done = {row_part(r["what"]) for r in rows} - {None}
    return carry_over(source, lambda r: r["what"] not in redone and row_part(r["what"]) not in done, targets) + rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["wan", "cog"], default=None)
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT") or None, help="results folder (default benchmarks/results)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler op tables of ASA forwards; writes nothing")
    ap.add_argument("--skip-profile", action="store_true", help="skip the per-piece ASA timing rows")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--merge-from", default=None,
                    help="earlier transformer results JSON: keep its rows for the parts this run skips")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip the rows with torch.compile'd blocks (they cost a few minutes of compiling)")
    args = ap.parse_args(argv)
    global SMOKE, DEVICE, COMPILE_MODE
    COMPILE_MODE = args.compile_mode
    if args.smoke:
        SMOKE, DEVICE = True, "cpu"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/transformer.py needs a CUDA GPU (or --smoke)")
    # read and checked (same card) before anything is measured; every write merges this copy
    merge_src = read_merge_source(args.merge_from) if args.merge_from and not args.profile else None
    # video sizes as requested; token grids and text length follow from them and the configs
    wan_cfg, cog_cfg = (WAN_SMOKE, COG_SMOKE) if SMOKE else (WAN_1_3B, COG_5B)
    sizes = dict(wan=(81, 480, 832), cog=(49, 480, 720)) if not SMOKE else dict(wan=(17, 128, 192), cog=(17, 128, 160))
    sizes.update(wan_grid=_token_grid(*sizes["wan"], wan_cfg["patch_size"][0], wan_cfg["patch_size"][1]),
                 cog_grid=_token_grid(*sizes["cog"], 1, cog_cfg["patch_size"]),
                 cog_text=cog_cfg["max_text_seq_length"])
    torch.backends.cuda.matmul.allow_tf32 = True
    rows: list[dict] = []
    targets: dict = {}
    if args.profile:
        if not SMOKE:
            for fam, size, c in (("wan", sizes["wan"], ASAConfig()), ("cog", sizes["cog"], ASAConfig())):
                forward_op_table(fam, *size, c)
                _free()
        return

    def save():
        """Write the results with everything measured so far (after every part, so that a run killed
        at its time limit keeps it; merged parts not measured yet stay as they were)."""
        tg = dict(targets)
        out_rows = merge_rows(rows, merge_src, tg) if merge_src is not None else list(rows)
        return write_results(f"transformer_{gpu_tag()}", out_rows, tg, out_dir=args.out), out_rows, tg

    if not args.skip_error:
        wan_err = error_rows("Wan shape", sizes["wan_grid"], 0, 4, 128, 32)
        cog_err = error_rows("CogVideoX shape", sizes["cog_grid"], sizes["cog_text"], 4, 64, 16)
        rows += wan_err + cog_err
        print_table(rows, ["what", "density", "rel_l2_error"])
        for lab, er in (("wan", wan_err), ("cog", cog_err)):
            e = [r["rel_l2_error"] for r in er]
            targets[f"{lab}_attn_error_ratio_reorder_vs_raster"] = target(e[1] / e[0], 1.0, False)
            targets[f"{lab}_attn_error_ratio_compensation_vs_reorder"] = target(e[2] / e[1], 1.0, False)
        save()
    if args.only in (None, "wan"):
        r = forward_rows("wan", *sizes["wan"], ASAConfig(), args.reps, args.compile)
        rows += r
        _free()
        targets["wan_forward_speedup_vs_best_dense"] = target(forward_target(r), 3.0, True)
        print_table(r, ["what", "density", "median_ms", "speedup_vs_best_dense", "max_possible_speedup", "compile_s"])
        save()
    if args.only in (None, "cog"):
        r = forward_rows("cog", *sizes["cog"], ASAConfig(), args.reps, args.compile)
        rows += r
        targets["cog_forward_speedup_vs_best_dense"] = target(forward_target(r), 1.5, True)
        print_table(r, ["what", "density", "median_ms", "speedup_vs_best_dense", "max_possible_speedup", "compile_s"])
        save()
    if not args.skip_profile:
        prof = profile_rows("Wan", sizes["wan_grid"], 0, 12, 128, 32, 30)
        prof += profile_rows("CogVideoX", sizes["cog_grid"], sizes["cog_text"], 48, 64, 16, 42)
        rows += prof
    path, out_rows, tg = save()
    print()
    print_table(out_rows, ["what", "density", "median_ms", "speedup_vs_best_dense", "max_possible_speedup",
                           "ms_per_forward", "rel_l2_error", "pass"])
    print_targets(tg)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

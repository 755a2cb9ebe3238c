"""End-to-end speed: the dense 50-step CFG baseline against the 8-step sparse student, one GPU, one process.

    python benchmarks/e2e.py                         # H200: writes benchmarks/results/e2e_h200.json
    python benchmarks/e2e.py --tiny --out /tmp/e2e   # CPU smoke run on the tiny models: /tmp/e2e/e2e_cpu.json

What is measured (full size, random weights, bf16 transformers; the configs are the published
ones, written below, so nothing downloads):

* Wan2.1-T2V-1.3B at 81x480x832 (latent 16x21x60x104, 32,760 tokens) and CogVideoX-5B at
  49x480x720 (latent 16x13x60x90, 17,550 video + 226 text tokens).
* **text encoder**: replaced by random prompt embeddings of the right shape (Wan [1, 512, 4096],
  CogVideoX [1, 226, 4096]). Prompt encoding is one T5 pass per prompt in both settings (the
  baseline's negative prompt is encoded once and cached), so it is left out of both sides.
* **baseline**: dense attention, classifier-free guidance (Wan 5.0, CogVideoX 3.5: two transformer
  forwards per step), 50 steps of diffusers' UniPC. Every one of the 50 steps runs the same two
  dense forwards on the same shapes (dense cost does not depend on the timestep), so
  `--baseline-timed-steps` steps are timed (CUDA events, after warm-up) and the median step time
  is multiplied by 50; the rows say so.
* **student**: the 8-step eta sampler (SPEC section 2), guidance 1 (one forward per step), ASA
  installed in every self-attention layer (the ASAConfig defaults; compensation pool 32 for Wan and
  16 for CogVideoX), timed whole (`--student-repeats` runs after a warm-up run); its realised
  density is read from ASA's statistics. Also an 8-step *dense* run, to separate the two sources
  of speed.
* **decode**: the same latents decoded by the VAE in fp32 (the reference), bf16, fp16, bf16 tiled
  and bf16 compiled the family's way (`ModelAdapter.compile_vae`: the CogVideoX decoder whole, the Wan
  decoder's RMS norms fused); for Wan these run diffusers' one-latent-frame-per-call loop, and bf16
  and bf16 compiled are repeated with all latent frames in one decoder call after the first
  (`--vae-chunk all`, `ModelAdapter.configure_decode_chunk`: videoblade's channels-last loop); the
  fastest compiled bf16 setting is repeated with cuDNN's convolution autotuner on for the decode
  (`torch.backends.cudnn.benchmark`, `configure_vae(..., cudnn_benchmark=True)`); each row with the
  GPU memory the decode adds; PSNR of each against the fp32 frames (uint8, peak 255) and median time. The fastest setting with PSNR > 40 dB is `decode_choice`; both e2e figures
  use that same decode setting (so the decode choice does not inflate the ratio); the ratio against
  an fp32-decode baseline is reported too. The VAEs have random weights as well, so the PSNR
  says how bf16 rounding behaves on this architecture and these activations, not on trained weights.

e2e time = denoising time + decode time (baseline: extrapolated denoising + measured decode;
student: one timed region holding the sampler and the decode).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    carry_over,
    cast_like_from_pretrained,
    gpu_tag,
    print_table,
    read_merge_source,
    target,
    write_results,
)

from videoblade.config import ASAConfig  # noqa: E402
from videoblade.inference import choose_decode, configure_vae, psnr  # noqa: E402
from videoblade.models import ModelInfo, attach_schedule, get_adapter  # noqa: E402
from videoblade.sampling import guided, randn, sample, unipc_scheduler  # noqa: E402
from videoblade.schedules import Schedule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # e2e_<card>.json there (common.gpu_tag)

# ---------------------------------------------------------------------------- published configs
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer/config.json, vae/config.json, scheduler (UniPC, shift 3 at 480p)
WAN_1_3B = {
    "transformer": {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
                    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                    "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
                    "rope_max_seq_len": 1024},
    "vae": {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
            "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                             0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
            "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                            1.5579, 1.6382, 1.1253, 2.8251, 1.916]},
    "scheduler": {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                  "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
                  "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                  "final_sigmas_type": "zero"},
    "size": (480, 832, 81), "text": (512, 4096), "cfg": 5.0, "pool": 32,
}
# THUDM/CogVideoX-5b: transformer/config.json, vae/config.json (scaling_factor 0.7), scheduler/scheduler_config.json
COG_5B = {
    "transformer": {"_class_name": "CogVideoXTransformer3DModel", "activation_fn": "gelu-approximate",
                    "attention_bias": True, "attention_head_dim": 64, "dropout": 0.0, "flip_sin_to_cos": True,
                    "freq_shift": 0, "in_channels": 16, "max_text_seq_length": 226, "norm_elementwise_affine": True,
                    "norm_eps": 1e-5, "num_attention_heads": 48, "num_layers": 42, "out_channels": 16,
                    "patch_size": 2, "sample_frames": 49, "sample_height": 60, "sample_width": 90,
                    "spatial_interpolation_scale": 1.875, "temporal_compression_ratio": 4,
                    "temporal_interpolation_scale": 1.0, "text_embed_dim": 4096, "time_embed_dim": 512,
                    "timestep_activation_fn": "silu", "use_learned_positional_embeddings": False,
                    "use_rotary_positional_embeddings": True},
    "vae": {"_class_name": "AutoencoderKLCogVideoX", "act_fn": "silu", "block_out_channels": [128, 256, 256, 512],
            "down_block_types": ["CogVideoXDownBlock3D"] * 4, "up_block_types": ["CogVideoXUpBlock3D"] * 4,
            "force_upcast": True, "in_channels": 3, "latent_channels": 16, "layers_per_block": 3,
            "norm_eps": 1e-6, "norm_num_groups": 32, "out_channels": 3, "sample_height": 480, "sample_width": 720,
            "scaling_factor": 0.7, "temporal_compression_ratio": 4, "use_post_quant_conv": False,
            "use_quant_conv": False},
    "scheduler": {"_class_name": "CogVideoXDPMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "sample_max_value": 1.0,
                  "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
                  "timestep_spacing": "trailing", "trained_betas": None},
    "size": (480, 720, 49), "text": (226, 4096), "cfg": 3.5, "pool": 16,
}


def tiny_spec(family: str) -> dict:
    """The tiny test models' configs (CPU smoke run of this script)."""
    from videoblade.models.tiny import TINY_DEFAULTS

    d = TINY_DEFAULTS[family]
    cls = {"wan": ("WanTransformer3DModel", "AutoencoderKLWan", "UniPCMultistepScheduler"),
           "cogvideox": ("CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "CogVideoXDPMScheduler")}[family]
    tcfg = dict(d["transformer"], _class_name=cls[0])
    text_dim = tcfg.get("text_dim", tcfg.get("text_embed_dim"))
    text_len = tcfg.get("max_text_seq_length", 32)
    scfg = dict(d["scheduler"], _class_name=cls[2])
    if family == "cogvideox":
        scfg.setdefault("prediction_type", "v_prediction")
    return {"transformer": tcfg, "vae": dict(d["vae"], _class_name=cls[1]), "scheduler": scfg,
            "size": tuple(d["hints"]["default_size"]), "text": (text_len, text_dim),
            "cfg": 5.0 if family == "wan" else 3.5, "pool": 4}


# ---------------------------------------------------------------------------- timing
class Timer:
    """Median of CUDA-event (or, on CPU, wall-clock) times in ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end), out
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ---------------------------------------------------------------------------- one family
def build(spec: dict, device, dtype):
    import diffusers

    tcfg = {k: v for k, v in spec["transformer"].items() if not k.startswith("_")}
    vcfg = {k: v for k, v in spec["vae"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        transformer = getattr(diffusers, spec["transformer"]["_class_name"])(**tcfg)
        transformer = cast_like_from_pretrained(transformer, dtype).eval()
        vae = getattr(diffusers, spec["vae"]["_class_name"])(**vcfg).float().eval()
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    return transformer, vae


def run_family(name: str, family: str, spec: dict, args, device, deadline: float) -> list[dict]:
    adapter = get_adapter(family)
    info = ModelInfo(folder=Path(f"<random {name}>"), family=family, transformer_config=spec["transformer"],
                     vae_config=spec["vae"], scheduler_config=spec["scheduler"], text_encoder_config=None)
    H, W, Fr = spec["size"]
    geometry = adapter.geometry(info, H, W, Fr)
    schedule = Schedule.from_scheduler_config(spec["scheduler"])
    timer = Timer(device)
    shape = f"{Fr}x{H}x{W} latent {'x'.join(map(str, geometry.latent_shape))} tokens " \
            f"{geometry.text_tokens}+{geometry.video_tokens}"
    t_build = time.perf_counter()
    transformer, vae = build(spec, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    attach_schedule(transformer, schedule)
    print(f"[{name}] built in {time.perf_counter() - t_build:.1f} s; {shape}", flush=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    L_text, D_text = spec["text"]
    dt = next(transformer.parameters()).dtype
    embeds = randn((1, L_text, D_text), gen, device).to(dt)
    neg = randn((1, L_text, D_text), gen, device).to(dt)
    rows: list[dict] = []
    common = {"model": name, "shape": shape, "pass": "forward (inference)", "text_encoder": "excluded (random embeddings of shape "
                                                            f"[1, {L_text}, {D_text}] on both sides)"}

    # ---------------- baseline: dense, CFG, UniPC; time a subset of the 50 identical-cost steps
    cfg = spec["cfg"]

    def cond(x, t):
        return adapter.predict(transformer, x, t, embeds, geometry, schedule=_raw)

    def uncond(x, t):
        return adapter.predict(transformer, x, t, neg, geometry, schedule=_raw)

    from videoblade.sampling import _SchedulerTimesteps

    _raw = _SchedulerTimesteps()
    predict = guided(cond, uncond, cfg)
    sched = unipc_scheduler(schedule)

    def baseline_steps() -> list[float]:
        """Time the first warm-up + timed steps of the 50-step CFG UniPC run (ms per step, timed ones)."""
        sched.set_timesteps(args.baseline_steps, device=device)
        x = randn((1, *geometry.latent_shape), torch.Generator().manual_seed(2), device)
        step_ms = []
        n_run = args.baseline_warmup + args.baseline_timed_steps
        with torch.no_grad():
            for i, t in enumerate(list(sched.timesteps)[:n_run]):
                tin = t.reshape(1).float() if schedule.kind == "flow" else t.reshape(1).long()

                def one_step(x=x, t=t, tin=tin):
                    out = predict(x, tin)
                    return sched.step(out, t, x, return_dict=False)[0].float()

                ms, x = timer(one_step)
                if i >= args.baseline_warmup:
                    step_ms.append(ms)
        return step_ms

    step_ms = baseline_steps()
    base_step = median(step_ms)
    base_denoise_ms = base_step * args.baseline_steps
    rows.append(dict(common, what=f"baseline denoising (dense, CFG {cfg:.1f}, UniPC)", steps=args.baseline_steps,
                     forwards_per_step=2, density=1.0, median_ms=base_denoise_ms, step_median_ms=base_step,
                     step_times_ms=step_ms, extrapolated=True,
                     note=f"{len(step_ms)} of {args.baseline_steps} steps timed after {args.baseline_warmup} "
                          "warm-up step(s); every step is the same two dense forwards on the same shapes, so "
                          "the total is the median step time x steps", peer=None))
    print(f"[{name}] baseline step {base_step:.1f} ms -> {base_denoise_ms / 1e3:.2f} s for {args.baseline_steps}",
          flush=True)
    latents_for_decode = randn((1, *geometry.latent_shape), torch.Generator().manual_seed(1), device)

    # ---------------- student without ASA (8 steps, guidance 1): the step-distillation share
    def student_run():
        g = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():
            return sample(adapter, transformer, schedule, embeds, geometry, steps=args.student_steps, eta=0.9,
                          generator=g, guidance=1.0, progress=False)

    timer(student_run)  # warm-up
    dense_ms = [timer(student_run)[0] for _ in range(args.student_repeats)]
    rows.append(dict(common, what=f"student denoising, dense ({args.student_steps} steps, guidance 1)", steps=args.student_steps,
                     forwards_per_step=1, density=1.0, median_ms=median(dense_ms), times_ms=dense_ms,
                     extrapolated=False, peer="baseline denoising"))
    print(f"[{name}] student dense {median(dense_ms):.1f} ms", flush=True)

    # ---------------- student with ASA
    from videoblade.attention import set_adaptive_sparse_attention, unset_adaptive_sparse_attention

    asa_cfg = ASAConfig(pool=spec["pool"])
    if args.tiny:
        asa_cfg.block_size, asa_cfg.samples_per_block, asa_cfg.min_retain, asa_cfg.max_retain = 16, 4, 0.2, 0.5
    asa = set_adaptive_sparse_attention(transformer, asa_cfg)
    t_w = time.perf_counter()
    timer(student_run)  # warm-up: Triton compile/autotune
    warm_s = time.perf_counter() - t_w
    asa.reset_stats()
    sparse_ms = [timer(student_run)[0] for _ in range(args.student_repeats)]
    dens = asa.density_stats(reset=True)
    rows.append(dict(common, what=f"student denoising, ASA ({args.student_steps} steps, guidance 1)", steps=args.student_steps,
                     forwards_per_step=1, density=dens["mean"], median_ms=median(sparse_ms), times_ms=sparse_ms,
                     warmup_s=warm_s, asa=dict(vars(asa_cfg)), extrapolated=False, peer="baseline denoising"))
    print(f"[{name}] student ASA {median(sparse_ms):.1f} ms, density {dens['mean']:.3f} (warm-up {warm_s:.1f} s)",
          flush=True)

    # ---------------- decode settings on the same latents
    settings = [{"dtype": "fp32", "tiling": False, "compile": False},
                {"dtype": "bf16", "tiling": False, "compile": False},
                {"dtype": "fp16", "tiling": False, "compile": False},
                {"dtype": "bf16", "tiling": True, "compile": False}]
    if args.decode_compile:
        settings.append({"dtype": "bf16", "tiling": False, "compile": True})
    if adapter.supports_decode_chunk:  # Wan: the rows above with diffusers' loop, then whole-sequence calls
        for s in settings:
            s["chunk"] = 1
        settings += [dict(s, chunk="all") for s in settings if s["dtype"] == "bf16" and not s["tiling"]]
    # cuDNN's convolution autotuner (torch.backends.cudnn.benchmark, set for the decode only) on
    # the compiled bf16 settings: its first call times the algorithms, the timed calls reuse them
    settings += [dict(s, cudnn_benchmark=True) for s in settings
                 if s["dtype"] == "bf16" and s["compile"] and s.get("chunk") != 1]
    dec_rows = []
    ref = None
    from videoblade.models import parse_dtype

    for s in settings:
        remaining = deadline - time.perf_counter()
        if s["compile"] and remaining < args.compile_budget_s:
            print(f"[{name}] skip decode {s}: {remaining:.0f} s left", flush=True)
            continue
        if remaining < 0 and s is not settings[0] and s is not settings[1]:
            # past the deadline: only the fp32 reference and the eager bf16 decode (the rows below
            # need them), so that the student end to end and the write still fit
            print(f"[{name}] skip decode {s}: past the deadline", flush=True)
            continue
        # the reference decodes with `vae` itself, every other setting with its own copy (freed below)
        v = _configured(vae if s is settings[0] else copy.deepcopy(vae).to(parse_dtype(s["dtype"])), s, adapter)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        try:
            t_first = time.perf_counter()
            _, frames = timer(lambda v=v: adapter.decode(v, latents_for_decode))  # warm-up (compiles)
            first_s = time.perf_counter() - t_first
            if s["compile"]:  # a compiled decoder may still compile on its second call (Wan's whole decoder did)
                timer(lambda v=v: adapter.decode(v, latents_for_decode))
                first_s = time.perf_counter() - t_first
            ts = [timer(lambda v=v: adapter.decode(v, latents_for_decode))[0] for _ in range(args.decode_repeats)]
            per_call = adapter.last_decode_chunk(v)
        except Exception as e:  # noqa: BLE001 - a setting that fails is reported, not fatal
            print(f"[{name}] decode {s} failed: {type(e).__name__}: {e}", flush=True)
            rows.append(dict(common, what="vae decode", setting=s, error=f"{type(e).__name__}: {e}"))
            continue
        finally:
            if v is not vae:
                del v
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if ref is None:
            ref = frames
        same = tuple(frames.shape) == tuple(ref.shape)
        # memory the decode itself adds on top of what was resident (transformer, latents, this VAE)
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
        r = dict(common, what="vae decode", setting=s, median_ms=median(ts), times_ms=ts, first_call_s=first_s,
                 decode_peak_extra_gib=extra, latent_frames_per_call=per_call,
                 psnr_db=psnr(frames, ref) if same else float("nan"), ref_frames_std=float(ref.float().std()),
                 frames_shape=list(frames.shape), peer="vae decode fp32")
        dec_rows.append(r)
        rows.append(r)
        if not same:
            r["error"] = f"output shape {list(frames.shape)} differs from the fp32 decode's {list(ref.shape)}"
        print(f"[{name}] decode {s}: {r['median_ms']:.0f} ms, PSNR {r['psnr_db']:.1f} dB", flush=True)
    ok = [r for r in dec_rows if not math.isnan(r["psnr_db"])]
    choice = choose_decode([{"setting": r["setting"], "median_s": r["median_ms"] / 1e3, "psnr_db": r["psnr_db"]}
                            for r in ok], min_psnr=40.0)
    fp32_ms = next(r["median_ms"] for r in dec_rows if r["setting"] == settings[0])
    choice_ms = choice["median_s"] * 1e3
    for r in dec_rows:  # JSON has no inf: the reference's PSNR against itself is recorded as null
        if math.isinf(r["psnr_db"]):
            r["psnr_db"], r["reference"] = None, True
        elif math.isnan(r["psnr_db"]):
            r["psnr_db"] = None
    if math.isinf(choice["psnr_db"]):
        choice["psnr_db"] = None
    rows.append(dict(common, what="decode_choice", setting=choice["setting"], median_ms=choice_ms,
                     psnr_db=choice["psnr_db"], rule="fastest setting with PSNR > 40 dB against fp32"))

    # ---------------- student end to end (sampler + decode with the chosen setting, one timed region)
    v = vae if choice["setting"] == settings[0] else _configured(
        copy.deepcopy(vae).to(parse_dtype(choice["setting"]["dtype"])), choice["setting"], adapter)

    def student_e2e():
        lat = student_run()
        return adapter.decode(v, lat)

    timer(student_e2e)
    asa.reset_stats()
    e2e_ms = [timer(student_e2e)[0] for _ in range(args.student_repeats)]
    dens_e2e = asa.density_stats(reset=True)["mean"]
    unset_adaptive_sparse_attention(transformer)
    base_e2e = base_denoise_ms + choice_ms
    base_e2e_fp32 = base_denoise_ms + fp32_ms
    rows.append(dict(common, what=f"baseline end to end (denoising + decode {_label(choice['setting'])})",
                     median_ms=base_e2e, extrapolated=True, density=1.0, peer=None))
    rows.append(dict(common, what=f"student end to end (ASA denoising + decode {_label(choice['setting'])})",
                     median_ms=median(e2e_ms), times_ms=e2e_ms, density=dens_e2e, extrapolated=False,
                     peer="baseline end to end"))
    eager_ms = next(r["median_ms"] for r in dec_rows if r["setting"] == settings[1])  # bf16, no compile
    summary = {
        "e2e_speedup": base_e2e / median(e2e_ms),
        # derived from the rows above (sums, not one timed region): both sides with the eager bf16 decode,
        # i.e. without the one-time compile cost a compiled decode needs before it pays
        "e2e_speedup_eager_bf16_decode_derived": (base_denoise_ms + eager_ms) / (median(sparse_ms) + eager_ms),
        "e2e_speedup_vs_fp32_decode_baseline": base_e2e_fp32 / median(e2e_ms),
        "transformer_speedup": base_denoise_ms / median(sparse_ms),
        "step_distillation_speedup": base_denoise_ms / median(dense_ms),
        "asa_speedup_at_8_steps": median(dense_ms) / median(sparse_ms),
        "density": dens["mean"],
        "decode_choice": choice["setting"],
    }

    # ---------------- both sides again with the transformer blocks under torch.compile (regional)
    if args.compile_transformer:
        left = deadline - time.perf_counter()
        if left < args.compile_budget_s:
            print(f"[{name}] skip compiled-transformer rows: {left:.0f} s left", flush=True)
        else:
            try:
                t_c = time.perf_counter()
                adapter.compile_blocks(transformer)
                c_steps = baseline_steps()  # the warm-up step compiles
                c_base_ms = median(c_steps) * args.baseline_steps
                asa = set_adaptive_sparse_attention(transformer, asa_cfg)
                timer(student_e2e)  # recompiles for the ASA processors
                asa.reset_stats()
                c_sparse = [timer(student_run)[0] for _ in range(args.student_repeats)]
                c_e2e = [timer(student_e2e)[0] for _ in range(args.student_repeats)]
                c_dens = asa.density_stats(reset=True)["mean"]
                unset_adaptive_sparse_attention(transformer)
                comp = {"compile": "torch.compile of every transformer block (regional), both sides",
                        "compile_and_warmup_s": time.perf_counter() - t_c}
                rows.append(dict(common, **comp, what="compiled: baseline denoising (dense, CFG)",
                                 steps=args.baseline_steps, density=1.0, median_ms=c_base_ms,
                                 step_median_ms=median(c_steps), step_times_ms=c_steps, extrapolated=True, peer=None))
                rows.append(dict(common, **comp, what="compiled: student denoising, ASA", steps=args.student_steps,
                                 density=c_dens, median_ms=median(c_sparse), times_ms=c_sparse, extrapolated=False,
                                 peer="compiled: baseline denoising"))
                rows.append(dict(common, **comp, what="compiled: student end to end (ASA + decode "
                                 f"{_label(choice['setting'])})", density=c_dens, median_ms=median(c_e2e),
                                 times_ms=c_e2e, extrapolated=False, peer="compiled: baseline end to end"))
                summary["compiled_transformer_speedup"] = c_base_ms / median(c_sparse)
                summary["compiled_e2e_speedup"] = (c_base_ms + choice_ms) / median(c_e2e)
                summary["compile_gain_student_denoising"] = median(sparse_ms) / median(c_sparse)
                summary["compile_gain_baseline_denoising"] = base_denoise_ms / c_base_ms
                print(f"[{name}] compiled: baseline step {median(c_steps):.1f} ms, student ASA "
                      f"{median(c_sparse):.1f} ms, e2e {median(c_e2e):.1f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - reported in the rows, the eager figures stand
                print(f"[{name}] compiled-transformer run failed: {type(e).__name__}: {e}", flush=True)
                rows.append(dict(common, what="compiled-transformer run", error=f"{type(e).__name__}: {e}"))
    rows.append(dict(common, what="summary", **summary))
    print(f"[{name}] e2e {base_e2e / 1e3:.2f} s -> {median(e2e_ms) / 1e3:.2f} s = {summary['e2e_speedup']:.2f}x; "
          f"transformer {summary['transformer_speedup']:.1f}x", flush=True)
    transformer = vae = v = None  # noqa: F841 - free before the next family
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _configured(vae, s: dict, adapter):
    """``configure_vae`` with the decode setting ``s`` (one of run_family's ``settings``)."""
    return configure_vae(vae, s["tiling"], s["compile"], adapter, s.get("chunk", "auto"), s.get("cudnn_benchmark"))


def _label(s: dict) -> str:
    chunk = s.get("chunk")
    return (s["dtype"] + (" tiled" if s.get("tiling") else "") + (" compiled" if s.get("compile") else "")
            + ("" if chunk in (None, 1, "auto") else f", {chunk} latent frames per call")
            + (", cuDNN autotuned" if s.get("cudnn_benchmark") else ""))


def _matched(summary: dict, key: str) -> float:
    """The better of the two like-for-like ratios: both sides eager, or both sides with compiled
    transformer blocks (never a compiled student against an eager baseline)."""
    return max(summary[key], summary.get(f"compiled_{key}", 0.0))


def _write(out: Path, rows: list[dict], summaries: dict, **extra) -> Path:
    targets = {}

    def put(name, summary, key, goal):
        t = target(_matched(summary, key), goal, True)
        for tag in ("measured_at_commit", "measured_at_date"):  # a family carried from an earlier run
            if tag in summary:
                t[tag] = summary[tag]
        targets[name] = t

    if "wan" in summaries:
        put("wan_e2e_speedup", summaries["wan"], "e2e_speedup", 20.0)
        put("wan_transformer_speedup", summaries["wan"], "transformer_speedup", 60.0)
    if "cogvideox" in summaries:
        put("cog_e2e_speedup", summaries["cogvideox"], "e2e_speedup", 12.0)
    return write_results(out.stem, rows, targets, out_dir=out.parent, benchmark="e2e", method=(
        "baseline denoising extrapolated from timed steps x 50 (identical dense steps); student timed whole; "
        "text encoder excluded on both sides (random embeddings); random weights; bf16 transformers; both e2e "
        "figures use the same decode setting; targets: the better of eager-vs-eager and compiled-vs-compiled"), **extra)


def results_path(out: str | None) -> Path:
    """--out: a folder (like the other benchmarks' --out) or, ending in .json, the file itself."""
    name = f"e2e_{gpu_tag()}.json"
    if not out:
        return RESULTS / name
    return Path(out) if out.endswith(".json") else Path(out) / name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="results folder, as the other benchmarks take it (default benchmarks/results; the file "
                        "is e2e_<card>.json there), or a path ending in .json for the file itself")
    p.add_argument("--models", default="wan,cogvideox")
    p.add_argument("--tiny", action="store_true", help="tiny configs at the tiny default size (CPU smoke run)")
    p.add_argument("--baseline-steps", type=int, default=50)
    p.add_argument("--baseline-warmup", type=int, default=1)
    p.add_argument("--baseline-timed-steps", type=int, default=3)
    p.add_argument("--student-steps", type=int, default=8)
    p.add_argument("--student-repeats", type=int, default=2)
    p.add_argument("--decode-repeats", type=int, default=2)
    p.add_argument("--decode-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-transformer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time both sides with the transformer blocks under torch.compile (extra rows)")
    p.add_argument("--compile-budget-s", type=float, default=150.0,
                   help="skip the compiled decode when less time than this is left before --deadline-s")
    p.add_argument("--deadline-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    p.add_argument("--family-min-s", type=float, default=150.0,
                   help="start a model only with at least this much time left before --deadline-s (its eager "
                        "rows alone take about two minutes at full size); a model skipped keeps its --merge-from rows")
    p.add_argument("--merge-from", default=None,
                   help="earlier e2e results JSON: keep its rows for the models this run does not measure")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("full-size e2e needs CUDA; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = time.perf_counter() + args.deadline_s
    specs = {"wan": ("Wan2.1-T2V-1.3B", WAN_1_3B), "cogvideox": ("CogVideoX-5B", COG_5B)}
    out = results_path(args.out)
    path = None
    fams = [m.strip() for m in args.models.split(",") if m.strip()]
    names = {f: (f"tiny-{f}" if args.tiny else specs[f][0]) for f in specs}
    # read (and checked: same card) once, before anything is measured: every write below merges this
    # copy, so a run writing over the file it merges from keeps the models it has not re-measured yet
    merge_src = read_merge_source(args.merge_from) if args.merge_from else None
    new_rows: list[dict] = []
    new_summaries: dict = {}
    skipped: list[str] = []
    rows: list[dict] = []

    def save() -> Path:
        nonlocal rows
        summaries = {}
        rows = []
        if merge_src is not None:
            measured = {names[f] for f in new_summaries}
            rows = carry_over(merge_src, lambda r: r.get("model") not in measured, {})
            for fam, name in names.items():
                summary = [r for r in rows if r.get("model") == name and r.get("what") == "summary"]
                if summary and fam not in new_summaries:
                    summaries[fam] = summary[-1]
        rows += new_rows
        summaries.update(new_summaries)
        return _write(out, rows, summaries, **({"skipped_models": skipped} if skipped else {}))

    for fam in fams:
        name, spec = specs[fam]
        if args.tiny:
            name, spec = f"tiny-{fam}", tiny_spec(fam)
        left = deadline - time.perf_counter()
        if left < args.family_min_s:
            print(f"[{name}] skipped: {left:.0f} s left before the deadline (--family-min-s {args.family_min_s:.0f})",
                  flush=True)
            skipped.append(name)
            continue
        fam_rows = run_family(name, fam, spec, args, device, deadline)
        new_rows += fam_rows
        new_summaries[fam] = fam_rows[-1]
        path = save()  # after every family, so a run cut short keeps what it measured
    if path is None:
        print(f"nothing measured (skipped: {', '.join(skipped) or 'none'}); nothing written", flush=True)
        return 1
    targets = json.loads(path.read_text())["targets"]
    print_table([r for r in rows if r.get("median_ms") is not None], ["model", "what", "density", "median_ms", "psnr_db"])
    print(f"\n{'target':<28}{'value':>10}{'target':>10}")
    for k, v in targets.items():
        print(f"{k:<28}{v['value']:>10.2f}{v['target']:>10.1f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

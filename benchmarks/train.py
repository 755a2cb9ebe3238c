"""TDM training-iteration benchmark: full-size random-weight Wan2.1-T2V-1.3B, 81x480x832, batch 1.

Complete TDM iterations (rollout, fake-score step, generator step; gradient checkpointing, bf16)
through the real entry point (`python -m videoblade.train`), with ASA on (student and fake score
sparse, teacher dense) and off (all dense), both again with every block under torch.compile
(`train.compile`), plus ASA on with separate student/fake bases (the DeepSpeed layout) for the
memory comparison. The target takes the better like-for-like ratio (eager/eager or
compiled/compiled). Every variant runs the same seeds, so the sampled
stages (and rollout depths) are the same step for step.

    python benchmarks/train.py                # one GPU -> benchmarks/results/train_h200.json
    python benchmarks/train.py --smoke        # the same path on the CPU at toy sizes (measures nothing)
    python benchmarks/train.py --variants dense_compiled,asa_compiled --merge-from benchmarks/results/train_h200.json

The model folder holds the published transformer config with random weights (no download), the
flow scheduler (shift 3) and the VAE config (latent shape only); the prompt store holds random
embeddings of the UMT5 shape [512, 4096].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import carry_over, gpu_tag, print_table, print_targets, target, write_results  # noqa: E402

WAN_VAE = {"_class_name": "AutoencoderKLWan", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
           "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}
WAN_SCHED = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
             "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}


def build_folder(root: Path, smoke: bool) -> Path:
    from diffusers import WanTransformer3DModel

    from benchmarks.transformer import WAN_1_3B, WAN_SMOKE

    folder = root / ("wan-smoke" if smoke else "wan-1.3b-random")
    cfg = WAN_SMOKE if smoke else WAN_1_3B
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
        model = WanTransformer3DModel(**cfg).to(torch.float32 if smoke else torch.bfloat16)
    model.save_pretrained(folder / "transformer")
    del model
    from diffusers import AutoencoderKLWan

    vae_cfg = {k: v for k, v in WAN_VAE.items() if not k.startswith("_")}
    if smoke:
        vae_cfg["base_dim"] = 8
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random weights: decode cost only
        vae = AutoencoderKLWan(**vae_cfg)
    vae.save_pretrained(folder / "vae")
    del vae
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN_SCHED))
    return folder


def build_store(root: Path, text_dim: int, length: int) -> Path:
    from videoblade.data import write_prompt_store

    g = torch.Generator().manual_seed(0)
    n = 8
    emb = 0.1 * torch.randn(n, length, text_dim, generator=g)
    neg = 0.1 * torch.randn(1, length, text_dim, generator=g)
    return write_prompt_store(root / "store", [emb], [f"random prompt {i}" for i in range(n)], family="wan",
                              text_max_length=length, negative_embeds=neg, dtype="bf16")


def video_size(smoke: bool) -> tuple[int, int, int]:
    """(height, width, frames) of the benchmarked request; every shape follows from it."""
    return (64, 96, 17) if smoke else (480, 832, 81)


def run_variant(name: str, folder: Path, store: Path, out: Path, steps: int, smoke: bool, overrides: list[str]):
    args = [f"model.path={folder}", f"train.prompt_store={store}", f"train.output_dir={out}",
            f"train.max_train_steps={steps}", "train.train_batch_size=1", "train.gradient_accumulation_steps=1",
            "train.validation_steps=0", "train.report_to=none", f"train.checkpointing_steps={steps}",
            "train.export_comfy=false", "train.resume_from_checkpoint=null", "tdm.cfg=5.0", "tdm.lambda_reg=0.0"]
    h, w, f = video_size(smoke)
    args += [f"model.height={h}", f"model.width={w}", f"model.frames={f}"]
    if smoke:
        args += ["model.dtype=fp32", "model.text_max_length=32",  # the smoke store's length (build_store)
                 "train.mixed_precision='no'", "asa.block_size=16", "asa.pool=8", "asa.samples_per_block=8",
                 "lora.rank=4", "lora.lora_alpha=4"]
    else:
        args += ["model.dtype=bf16", "train.mixed_precision=bf16", "asa.pool=32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if smoke:
        env["OMP_NUM_THREADS"] = "1"
    print(f"--- {name}: {' '.join(overrides)}", flush=True)
    r = subprocess.run([sys.executable, "-m", "videoblade.train", *args, *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-6000:], flush=True)
        return None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    timed = [x["s_per_it"] for x in rows[1:]] or [rows[0]["s_per_it"]]  # step 1: warm-up (autotune, allocator)
    return {"s_per_it": statistics.median(timed), "s_per_it_all": [x["s_per_it"] for x in rows],
            "rollout_depths": [x["rollout_depth"] for x in rows], "peak_memory_gb": summary["peak_memory_gb"],
            "density": statistics.mean([x["density_student"] for x in rows if "density_student" in x] or [1.0]),
            "loss_gen": [x["loss_gen"] for x in rows], "loss_fake": [x["loss_fake"] for x in rows],
            "videos": summary.get("videos", []), "deepspeed": summary["deepspeed"],
            "compiled_graphs": summary.get("compiled_graphs")}


def _variant(row: dict) -> str:
    # rows written before the "variant" field name it in "what": "TDM iteration (<name>), ..."
    return row.get("variant") or row["what"].split("(", 1)[1].split(")", 1)[0]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="TDM iterations per variant (the first is warm-up)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script only")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                    help="results folder (default benchmarks/results); --out as in the other benchmarks")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--merge-from", default=None,
                    help="earlier train results JSON: keep its rows for the variants this run skips")
    return ap


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="vb-train-bench-"))
    folder = build_folder(work, a.smoke)
    from benchmarks.transformer import WAN_1_3B, WAN_SMOKE

    text_dim = (WAN_SMOKE if a.smoke else WAN_1_3B)["text_dim"]
    store = build_store(work, text_dim, 32 if a.smoke else 512)
    variants = [("dense", ["asa.enabled=false"]),
                ("asa", ["asa.enabled=true"]),
                # every block under torch.compile on both sides (train.compile)
                ("dense_compiled", ["asa.enabled=false", "train.compile=true"]),
                ("asa_compiled", ["asa.enabled=true", "train.compile=true"]),
                ("asa_separate_bases", ["asa.enabled=true", "train.share_base=false"]),
                # the DeepSpeed path on one GPU: ZeRO-3, params + optimizer offloaded to the CPU
                # (ds_config.json), plus one validation video through the shared sampler at the end
                ("asa_deepspeed_zero3_offload", ["asa.enabled=true", f"train.deepspeed_config={ROOT / 'ds_config.json'}",
                                                 f"train.validation_steps={a.steps}", "train.num_validation_videos=1"])]
    if a.variants:
        pick = [v.strip() for v in a.variants.split(",")]
        unknown = set(pick) - {n for n, _ in variants}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}")
        variants = [v for v in variants if v[0] in pick]
    res = {name: run_variant(name, folder, store, work / name, a.steps, a.smoke, ov) for name, ov in variants}
    failed = [k for k, v in res.items() if v is None]
    res = {k: v for k, v in res.items() if v is not None}
    from videoblade.models import get_adapter

    shape = [1, *get_adapter("wan").geometry(folder, *video_size(a.smoke)).latent_shape]
    rows = []
    for name, r in res.items():
        rows.append({"what": f"TDM iteration ({name}), Wan2.1-1.3B random weights, grad ckpt, bf16", "variant": name,
                     "shape": shape, "density": r["density"], "pass": "rollout+fake fwd/bwd+generator fwd/bwd",
                     "median_ms": r["s_per_it"] * 1000, "peer": "dense" if name != "dense" else None,
                     "s_per_it": r["s_per_it"], "peak_memory_gb": r["peak_memory_gb"],
                     "rollout_depths": r["rollout_depths"], "s_per_it_all": r["s_per_it_all"],
                     "loss_gen": r["loss_gen"], "loss_fake": r["loss_fake"],
                     "shared_base": "separate" not in name and "deepspeed" not in name, "deepspeed": r["deepspeed"],
                     "compiled_graphs": r.get("compiled_graphs"), "validation_videos": len(r["videos"])})
    if a.merge_from:
        rows = carry_over(a.merge_from, lambda r: _variant(r) not in res, {}) + rows
    sec = {_variant(r): r["s_per_it"] for r in rows}
    # the run each row comes from: this one (None) or the (commit, date) of a carried row
    origin = {_variant(r): (r.get("measured_at_commit"), r.get("measured_at_date")) for r in rows}
    # like for like only: eager against eager, compiled against compiled; the better of the two
    # (a --variants run of one pair only, e.g. the compiled one, still writes its ratio)
    pairs = {"eager": ("dense", "asa"), "compiled": ("dense_compiled", "asa_compiled")}
    ratios = {k: sec[d] / sec[s] for k, (d, s) in pairs.items() if d in sec and s in sec}
    if not ratios:
        raise SystemExit(f"no dense/ASA pair measured (have {sorted(sec)}, failed: {failed})")
    best = max(ratios, key=ratios.get)
    speed = ratios[best]
    targets = {"wan_iteration_speedup_asa_vs_dense": target(speed, 2.5, True)}
    d_run, s_run = (origin[v] for v in pairs[best])
    if d_run != s_run:  # a ratio across two runs (a partial re-run or a failed variant): say so
        targets["wan_iteration_speedup_asa_vs_dense"]["sides_measured_at"] = {
            pairs[best][0]: d_run[0] or "this run", pairs[best][1]: s_run[0] or "this run"}
        print(f"note: the {best} pair's two sides come from different runs: {d_run} / {s_run}")
    memory = {_variant(r): r["peak_memory_gb"] for r in rows}
    print_table(rows, ["what", "density", "median_ms", "peak_memory_gb", "rollout_depths"])
    print_targets(targets)
    if a.smoke:
        print("smoke run: nothing written")
        return 0
    path = write_results(f"train_{gpu_tag()}", rows, targets, out_dir=a.out_dir,
                         notes={"memory_shared_vs_separate_gb": [memory.get("asa"), memory.get("asa_separate_bases")],
                                "speedup_like_for_like": ratios,
                                "peak_memory_gb_deepspeed_includes": "one 81x480x832 VAE decode (fp32) at the last step",
                                "failed_variants": failed,
                                "steps": a.steps, "timed": "median of iterations 2..steps"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

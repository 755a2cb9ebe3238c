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

Each variant is one training process, killed if it is still running at ``--deadline-s`` (default
540 s, inside a 10-minute GPU call); the results file is rewritten after every variant.

The model folder holds the published transformer config with random weights (no download), the
flow scheduler (shift 3) and the VAE config (latent shape only); the prompt store holds random
embeddings of the UMT5 shape [512, 4096].
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    carry_over,
    gpu_tag,
    print_table,
    print_targets,
    read_merge_source,
    target,
    write_results,
)

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


def run_variant(name: str, folder: Path, store: Path, out: Path, steps: int, smoke: bool, overrides: list[str],
                timeout: float | None = None):
    """One variant through ``python -m videoblade.train`` in a fresh ``out`` folder (the trainer appends
    to metrics.jsonl, so a reused --work-dir would mix an earlier run's steps in). None when it fails or
    runs past ``timeout`` seconds (killed, so the rest of the benchmark keeps its time)."""
    shutil.rmtree(out, ignore_errors=True)
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
    try:
        r = subprocess.run([sys.executable, "-m", "videoblade.train", *args, *overrides], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def tail(x, n):  # captured output of a killed run comes back as bytes, whatever text= says
            return (x.decode(errors="replace") if isinstance(x, bytes) else (x or ""))[-n:]

        print(f"--- {name}: killed after {timeout:.0f} s (--deadline-s)", tail(e.stdout, 2000), tail(e.stderr, 4000),
              flush=True)
        return None
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
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="wall-clock budget of the whole run: a variant still running then is killed (and counts as "
                         "failed), so the results are written before an outer time limit")
    ap.add_argument("--variant-min-s", type=float, default=60.0,
                    help="start a variant only with at least this much time left before --deadline-s")
    return ap


def variant_row(name: str, r: dict, shape: list[int]) -> dict:
    return {"what": f"TDM iteration ({name}), Wan2.1-1.3B random weights, grad ckpt, bf16", "variant": name,
            "shape": shape, "density": r["density"], "pass": "rollout+fake fwd/bwd+generator fwd/bwd",
            "median_ms": r["s_per_it"] * 1000, "peer": "dense" if name != "dense" else None,
            "s_per_it": r["s_per_it"], "peak_memory_gb": r["peak_memory_gb"],
            "rollout_depths": r["rollout_depths"], "s_per_it_all": r["s_per_it_all"],
            "loss_gen": r["loss_gen"], "loss_fake": r["loss_fake"],
            "shared_base": "separate" not in name and "deepspeed" not in name, "deepspeed": r["deepspeed"],
            "compiled_graphs": r.get("compiled_graphs"), "validation_videos": len(r["videos"])}


PAIRS = {"eager": ("dense", "asa"), "compiled": ("dense_compiled", "asa_compiled")}


def speed_target(rows: list[dict]) -> tuple[dict, dict]:
    """(targets, like-for-like ratios) from ``rows``: the better of eager/eager and compiled/compiled
    dense over ASA time; empty when no pair is there."""
    sec = {_variant(r): r["s_per_it"] for r in rows}
    # the run each row comes from: this one (None) or the (commit, date) of a carried row
    origin = {_variant(r): (r.get("measured_at_commit"), r.get("measured_at_date")) for r in rows}
    # like for like only: eager against eager, compiled against compiled; the better of the two
    # (a --variants run of one pair only, e.g. the compiled one, still writes its ratio)
    ratios = {k: sec[d] / sec[s] for k, (d, s) in PAIRS.items() if d in sec and s in sec}
    if not ratios:
        return {}, {}
    best = max(ratios, key=ratios.get)
    targets = {"wan_iteration_speedup_asa_vs_dense": target(ratios[best], 2.5, True)}
    d_run, s_run = (origin[v] for v in PAIRS[best])
    if d_run != s_run:  # a ratio across two runs (a partial re-run or a failed variant): say so
        targets["wan_iteration_speedup_asa_vs_dense"]["sides_measured_at"] = {
            PAIRS[best][0]: d_run[0] or "this run", PAIRS[best][1]: s_run[0] or "this run"}
        print(f"note: the {best} pair's two sides come from different runs: {d_run} / {s_run}")
    return targets, ratios


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    deadline = time.perf_counter() + a.deadline_s
    # read (and checked: same card) before the minutes of training; every write merges this copy
    merge_src = read_merge_source(a.merge_from) if a.merge_from else None
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
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="vb-train-bench-"))
    folder = build_folder(work, a.smoke)
    from benchmarks.transformer import WAN_1_3B, WAN_SMOKE
    from videoblade.models import get_adapter

    text_dim = (WAN_SMOKE if a.smoke else WAN_1_3B)["text_dim"]
    store = build_store(work, text_dim, 32 if a.smoke else 512)
    shape = [1, *get_adapter("wan").geometry(folder, *video_size(a.smoke)).latent_shape]
    # the smoke run writes only where --out says (a CPU file must not land beside the GPU results)
    write = not a.smoke or a.out_dir is not None
    new_rows: list[dict] = []
    failed: list[str] = []
    skipped: list[str] = []

    def save():
        """rows (merged), targets, ratios; written after every variant when ``write``, so that a run
        killed at its time limit keeps the variants it finished."""
        done = {_variant(r) for r in new_rows}
        rows = (carry_over(merge_src, lambda r: _variant(r) not in done, {}) if merge_src is not None else []) + new_rows
        targets, ratios = speed_target(rows)
        memory = {_variant(r): r["peak_memory_gb"] for r in rows}
        path = None
        if write and rows:
            path = write_results(f"train_{gpu_tag()}", rows, targets, out_dir=a.out_dir,
                                 notes={"memory_shared_vs_separate_gb": [memory.get("asa"),
                                                                         memory.get("asa_separate_bases")],
                                        "speedup_like_for_like": ratios,
                                        "peak_memory_gb_deepspeed_includes": "one 81x480x832 VAE decode (fp32) at the "
                                                                             "last step",
                                        "failed_variants": failed, "skipped_variants": skipped,
                                        "steps": a.steps, "timed": "median of iterations 2..steps"})
        return path, rows, targets

    path = None
    for name, ov in variants:
        left = deadline - time.perf_counter()
        if left < a.variant_min_s:
            print(f"--- {name}: skipped, {left:.0f} s left before the deadline", flush=True)
            skipped.append(name)
            continue
        r = run_variant(name, folder, store, work / name, a.steps, a.smoke, ov, timeout=left)
        if r is None:
            failed.append(name)
            continue
        new_rows.append(variant_row(name, r, shape))
        path, _, _ = save()
    path, rows, targets = save()
    print_table(rows, ["what", "density", "median_ms", "peak_memory_gb", "rollout_depths"])
    print_targets(targets)
    if path is not None:
        print(f"wrote {path}")
    elif not write:
        print("smoke run: nothing written (--out writes it)")
    if not targets:
        raise SystemExit(f"no dense/ASA pair measured (have {sorted(_variant(r) for r in rows)}, failed: {failed}, "
                         f"skipped: {skipped})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Block-sparse attention benchmark -> benchmarks/results/attention_h200.json (issue 3).

Shapes: Wan (1x12x32760x128) and CogVideoX (1x48x17776x64), bf16, block 128; densities
0.05, 0.10, 0.15, 0.25, 1.0; forward and forward+backward. Peers measured in the same
process: cuDNN SDPA (dense) and compiled FlexAttention with the identical block mask
(``BlockMask.from_kv_blocks`` with every kept block "full"). Compensation (summaries),
multi-level ASA (SPEC 1.6, ``--no-levels`` skips it) and the block-importance estimate are timed
separately.

    python benchmarks/attention.py --out DIR           # full run, writes DIR/attention_h200.json
    python benchmarks/attention.py --quick              # fewer reps/densities (smoke)
    python benchmarks/attention.py --shapes wan --densities 0.15 \
        --merge-from benchmarks/results/attention_h200.json --out DIR   # partial re-run, rest kept
"""
# ruff: noqa: B023  (closures are timed immediately, inside the iteration that defines them)

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    carry_over,
    cuda_median_ms,
    gpu_tag,
    print_table,
    print_targets,
    read_merge_source,
    switched_env,
    target,
    write_results,
)

from videoblade.config import family_asa_pool  # noqa: E402
from videoblade.kernels import (  # noqa: E402
    block_sparse_attention,
    estimate_block_importance,
    mask_to_block_lists,
    num_blocks,
    pool_summaries,
)
from videoblade.kernels.block_sparse import _use_tma, tuned_configs  # noqa: E402

SHAPES = {"wan": (1, 12, 32760, 128), "cog": (1, 48, 17776, 64)}
POOL = {"wan": family_asa_pool("wan"), "cog": family_asa_pool("cogvideox")}  # SPEC 1.5, the adapters' values
DENSITIES = [0.05, 0.10, 0.15, 0.25, 1.0]
BLOCK = 128


def random_block_mask(B, H, n, density, gen, device):
    """Each query block keeps round(density * n) key blocks (>= 1), the diagonal always."""
    keep = max(1, round(density * n))
    scores = torch.rand(B, H, n, n, generator=gen, device=device)
    idx = torch.arange(n, device=device)
    scores[..., idx, idx] = 2.0
    top = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(B, H, n, n, dtype=torch.bool, device=device)
    mask.scatter_(-1, top, True)
    return mask


def make_flex(B, H, L, kvi, kvc, device):
    from torch.nn.attention.flex_attention import BlockMask

    zeros_n = torch.zeros_like(kvc)
    bm = BlockMask.from_kv_blocks(
        zeros_n, torch.zeros_like(kvi), kvc, kvi, BLOCK_SIZE=BLOCK, mask_mod=None, seq_lengths=(L, L)
    )
    return bm


def matmul_tflops(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * 8192**3 / ms / 1e9


def copy_tbps(device):
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = cuda_median_ms(lambda: y.copy_(x), warmup=3, reps=10)
    return 2 * x.numel() / ms / 1e9


def bench_levels(name, q, k, v, fwd_bwd, reps, gen, rows, res):
    """Multi-level ASA (SPEC 1.6) at the ASAConfig defaults (exact 5 %, then 10 % 2x, 15 % 4x and
    20 % 8x pooled; rank bands of a random importance map) with compensation, pooling included:
    its cost density (a pooled block counts 1/pool) is about keep/skip's 0.15-0.16, so compare with
    the "ours + compensation" rows at density 0.15. A failure is printed and recorded as a row, so
    the rest of the run survives it."""
    from videoblade.attention.mask import block_levels, level_density, level_lists
    from videoblade.config import ASAConfig
    from videoblade.kernels import pool_levels

    c = ASAConfig()
    B, H, L, D = q.shape
    n = num_blocks(L, BLOCK)
    pools, pool = list(c.level_pools), POOL[name]
    lev = block_levels(torch.rand(B, H, n, n, device=q.device, generator=gen), c.level_fractions)
    kvi, kvc, pidx, pcnt = level_lists(lev, len(pools))
    cost = level_density(kvc, pcnt, pools, n).mean().item()
    what = f"ours multi-level {'/'.join(f'{p}x' for p in pools)} + compensation (pool {pool}, incl. pooling)"

    def ours_l(a, b, c_):
        return block_sparse_attention(a, b, c_, kvi, kvc, BLOCK, summary=pool_summaries(b, c_, BLOCK, pool),
                                      levels=pool_levels(b, c_, BLOCK, pools, pidx, pcnt))[0]

    for p_, key, f_ in (("fwd", "fwd", lambda: ours_l(q, k, v)), ("fwd+bwd", "fwdbwd", fwd_bwd(ours_l))):
        row = {"what": what, "shape": [B, H, L, D], "density": cost, "pass": p_, "peer": "ours",
               "level_fractions": list(c.level_fractions)}
        if _guarded(rows, row, lambda: {"median_ms": cuda_median_ms(f_, reps=reps)}):
            res[(name, "levels", key)] = row["median_ms"]


def switched_rows(rows: list, row: dict, var: str, val: str, passes, reps: int) -> None:
    """The rows ``row`` (what, shape, density, ...) of each ``(pass, fn)`` in ``passes`` timed with the
    kernel switch ``var=val``: an A/B against the default rows of this run. Nothing when the run
    already has ``var=val`` (its "default" rows are then the switched ones: no A/B to make)."""
    if os.environ.get(var) == val:
        print(f"skip A/B {var}={val}: the whole run has it", flush=True)
        return
    with switched_env(var, val):
        for p_, f_ in passes:
            _guarded(rows, dict(row, **{"pass": p_}), lambda: {"median_ms": cuda_median_ms(f_, reps=reps)})


def merge_key(r: dict) -> tuple:
    """What a row measured, for ``--merge-from``: a new row replaces the old row of the same key.
    Multi-level rows carry their measured cost density, which follows the random importance map and
    so the generator's state (another --densities list gives another value): keyed without it."""
    dens = None if "level_fractions" in r else r.get("density")
    return r["what"], tuple(r.get("shape") or ()), dens, r.get("pass")


def merge_rows(rows: list[dict], source, targets: dict) -> list[dict]:
    """``source``'s rows (a path, or the file as ``read_merge_source`` returned it) that ``rows`` did
    not re-measure, tagged where they were measured, then ``rows``; its targets not in ``targets``
    are added to it (``carry_over``)."""
    redone = {merge_key(r) for r in rows}
    return carry_over(source, lambda r: merge_key(r) not in redone, targets) + rows


def _guarded(rows: list, row: dict, measure) -> bool:
    """Append ``row`` completed with the fields ``measure()`` returns, or with the error it raised (an
    optional row that fails must not end the run; main() exits non-zero at the end). True if it ran."""
    try:
        row.update(measure())
    except Exception as e:  # noqa: BLE001 - reported in the results, the other rows still count
        print(f"{row['what']} ({row['pass']}) failed: {type(e).__name__}: {e}", flush=True)
        row.update(median_ms=float("nan"), error=f"{type(e).__name__}: {e}"[:500])
    rows.append(row)
    return "error" not in row


def bench_shape(name, reps, dens_list, gen, rows, res, flex, t0, levels=True, checkpoint=None):
    """One shape's rows; ``checkpoint()`` (if given) after each density and at the end writes what
    is measured so far (a run killed at its time limit keeps it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    B, H, L, D = SHAPES[name]
    n = num_blocks(L, BLOCK)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    do = torch.randn_like(q)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dense_flops = 4 * B * H * L * L * D

    def fwd_bwd(fn):
        def run():
            qg.grad = kg.grad = vg.grad = None
            out = fn(qg, kg, vg)
            out.backward(do)
        return run

    def switched(var, val, what, fn, dens, real):
        """fn's fwd and fwd+bwd rows with the kernel switch var=val (an A/B against the default rows)."""
        switched_rows(rows, {"what": what, "shape": [B, H, L, D], "density": dens, "peer": "ours",
                             "realized_density": real}, var, val,
                      (("fwd", lambda: fn(q, k, v)), ("fwd+bwd", fwd_bwd(fn))), reps)

    # the TMA A/B flips the default for this head dim (on for Hopper at D=128, else off)
    tma_default = _use_tma(q, k, v)
    tma_flip, tma_what = ("0", "pointer loads (TMA off)") if tma_default else ("1", "TMA descriptor loads")

    # cuDNN dense (falls back to flash SDPA if cuDNN refuses the shape; the row says which)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend, bname = SDPBackend.CUDNN_ATTENTION, "cudnn"
    try:
        with sdpa_kernel([backend]):
            sdpa(q, k, v)
    except RuntimeError as e:  # pragma: no cover - depends on the cuDNN build
        print("cuDNN SDPA refused:", e)
        backend, bname = SDPBackend.FLASH_ATTENTION, "flash"
    with sdpa_kernel([backend]):
        ms = cuda_median_ms(lambda: sdpa(q, k, v), reps=reps)
        res[(name, "cudnn", 1.0, "fwd")] = ms
        rows.append({"what": f"{bname} sdpa dense", "shape": [B, H, L, D], "density": 1.0, "pass": "fwd",
                     "median_ms": ms, "peer": None, "tflops": dense_flops / ms / 1e9})
        ms = cuda_median_ms(fwd_bwd(lambda a, b, c: sdpa(a, b, c)), reps=reps)
        res[(name, "cudnn", 1.0, "fwdbwd")] = ms
        rows.append({"what": f"{bname} sdpa dense", "shape": [B, H, L, D], "density": 1.0, "pass": "fwd+bwd",
                     "median_ms": ms, "peer": None, "tflops": 3.5 * dense_flops / ms / 1e9})

    for dens in dens_list:
        mask = random_block_mask(B, H, n, dens, gen, dev)
        kvi, kvc = mask_to_block_lists(mask)
        real = mask.float().mean().item()
        # FLOPs actually required: kept pairs x tokens (partial last block counted by its size)
        sizes = torch.full((n,), BLOCK, device=dev, dtype=torch.float64)
        sizes[-1] = L - (n - 1) * BLOCK
        pair_tokens = (mask.double() * sizes[:, None] * sizes[None, :]).sum().item()
        flops = 4 * pair_tokens * D
        bm = make_flex(B, H, L, kvi, kvc, dev)

        def ours(a, b, c):
            return block_sparse_attention(a, b, c, kvi, kvc, BLOCK)[0]

        def flx(a, b, c):
            return flex(a, b, c, block_mask=bm)

        # correctness vs flex on the same mask (also proves the masks match)
        with torch.no_grad():
            o1 = ours(q, k, v).float()
            o2 = flx(q, k, v).float()
            rel = ((o1 - o2).norm() / o2.norm()).item()
        for label, fn in (("ours", ours), ("flex", flx)):
            ms = cuda_median_ms(lambda: fn(q, k, v), reps=reps)
            res[(name, label, dens, "fwd")] = ms
            rows.append({"what": f"{label} block-sparse", "shape": [B, H, L, D], "density": dens, "pass": "fwd",
                         "median_ms": ms, "peer": "flex" if label == "ours" else None, "realized_density": real,
                         "tflops": flops / ms / 1e9, "rel_diff_vs_flex": rel if label == "ours" else None})
            ms = cuda_median_ms(fwd_bwd(fn), reps=reps)
            res[(name, label, dens, "fwdbwd")] = ms
            rows.append({"what": f"{label} block-sparse", "shape": [B, H, L, D], "density": dens,
                         "pass": "fwd+bwd", "median_ms": ms, "peer": "flex" if label == "ours" else None,
                         "realized_density": real, "tflops": 3.5 * flops / ms / 1e9})
        res[(name, "realdens", dens)] = real
        # the same kernel with one switch flipped (an A/B in this process), fwd and fwd+bwd
        for var, val, dens_set, what in (
            ("VIDEOBLADE_KERNEL_TMA", tma_flip, (0.10, 0.15, 1.0), tma_what),
            ("VIDEOBLADE_KERNEL_IDS", "load", (0.15, 1.0), "block ids loaded per tile (VIDEOBLADE_KERNEL_IDS"
             "=load, the walk before 10f54af; tile configs tuned for the default)"),
        ):
            if dens in dens_set:
                switched(var, val, f"ours block-sparse, {what}", ours, dens, real)
        if dens in (0.10, 0.15):
            pool = POOL[name]

            def ours_c(a, b, c):
                return block_sparse_attention(a, b, c, kvi, kvc, BLOCK, summary=pool_summaries(b, c, BLOCK, pool))[0]

            ms = cuda_median_ms(lambda: ours_c(q, k, v), reps=reps)
            res[(name, "comp", dens, "fwd")] = ms
            rows.append({"what": f"ours + compensation (pool {pool}, incl. pooling)", "shape": [B, H, L, D],
                         "density": dens, "pass": "fwd", "median_ms": ms, "peer": "ours", "realized_density": real})
            ms = cuda_median_ms(fwd_bwd(ours_c), reps=reps)
            res[(name, "comp", dens, "fwdbwd")] = ms
            rows.append({"what": f"ours + compensation (pool {pool}, incl. pooling)", "shape": [B, H, L, D],
                         "density": dens, "pass": "fwd+bwd", "median_ms": ms, "peer": "ours",
                         "realized_density": real})
            if dens == 0.15:  # the TMA A/B on what ASA runs by default (compensation on)
                switched("VIDEOBLADE_KERNEL_TMA", tma_flip,
                         f"ours + compensation (pool {pool}, incl. pooling), {tma_what}", ours_c, dens, real)
        if dens == 0.10:  # the pooling alone (forward, and forward+backward into k, v)
            pool = POOL[name]
            ms = cuda_median_ms(lambda: pool_summaries(k, v, BLOCK, pool), reps=reps)
            rows.append({"what": f"pool_summaries (pool {pool})", "shape": [B, H, L, D], "density": None,
                         "pass": "fwd", "median_ms": ms, "peer": None})

            def pool_fb():
                kg.grad = vg.grad = None
                s_ = pool_summaries(kg, vg, BLOCK, pool)
                (s_.k.float().sum() + s_.v.float().sum()).backward()

            ms = cuda_median_ms(pool_fb, reps=reps)
            rows.append({"what": f"pool_summaries (pool {pool}) + sum, fwd+bwd", "shape": [B, H, L, D],
                         "density": None, "pass": "fwd+bwd", "median_ms": ms, "peer": None})
        print(f"[{time.time() - t0:6.1f}s] {name} d={dens} done (rel diff vs flex {rel:.2e})", flush=True)
        if checkpoint is not None:
            checkpoint()

    if levels:
        bench_levels(name, q, k, v, fwd_bwd, reps, gen, rows, res)
        if checkpoint is not None:
            checkpoint()

    # block-importance estimate (no grad)
    for mode, S in (("sample", 16), ("mean", 0)):
        ms = cuda_median_ms(lambda: estimate_block_importance(q, k, BLOCK, S or 16, mode=mode), reps=reps)
        res[(name, "estimate", mode)] = ms
        rows.append({"what": f"estimate_block_importance {mode}" + (f" S={S}" if S else ""),
                     "shape": [B, H, L, D], "density": None, "pass": "fwd", "median_ms": ms, "peer": None})
    # A/B: the sampled estimate's key tile (importance._KEY_TILE, which sets its scratch layout)
    from videoblade.kernels import importance

    default_tile = importance._KEY_TILE
    res_est = estimate_block_importance(q, k, BLOCK, 16, mode="sample")

    def with_tile(tile):
        importance._KEY_TILE = tile
        try:
            diff = (estimate_block_importance(q, k, BLOCK, 16, mode="sample") - res_est).abs().max().item()
            ms = cuda_median_ms(lambda: estimate_block_importance(q, k, BLOCK, 16, mode="sample"), reps=reps)
            return {"max_abs_diff_vs_default": diff, "median_ms": ms}
        finally:
            importance._KEY_TILE = default_tile

    for tile in (128,):
        _guarded(rows, {"what": f"estimate_block_importance sample S=16, key tile {tile} (default {default_tile})",
                        "shape": [B, H, L, D], "density": None, "pass": "fwd", "peer": "ours"},
                 lambda: with_tile(tile))
    if checkpoint is not None:
        checkpoint()


def compute_targets(res: dict, shapes) -> dict:
    """The targets from this run's timings ``res`` (keys as bench_shape files them)."""
    targets = {}

    def get(*key):
        return res.get(key)

    for name in shapes:
        cud = get(name, "cudnn", 1.0, "fwd")
        for dens in (0.10, 0.15):
            o = get(name, "ours", dens, "fwd")
            if o and cud and (name == "wan" or dens == 0.10):
                targets[f"{name}_fwd_efficiency_d{dens:.2f}"] = target(cud * get(name, "realdens", dens) / o, 0.75, True)
        for p in ("fwd", "fwdbwd"):
            o, f = get(name, "ours", 0.10, p), get(name, "flex", 0.10, p)
            if o and f:
                targets[f"{name}_{p}_speedup_vs_flex_d0.10"] = target(f / o, 1.3, True)
        # compensation overhead: with-compensation time (pooling included) / without - 1
        for p in ("fwd", "fwdbwd"):
            c, o = get(name, "comp", 0.10, p), get(name, "ours", 0.10, p)
            # goals: Wan's arithmetic share is ~0.31 (1024 summaries vs ~3300 kept keys per row),
            # Cog's ~0.63 (1112 vs ~1780): the goal is that share plus ~0.1-0.2 for pooling
            goal = {("wan", "fwd"): 0.40, ("wan", "fwdbwd"): 0.50, ("cog", "fwd"): 0.80}.get((name, p))
            if c and o and goal is not None:
                targets[f"{name}_comp_overhead_{p}_d0.10"] = target(c / o - 1, goal, False)
    if get("wan", "ours", 1.0, "fwd") and get("wan", "cudnn", 1.0, "fwd"):
        targets["wan_dense_time_ratio_vs_cudnn"] = target(get("wan", "ours", 1.0, "fwd") / get("wan", "cudnn", 1.0, "fwd"),
                                                          1.25, False)
    if get("wan", "ours", 0.15, "fwd"):
        for mode, suffix in (("sample", ""), ("mean", "_mean_mode")):
            if get("wan", "estimate", mode):
                targets[f"wan_estimate_overhead_d0.15{suffix}"] = target(
                    get("wan", "estimate", mode) / get("wan", "ours", 0.15, "fwd"), 0.15, False)
    return targets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="wan,cog")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--densities", default=None, help="comma list overriding the density sweep (partial run)")
    ap.add_argument("--levels", action=argparse.BooleanOptionalAction, default=True,
                    help="also time multi-level ASA (SPEC 1.6) at the config defaults")
    ap.add_argument("--merge-from", default=None,
                    help="an earlier attention_<gpu>.json: its rows this (partial) run did not re-measure (same "
                         "what, shape, density and pass) and its targets not recomputed are kept, tagged with "
                         "the commit and date they were measured at")
    args = ap.parse_args()
    # read (and check: same card) before anything is measured; merged from this copy at every write,
    # even when the run rewrites that same file as it goes
    merge_src = read_merge_source(args.merge_from) if args.merge_from else None
    dev = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    reps = 10 if args.quick else args.reps
    dens_list = [0.10, 1.0] if args.quick else DENSITIES
    if args.densities:
        dens_list = [float(x) for x in args.densities.split(",")]
    shapes = args.shapes.split(",")
    rows = []
    res = {}

    def save():
        """Write the results file with everything measured so far (after every density and shape, so
        a run killed at its time limit keeps what it measured; the last call is the final file)."""
        targets = compute_targets(res, shapes)
        out_rows = merge_rows(rows, merge_src, targets) if merge_src is not None else list(rows)
        path = write_results(f"attention_{gpu_tag()}", out_rows, targets, out_dir=args.out,
                             settings={"block": BLOCK, "dtype": "bfloat16", "reps": reps,
                                       "autotune": os.environ.get("VIDEOBLADE_KERNEL_AUTOTUNE", "1")},
                             tuned_configs=tuned_configs())
        return path, out_rows, targets

    t0 = time.time()
    peak = matmul_tflops(dev)
    bw = copy_tbps(dev)
    rows.append({"what": "ceiling bf16 matmul 8192^3", "shape": [8192, 8192, 8192], "density": None, "pass": "fwd",
                 "median_ms": 2 * 8192**3 / peak / 1e9, "peer": None, "tflops": peak})
    rows.append({"what": "ceiling d2d copy 2 GiB", "shape": [2 * 1024**3], "density": None, "pass": "fwd",
                 "median_ms": 4 * 1024**3 / bw / 1e9, "peer": None, "tb_per_s": bw})
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in shapes:
        bench_shape(name, reps, dens_list, gen, rows, res, flex, t0, levels=args.levels, checkpoint=save)
        torch.cuda.empty_cache()

    path, out_rows, targets = save()
    print_table(out_rows, ["what", "shape", "density", "pass", "median_ms", "tflops", "peer"])
    print_targets(targets)
    for kname, d in tuned_configs().items():
        for key, cfg in d.items():
            print(f"tuned {kname} {key}: {cfg}")
    print("wrote", path)
    if not math.isfinite(sum(r["median_ms"] for r in rows if "error" not in r)):
        raise SystemExit("non-finite timing")
    if any("error" in r for r in rows):
        raise SystemExit("some rows failed (their error is in the results)")


if __name__ == "__main__":
    main()

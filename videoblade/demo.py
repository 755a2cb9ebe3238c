"""`make demo`: an honest miniature of the real job, end to end on a CPU.

    python -m videoblade.demo --out runs/demo            # the full demo (about 10-15 min on 2 CPU cores)
    python -m videoblade.demo --out runs/demo-q --quick  # seconds-scale version of the same pipeline (CI)

No real weights can be had here, so the demo trains its own teacher: a tiny Wan-architecture
transformer (`WanTransformer3DModel`, pixel space, the toy family's decode is the identity) learns
procedural videos of coloured shapes moving over a plain background with flow matching. It is then
distilled by the project's own TDM trainer (`videoblade.distill.trainer`, what
`python -m videoblade.train` runs) to 8 and 4 steps, with adaptive sparse attention in the student
and fake score (BLADE) and without (TDM only), from prompts alone; every method samples with the
shared eta sampler. Precision (distance of samples to the nearest training clip, in units of the
data's own nearest-neighbour spacing; lower is better) and coverage (how many training clips the
samples reach, relative to real draws; higher is better) are measured for the teacher at 50, 8 and
4 steps and for each student.

The run directory receives teacher/ (cached: a second run skips its training), prompts/ (the
prompt store), students/k*_{asa,dense}/ (trainer run folders with LoRAs), summary.json,
table.txt, metrics.png, grid.mp4 and grid.gif. See the README demo section for a measured run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return n


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m videoblade.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (created; a finished teacher there is reused)")
    p.add_argument("--quick", action="store_true", help="seconds-scale version of the same pipeline (CI)")
    p.add_argument("--device", default="cpu", help="torch device for the teacher and the evaluation (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: min(2, cpu count), the demo's reference machine)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    from videoblade.models import device_problem

    problem = device_problem(args.device)
    if problem:  # before anything is built or trained
        p.error(f"--device {args.device!r}: {problem}")
    return args


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """transformers' own bars ("Loading weights", "Writing model shards") and diffusers' follow
    --no-progress too; their global switches are put back afterwards."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libs = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libs:
            lib.enable_progress_bar()


def run(argv: list[str] | None = None) -> dict:
    from videoblade.io.jsonfile import write_json
    from videoblade.toy.pipeline import PROFILES, run_pipeline

    args = _parse(argv)
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    prof = PROFILES["quick" if args.quick else "full"]
    t0 = time.perf_counter()
    with _library_progress_bars(not args.no_progress):
        summary = run_pipeline(args.out, prof, device=args.device, progress=not args.no_progress)
    summary["total_wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(Path(args.out) / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    from videoblade.toy.pipeline import PROFILES, format_table

    summary = run(argv)
    prof = PROFILES[summary["profile"]["name"]]
    out = Path(_parse(argv).out)
    print()
    print(format_table(summary["rows"], prof))
    print()
    for name, g in summary["goals"].items():
        cmp = ">=" if g["higher_is_better"] else "<="
        print(f"goal {name}: {g['value']:.3f} (target {cmp} {g['target']}) {'met' if g['met'] else 'NOT met'}")
    t = summary["timings"]
    print(f"\nwall time {summary['total_wall_s']:.0f} s (" + ", ".join(f"{k} {v['wall_s']:.0f}s" for k, v in t.items())
          + f"); outputs in {out}: summary.json, table.txt, metrics.png, grid.mp4, grid.gif")
    return 0


if __name__ == "__main__":
    sys.exit(main())

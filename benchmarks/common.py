"""Shared helpers for every benchmark in this folder.

- :func:`env_info`: gpu name, torch/triton versions, git commit, date (UTC ISO).
- :func:`cuda_median_ms`: CUDA-event median timer (warm-up, many reps).
- :func:`target`: one entry of the ``targets`` object.
- :func:`write_results`: writes ``benchmarks/results/<name>.json`` (or ``out_dir``) with the
  common top level of DESIGN.md: gpu, torch, triton, commit, date, rows, targets.
- :func:`print_table`: a plain aligned table of rows.

Row format (DESIGN.md): ``{"what", "shape", "density", "pass", "median_ms", "peer", ...}``;
extra keys are allowed. A target's value must be computed from rows of the same run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """Commit of the checkout; ``VIDEOBLADE_COMMIT`` overrides (copies without .git, e.g. a GPU box)."""
    env = os.environ.get("VIDEOBLADE_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def env_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - CPU boxes without triton
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # kernel switches set for the whole run (A/B rows set theirs per row and say so)
        "kernel_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VIDEOBLADE_KERNEL_")},
    }


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly built diffusers model as ``from_pretrained(torch_dtype=dtype)`` leaves it: the
    submodules the class lists in ``_keep_in_fp32_modules`` (Wan: rope, time embedder, norms,
    scale-shift table) keep their float32 parameters and buffers, everything else goes to ``dtype``.
    A plain ``model.to(dtype)`` would also round Wan's rotary tables to bf16, which is not what a
    user loading real weights runs."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, mod in model.named_modules():
        # diffusers' rule: kept when any dotted part of the full parameter/buffer name is listed
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point() and not keep.intersection(f"{name}.{pname}".split(".")):
                p.data = p.data.to(dtype)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and not keep.intersection(f"{name}.{bname}".split(".")):
                setattr(mod, bname, b.to(dtype))
    return model


def gpu_tag() -> str:
    """Short name of the card for result file names: "h200", "h100", ... ("cpu" without CUDA), so
    that runs on different cards land in different files (ratios are only compared within one)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "h20", "a100", "l40s", "b200", "gb200"):
        if tag in name:
            return tag
    return "".join(c for c in name.split()[-1] if c.isalnum()) or "gpu"


def cuda_median_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 30, max_total_ms: float = 4000.0,
                   min_reps: int = 5) -> float:
    """Median time of ``fn()`` in ms, each rep between its own pair of CUDA events.

    ``warmup`` calls first (compilation, autotuning, allocator); the number of reps is cut
    so that about ``max_total_ms`` is spent (never below ``min_reps``). Reps are enqueued back to back
    and synchronised once at the end (as triton's do_bench), so host launch overhead is
    hidden whenever the host keeps ahead of the GPU, as it does in a real model.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    # estimate one call to size the run
    s0, e0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s0.record()
    fn()
    e0.record()
    e0.synchronize()
    n = int(max(min_reps, min(reps, max_total_ms / max(s0.elapsed_time(e0), 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def target(value: float, goal: float, higher_is_better: bool) -> dict:
    return {"value": float(value), "target": float(goal), "higher_is_better": bool(higher_is_better)}


def target_met(t: dict) -> bool:
    return t["value"] >= t["target"] if t["higher_is_better"] else t["value"] <= t["target"]


# the fields DESIGN.md names for every row ("pass" is the forward / backward pass measured)
ROW_FIELDS = ("what", "shape", "density", "pass", "median_ms", "peer")


def complete_row(row: dict) -> dict:
    """A copy of ``row`` holding every field of :data:`ROW_FIELDS` (null where the row does not
    measure it, e.g. a quality row's ``median_ms`` or a decode row's ``density``), so every row of
    every results file can be read the same way."""
    return {**{k: None for k in ROW_FIELDS if k not in row}, **row} if isinstance(row, dict) else row


def write_results(name: str, rows: Sequence[dict], targets: dict | None = None, out_dir: str | os.PathLike | None = None,
                  **extra) -> Path:
    """Write ``<out_dir or benchmarks/results>/<name>.json`` and return its path. Every row gets the
    fields of :data:`ROW_FIELDS` (:func:`complete_row`; the caller's dicts are not changed)."""
    doc = {**env_info(), "rows": [complete_row(r) for r in rows], "targets": dict(targets or {}), **extra}
    d = Path(out_dir) if out_dir is not None else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    # whole or not at all: the benchmarks rewrite this file as they go (often the very file they
    # merged from), and a run killed in the middle of a write must not leave it truncated
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_merge_source(path: str | os.PathLike, gpu: str | None = None) -> dict:
    """The ``--merge-from`` file, read and checked (it exists, is a results file, and was measured
    on this card: ``gpu`` default ``env_info()["gpu"]``). Every benchmark calls it before measuring
    anything, so a wrong path or another card's file costs seconds, not a whole GPU run that would
    only fail when it merges at the end."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--merge-from {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(old, dict) or not isinstance(old.get("rows"), list):
        raise SystemExit(f"--merge-from {path}: not a benchmark results file (no 'rows' list)")
    here = gpu if gpu is not None else env_info()["gpu"]
    if old.get("gpu") not in (None, here):
        raise SystemExit(f"--merge-from {path} was measured on {old['gpu']!r}, this run is on {here!r}: "
                         "merge only files of the same card")
    return old


def carry_over(path: str | os.PathLike | dict, keep: Callable[[dict], bool], targets: dict,
               gpu: str | None = None) -> list[dict]:
    """Rows of an earlier results file that this run did not re-measure (``keep(row)``), each
    tagged with the commit and date it was measured at; targets this run did not recompute are
    copied into ``targets``, tagged alike (a tag already there, from an earlier merge, is kept: it
    names the run that measured it). Lets a benchmark too long for one GPU call be run in parts.

    ``gpu`` (default: this machine's, ``env_info()["gpu"]``): a file measured on another card is
    refused, since its rows and targets would be filed under this run's card. ``path`` may also be
    the file as :func:`read_merge_source` returned it (read once at the start, so that a run which
    rewrites that very file as it goes keeps merging the original)."""
    old = path if isinstance(path, dict) else read_merge_source(path, gpu)

    def tag(x: dict) -> dict:
        x = dict(x)
        x.setdefault("measured_at_commit", old.get("commit"))
        x.setdefault("measured_at_date", old.get("date"))
        return x

    rows = [tag(r) for r in old["rows"] if keep(r)]
    for k, v in old.get("targets", {}).items():
        targets.setdefault(k, tag(v))
    return rows


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return "x".join(str(i) for i in x)
    return "" if x is None else str(x)


def print_table(rows: Iterable[dict], columns: Sequence[str] | None = None) -> None:
    rows = list(rows)
    if not rows:
        return
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_targets(targets: dict) -> None:
    for name, t in targets.items():
        mark = "MET " if target_met(t) else "miss"
        op = ">=" if t["higher_is_better"] else "<="
        print(f"[{mark}] {name}: {t['value']:.3f} (target {op} {t['target']})")


@contextlib.contextmanager
def switched_env(var: str, val: str | None):
    """``var=val`` (``None``: unset) for the block; afterwards the value the run had before (set or
    unset), so that a run started with a kernel switch keeps it for every later row (and its
    ``kernel_env`` is true)."""
    prev = os.environ.get(var)
    if val is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = val
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = prev

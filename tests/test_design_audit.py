"""Checks from an audit of the code against DESIGN.md and SPEC.md (one test per rule found broken)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_results_row_has_the_fields_design_names(tmp_path):
    # DESIGN.md, Benchmarks: `rows` holds one object per measurement with what, shape, density, pass,
    # median ms and peer. Rows that do not measure one of them (a quality row, a decode row without a
    # density, a summary row) still carry the field, as null, so every file reads the same way.
    from benchmarks.common import ROW_FIELDS, write_results

    assert ROW_FIELDS == ("what", "shape", "density", "pass", "median_ms", "peer")
    quality = {"what": "teacher", "variant": "base", "precision": 1.37}
    timed = {"what": "ours", "shape": [1, 2, 256, 64], "density": 0.1, "pass": "fwd", "median_ms": 1.5,
             "peer": "cudnn", "tflops": 3.0}
    path = write_results("audit", [quality, timed], {}, out_dir=tmp_path)
    rows = json.loads(path.read_text())["rows"]
    for row in rows:
        assert set(ROW_FIELDS) <= set(row), row
    assert rows[0]["median_ms"] is None and rows[0]["peer"] is None and rows[0]["precision"] == 1.37
    assert rows[1] == timed  # measured fields are kept as they are
    assert quality == {"what": "teacher", "variant": "base", "precision": 1.37}  # the caller's row is untouched


def test_readme_states_the_cogvideox_compensation_pool_inference_uses(tmp_path):
    # SPEC 1.5: compensation pool 32 for Wan and 16 for CogVideoX. videoblade generate without an ASA
    # file or LoRA metadata uses the ASAConfig defaults with pool 16 on CogVideoX; the README's option
    # table said "the ASAConfig defaults" (pool 32) only.
    from videoblade.inference import build_parser, plan_from_args
    from videoblade.models.tiny import tiny_model_folder

    pools = {}
    for fam in ("wan", "cogvideox"):
        args = build_parser().parse_args(["--model", str(tiny_model_folder(fam)), "--sparse", "--prompt", "x",
                                          "--out", str(tmp_path / fam), "--no-progress"])
        pools[fam] = plan_from_args(args).asa.pool
    assert pools == {"wan": 32, "cogvideox": 16}
    readme = (ROOT / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| `--asa-config`"))
    assert "Wan 32" in row and "CogVideoX 16" in row, row

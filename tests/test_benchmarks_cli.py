"""The benchmark scripts' output flags: `--out` names a results folder in every script."""

from __future__ import annotations

import pytest


def test_e2e_out_is_a_folder_or_a_json_file(tmp_path):
    from benchmarks.common import gpu_tag
    from benchmarks.e2e import RESULTS, results_path

    name = f"e2e_{gpu_tag()}.json"
    assert results_path(None) == RESULTS / name
    assert results_path(str(tmp_path)) == tmp_path / name  # a folder, as attention/transformer/train take it
    assert results_path(str(tmp_path / "x.json")) == tmp_path / "x.json"


def test_train_takes_out_like_the_other_benchmarks(tmp_path):
    from benchmarks.train import parser

    for flag in ("--out", "--out-dir"):
        assert parser().parse_args([flag, str(tmp_path)]).out_dir == str(tmp_path)
    assert parser().parse_args([]).out_dir is None


def test_carry_over_keeps_only_rows_not_remeasured(tmp_path):
    # partial benchmark runs (--merge-from): old rows this run did not redo stay, tagged with where
    # they were measured; targets this run computed win over the old ones
    import json

    from benchmarks.common import carry_over

    old = {"commit": "abc1234", "date": "2026-12-01", "rows": [
        {"what": "a", "median_ms": 1.0}, {"what": "b", "median_ms": 2.0},
        {"what": "c", "median_ms": 3.0, "measured_at_commit": "0000000", "measured_at_date": "2026-11-01"}],
        "targets": {"t_old": {"value": 1.0, "target": 2.0, "higher_is_better": True},
                    "t_new": {"value": 5.0, "target": 2.0, "higher_is_better": True}}}
    old["gpu"] = "NVIDIA H200"
    old["targets"]["t_twice"] = {"value": 3.0, "target": 2.0, "higher_is_better": True,
                                 "measured_at_commit": "0000000", "measured_at_date": "2026-11-01"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    targets = {"t_new": {"value": 9.0, "target": 2.0, "higher_is_better": True}}
    kept = carry_over(path, lambda r: r["what"] != "b", targets, gpu="NVIDIA H200")
    assert [r["what"] for r in kept] == ["a", "c"]
    assert kept[0]["measured_at_commit"] == "abc1234" and kept[0]["measured_at_date"] == "2026-12-01"
    assert kept[1]["measured_at_commit"] == "0000000"  # carried twice: the original measurement stays named
    assert targets["t_new"]["value"] == 9.0 and targets["t_old"]["measured_at_commit"] == "abc1234"
    assert targets["t_twice"]["measured_at_commit"] == "0000000"  # targets keep their first tag too
    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200'"):  # another card's file is refused
        carry_over(path, lambda r: True, {}, gpu="NVIDIA H100 80GB HBM3")


def test_attention_benchmark_takes_merge_from_and_levels_flags():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "attention.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert out.returncode == 0 and "--merge-from" in out.stdout and "--no-levels" in out.stdout

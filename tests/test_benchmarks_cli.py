"""The benchmark scripts' output flags: `--out` names a results folder in every script."""

from __future__ import annotations


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

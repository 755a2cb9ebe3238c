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


# ---------------------------------------------------------------------------------------------
# GPU-only paths of the benchmark scripts, run on the CPU with the CUDA and measuring bits mocked:
# each test fails on the script as it was before the fix it names.

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402


def _results(path, gpu="cpu", commit="old1234", rows=(), targets=None):
    path.write_text(json.dumps({"gpu": gpu, "commit": commit, "date": "2026-12-01T00:00:00+00:00",
                                "rows": list(rows), "targets": targets or {}}))
    return path


def test_write_results_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    # the scripts rewrite their results file as they go, often the file they merged from: a run killed
    # in the middle of a write must leave the previous file whole
    import pathlib

    from benchmarks.common import write_results

    path = tmp_path / "x.json"
    path.write_text('{"rows": ["old"]}\n')
    real = pathlib.Path.write_text

    def killed_mid_write(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)
        raise KeyboardInterrupt  # the time limit's kill, half way through

    monkeypatch.setattr(pathlib.Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        write_results("x", [{"what": "new", "median_ms": 1.0}], {}, out_dir=tmp_path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"rows": ["old"]}


# ---------------------------------------------------------------- attention.py


def test_attention_switched_rows_restore_the_runs_own_switch(monkeypatch):
    # a run started with VIDEOBLADE_KERNEL_TMA=0 flips it to 1 for the A/B rows; every later row must
    # run (and be labelled, kernel_env) with the run's 0 again, not with the default
    import benchmarks.attention as att

    seen = []
    monkeypatch.setattr(att, "cuda_median_ms", lambda fn, reps=30: seen.append(os.environ.get("VIDEOBLADE_KERNEL_TMA"))
                        or 1.0)
    monkeypatch.setenv("VIDEOBLADE_KERNEL_TMA", "0")
    rows = []
    att.switched_rows(rows, {"what": "w", "shape": [1], "density": 0.1}, "VIDEOBLADE_KERNEL_TMA", "1",
                      (("fwd", lambda: None), ("fwd+bwd", lambda: None)), reps=3)
    assert seen == ["1", "1"] and [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    assert os.environ.get("VIDEOBLADE_KERNEL_TMA") == "0"
    # a "switch" to the value the whole run already has is no A/B: no rows
    att.switched_rows(rows, {"what": "w2", "shape": [1], "density": 0.1}, "VIDEOBLADE_KERNEL_TMA", "0",
                      (("fwd", lambda: None),), reps=3)
    assert len(rows) == 2 and os.environ.get("VIDEOBLADE_KERNEL_TMA") == "0"
    monkeypatch.delenv("VIDEOBLADE_KERNEL_TMA")
    att.switched_rows(rows, {"what": "w3", "shape": [1], "density": 0.1}, "VIDEOBLADE_KERNEL_TMA", "1",
                      (("fwd", lambda: None),), reps=3)
    assert "VIDEOBLADE_KERNEL_TMA" not in os.environ


def _attention_main(monkeypatch, argv, bench_shape):
    import benchmarks.attention as att

    monkeypatch.setattr(sys, "argv", ["attention.py", *argv])
    monkeypatch.setattr(att, "matmul_tflops", lambda dev: 1000.0)
    monkeypatch.setattr(att, "copy_tbps", lambda dev: 3.0)

    class CpuTorch:  # the script's torch, with its CUDA generator made on the CPU
        Generator = staticmethod(lambda device=None: torch.Generator())

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(att, "torch", CpuTorch())
    monkeypatch.setattr(att, "bench_shape", bench_shape)
    return att.main()


def _levels_row(dens, p):
    return {"what": "ours multi-level 2x/4x/8x + compensation (pool 32, incl. pooling)", "shape": [1, 12, 32760, 128],
            "density": dens, "pass": p, "peer": "ours", "level_fractions": [0.05, 0.1, 0.15, 0.2], "median_ms": 4.0}


def test_attention_merge_replaces_multilevel_rows_measured_at_another_cost(tmp_path, monkeypatch):
    # a partial re-run (--densities 0.15) draws another random importance map for the multi-level rows,
    # so their cost density differs in the last digits: the old rows must still be replaced, not doubled
    shape = [1, 12, 32760, 128]
    old = _results(tmp_path / "old.json", rows=[
        {"what": "ours block-sparse", "shape": shape, "density": 0.1, "pass": "fwd", "median_ms": 1.4},
        _levels_row(0.1682988852262497, "fwd"), _levels_row(0.1682988852262497, "fwd+bwd")])

    def bench(name, reps, dens_list, gen, rows, res, flex, t0, levels=True, checkpoint=None):
        rows += [{"what": "cudnn sdpa dense", "shape": shape, "density": 1.0, "pass": "fwd", "median_ms": 11.0},
                 {"what": "ours block-sparse", "shape": shape, "density": 0.15, "pass": "fwd", "median_ms": 2.0},
                 _levels_row(0.16791, "fwd"), _levels_row(0.16791, "fwd+bwd")]

    _attention_main(monkeypatch, ["--shapes", "wan", "--densities", "0.15", "--merge-from", str(old),
                                  "--out", str(tmp_path)], bench)
    rows = json.loads((tmp_path / "attention_cpu.json").read_text())["rows"]
    lev = [r for r in rows if "level_fractions" in r]
    assert sorted(r["pass"] for r in lev) == ["fwd", "fwd+bwd"] and all("measured_at_commit" not in r for r in lev)
    kept = [r for r in rows if r["what"] == "ours block-sparse" and r["density"] == 0.1]
    assert len(kept) == 1 and kept[0]["measured_at_commit"] == "old1234"


def test_attention_refuses_another_cards_merge_file_before_measuring(tmp_path, monkeypatch):
    old = _results(tmp_path / "old.json", gpu="NVIDIA H200")

    def bench(*a, **k):
        raise AssertionError("measured before the --merge-from file was checked")

    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200'"):
        _attention_main(monkeypatch, ["--merge-from", str(old), "--out", str(tmp_path)], bench)


# ---------------------------------------------------------------- transformer.py


def _compiled_rows(monkeypatch, head_dim, compile_mode=None):
    """transformer.compiled_rows with CUDA mocked (an H100's capability) and every measurement stubbed;
    returns (rows, VIDEOBLADE_KERNEL_TMA value at every timed call)."""
    import benchmarks.transformer as tr
    from videoblade.config import ASAConfig

    monkeypatch.delenv("VIDEOBLADE_KERNEL_TMA", raising=False)
    monkeypatch.setattr(tr, "SMOKE", False)
    monkeypatch.setattr(tr, "DEVICE", "cpu")
    monkeypatch.setattr(tr, "COMPILE_MODE", compile_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    seen = []

    def timer(fn, warmup, reps, min_reps, max_total_ms):
        seen.append(os.environ.get("VIDEOBLADE_KERNEL_TMA"))
        return 1.0

    asa = types.SimpleNamespace(reset_stats=lambda: None, density_stats=lambda: {"mean": 0.2, "layers": {}},
                                cfg=ASAConfig(pool=16))
    monkeypatch.setattr(tr, "_timer", timer)
    monkeypatch.setattr(tr, "_adapter", lambda fam: types.SimpleNamespace(compile_blocks=lambda m, mode=None: 0))
    monkeypatch.setattr(tr, "set_adaptive_sparse_attention", lambda m, c: asa)
    monkeypatch.setattr(tr, "unset_adaptive_sparse_attention", lambda m: None)
    monkeypatch.setattr(tr, "kernel_breakdown", lambda label, fwd, model, shape: {"what": f"{label}: kernels"})
    monkeypatch.setattr(tr, "lora_rows", lambda *a: [])
    model = types.SimpleNamespace(config=types.SimpleNamespace(attention_head_dim=head_dim))
    rows = tr.compiled_rows("cog", "CogVideoX-5B", model, lambda: torch.ones(4), "s", torch.ones(4), ASAConfig(),
                            3, 10.0)
    return rows, seen


@pytest.mark.parametrize("head_dim,flip", [(64, "1"), (128, "0")])
def test_transformer_tma_ab_flips_the_default_of_the_models_head_dim(monkeypatch, head_dim, flip):
    # TMA is on by default only at head dim 128 (Hopper): CogVideoX's A/B must force it on, or both
    # sides run the same kernel
    rows, seen = _compiled_rows(monkeypatch, head_dim)
    ab = [r for r in rows if ": A/B " in r["what"]]
    assert len(ab) == 1 and ab[0]["peer"] == f"VIDEOBLADE_KERNEL_TMA={flip}"
    assert set(seen[-8:]) == {None, flip}  # alternating rounds: default, switched


def test_transformer_tma_ab_skipped_when_cuda_graphs_replay(monkeypatch):
    # under reduce-overhead the replayed graph holds the kernels launched at capture: no switch reaches them
    rows, _ = _compiled_rows(monkeypatch, 128, compile_mode="reduce-overhead")
    assert not [r for r in rows if ": A/B " in r["what"]]


def _transformer_main(monkeypatch, argv):
    import benchmarks.transformer as tr

    for k, v in (("SMOKE", False), ("DEVICE", "cuda"), ("COMPILE_MODE", None)):  # main sets them
        monkeypatch.setattr(tr, k, v)
    monkeypatch.setattr(sys, "argv", ["transformer.py", *argv])
    return tr.main()


def test_transformer_merge_keeps_the_parts_this_run_skipped(tmp_path, monkeypatch):
    # --no-compile --only wan: the old compiled Wan rows (and the A/B) were not re-measured: kept, tagged
    import benchmarks.transformer as tr

    def row(what, dens=1.0, ms=100.0):
        return {"what": what, "density": dens, "median_ms": ms}

    old_rows = [row("attn_error Wan shape: raster order", None, None),
                row("Wan2.1-1.3B forward, dense (cuDNN SDPA)", 1.0, 640.0),
                row("Wan2.1-1.3B forward, ASA defaults", 0.15, 380.0),
                row("Wan2.1-1.3B forward, dense, compiled blocks", 1.0, 517.0),
                row("Wan2.1-1.3B forward, ASA defaults, compiled blocks", 0.15, 248.0),
                row("Wan2.1-1.3B forward, ASA defaults, compiled blocks: A/B VIDEOBLADE_KERNEL_TMA=0 against the "
                    "default", 0.15, 248.0),
                row("CogVideoX-5B forward, ASA defaults", 0.15, 500.0),
                row("profile Wan: dense cuDNN attention", 1.0, 11.0)]
    old = _results(tmp_path / "old.json", rows=old_rows)
    new = [row("Wan2.1-1.3B forward, dense (cuDNN SDPA)", 1.0, 600.0), row("Wan2.1-1.3B forward, ASA defaults", 0.15, 300.0)]
    monkeypatch.setattr(tr, "forward_rows", lambda *a, **k: [dict(r) for r in new])
    _transformer_main(monkeypatch, ["--smoke", "--only", "wan", "--no-compile", "--skip-error", "--skip-profile",
                                    "--merge-from", str(old), "--out", str(tmp_path)])
    got = {r["what"]: r for r in json.loads((tmp_path / "transformer_cpu.json").read_text())["rows"]}
    assert set(got) == {r["what"] for r in old_rows}
    assert got["Wan2.1-1.3B forward, ASA defaults"]["median_ms"] == 300.0
    assert "measured_at_commit" not in got["Wan2.1-1.3B forward, ASA defaults"]
    for what in got:
        if "compiled" in what or what.startswith(("CogVideoX", "attn_error", "profile")):
            assert got[what]["measured_at_commit"] == "old1234", what


def test_transformer_refuses_another_cards_merge_file_before_measuring(tmp_path, monkeypatch):
    import benchmarks.transformer as tr

    old = _results(tmp_path / "old.json", gpu="NVIDIA H200")

    def measured(*a, **k):
        raise AssertionError("measured before the --merge-from file was checked")

    monkeypatch.setattr(tr, "error_rows", measured)
    monkeypatch.setattr(tr, "forward_rows", measured)
    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200'"):
        _transformer_main(monkeypatch, ["--smoke", "--merge-from", str(old), "--out", str(tmp_path)])


# ---------------------------------------------------------------- e2e.py


def _e2e_rows(model, ms):
    return [{"model": model, "what": "student end to end", "median_ms": ms},
            {"model": model, "what": "summary", "e2e_speedup": 10.0, "transformer_speedup": 50.0}]


def test_e2e_run_cut_short_keeps_the_merged_rows_of_models_not_yet_measured(tmp_path, monkeypatch):
    # --merge-from the very file the run writes (the usual partial re-run): killed during CogVideoX, the
    # file written after Wan must still hold the old CogVideoX rows
    import benchmarks.e2e as e2e

    path = _results(tmp_path / "e2e_cpu.json", rows=_e2e_rows("tiny-wan", 5.0) + _e2e_rows("tiny-cogvideox", 7.0))

    def run_family(name, family, spec, args, device, deadline):
        if family == "cogvideox":
            raise KeyboardInterrupt  # the time limit
        return _e2e_rows(name, 4.0)

    monkeypatch.setattr(e2e, "run_family", run_family)
    with pytest.raises(KeyboardInterrupt):
        e2e.main(["--tiny", "--models", "wan,cogvideox", "--out", str(tmp_path), "--merge-from", str(path)])
    doc = json.loads(path.read_text())
    got = {(r["model"], r["what"]): r for r in doc["rows"]}
    assert got[("tiny-wan", "student end to end")]["median_ms"] == 4.0
    assert got[("tiny-cogvideox", "student end to end")]["median_ms"] == 7.0
    assert got[("tiny-cogvideox", "summary")]["measured_at_commit"] == "old1234"
    assert doc["targets"]["cog_e2e_speedup"]["measured_at_commit"] == "old1234"
    assert len(doc["rows"]) == 4


def test_e2e_does_not_start_a_model_it_cannot_finish_before_the_deadline(tmp_path, monkeypatch):
    import benchmarks.e2e as e2e

    def run_family(*a, **k):
        raise AssertionError("started with no time left")

    monkeypatch.setattr(e2e, "run_family", run_family)
    assert e2e.main(["--tiny", "--models", "wan", "--deadline-s", "60", "--out", str(tmp_path)]) == 1
    assert not (tmp_path / "e2e_cpu.json").exists()


# ---------------------------------------------------------------- train.py


def _train_main(tmp_path, monkeypatch, argv, run_variant):
    import benchmarks.train as train
    import videoblade.models

    monkeypatch.setattr(train, "build_folder", lambda work, smoke: work / "model")
    monkeypatch.setattr(train, "build_store", lambda work, dim, length: work / "store")
    geom = types.SimpleNamespace(geometry=lambda folder, *size: types.SimpleNamespace(latent_shape=(16, 21, 60, 104)))
    monkeypatch.setattr(videoblade.models, "get_adapter", lambda fam: geom)
    monkeypatch.setattr(train, "run_variant", run_variant)
    return train.main(["--work-dir", str(tmp_path / "work"), *argv])


def _variant_result(s=2.0):
    return {"s_per_it": s, "s_per_it_all": [9.0, s, s], "rollout_depths": [1, 2, 3], "peak_memory_gb": 10.0,
            "density": 0.2, "loss_gen": [0.0], "loss_fake": [0.0], "videos": [], "deepspeed": False,
            "compiled_graphs": None}


def test_train_writes_what_it_measured_without_a_dense_asa_pair(tmp_path, monkeypatch):
    # e.g. --variants asa_separate_bases (the memory comparison) alone: minutes of GPU time, then the
    # missing pair used to end the run before anything was written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit, match="no dense/ASA pair"):
        _train_main(tmp_path, monkeypatch, ["--variants", "asa_separate_bases", "--out", str(tmp_path)],
                    lambda *a, **k: _variant_result())
    rows = json.loads((tmp_path / "train_h100.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["asa_separate_bases"]


def test_train_refuses_another_cards_merge_file_before_training(tmp_path, monkeypatch):
    old = _results(tmp_path / "old.json", gpu="NVIDIA H200")

    def run_variant(*a, **k):
        raise AssertionError("trained before the --merge-from file was checked")

    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200'"):
        _train_main(tmp_path, monkeypatch, ["--smoke", "--merge-from", str(old)], run_variant)


def test_train_variant_reads_only_its_own_steps(tmp_path, monkeypatch):
    # the trainer appends to metrics.jsonl: a --work-dir reused from an earlier run mixed its steps in
    import subprocess

    import benchmarks.train as train

    out = tmp_path / "dense"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"s_per_it": 99.0, "rollout_depth": 0, "loss_gen": 0.0,
                                                   "loss_fake": 0.0}) + "\n")

    def fake_train(cmd, **kw):
        out.mkdir(exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            for s in (5.0, 1.0, 1.0):
                f.write(json.dumps({"s_per_it": s, "rollout_depth": 1, "loss_gen": 0.0, "loss_fake": 0.0}) + "\n")
        (out / "summary.json").write_text(json.dumps({"peak_memory_gb": 1.0, "deepspeed": False}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(train.subprocess, "run", fake_train)
    r = train.run_variant("dense", tmp_path, tmp_path, out, 3, True, [])
    assert r["s_per_it_all"] == [5.0, 1.0, 1.0] and r["s_per_it"] == 1.0


def test_train_skips_variants_past_the_deadline(tmp_path, monkeypatch):
    calls = []

    def run_variant(name, *a, timeout=None):
        calls.append((name, timeout))
        return _variant_result()

    with pytest.raises(SystemExit, match="no dense/ASA pair"):
        _train_main(tmp_path, monkeypatch, ["--smoke", "--variants", "dense,asa", "--deadline-s", "30"], run_variant)
    assert calls == []
    _train_main(tmp_path, monkeypatch, ["--smoke", "--variants", "dense,asa", "--deadline-s", "500"], run_variant)
    assert [c[0] for c in calls] == ["dense", "asa"] and all(0 < c[1] <= 500 for c in calls)

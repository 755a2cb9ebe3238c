"""`make demo` end to end at CI size (`--quick`): toy data -> teacher -> the project's TDM trainer
with ASA -> shared sampler -> metrics, plot, video grid; and distillation must pay off."""

from __future__ import annotations

import json

import pytest

from videoblade.io.video import read_video


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import contextlib
    import io
    import os

    from videoblade import demo

    out = tmp_path_factory.mktemp("demo") / "run"
    tqdm_env = os.environ.get("TQDM_DISABLE")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = demo.run(["--out", str(out), "--quick", "--no-progress"])
    # --no-progress hides the bars (teacher, trainer, sampling) without leaving TQDM_DISABLE set
    # for whatever runs next in the process (it did, and hid later subprocesses' bars)
    assert "TDM:" not in err.getvalue() and "teacher (flow matching)" not in err.getvalue()
    assert os.environ.get("TQDM_DISABLE") == tqdm_env
    # and the libraries' own bars (transformers loading and saving the text encoder), switched back on after
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    assert "Loading weights" not in err.getvalue() and "Writing model shards" not in err.getvalue()
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.is_progress_bar_enabled()
    return out, summary


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_run):
    from videoblade import demo

    out, summary = quick_run

    # the run directory: teacher folder, prompt store, trainer runs, report files
    assert (out / "teacher" / "teacher.json").is_file()
    assert (out / "teacher" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "prompts" / "manifest.json").read_text())["family"] == "toy"
    student_dirs = sorted(p.name for p in (out / "students").iterdir())
    assert student_dirs and all(d.endswith(("_asa", "_dense")) for d in student_dirs)
    for d in student_dirs:
        run = out / "students" / d
        assert (run / "pytorch_lora_weights.safetensors").is_file()
        s = json.loads((run / "summary.json").read_text())
        assert s["finished"] and s["family"] == "toy" and s["skipped_fake_steps"] < s["fake_steps"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "grid.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    grid = read_video(out / "grid.mp4")
    assert grid.ndim == 4 and grid.shape[0] >= 5 and grid.std() > 5
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]

    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["data"]["coverage"] == 1.0
    # the fresh draws of the factor grid are exact clips: they follow their prompts in colour and motion
    assert rows["data"]["colour_ok"] == 1.0 and rows["data"]["motion_ok"] == 1.0
    assert all(0.0 <= r["colour_ok"] <= 1.0 and 0.0 <= r["motion_ok"] <= 1.0 for r in summary["rows"])
    assert "motion" in (out / "table.txt").read_text().splitlines()[0]
    teachers = sorted(r["steps"] for r in summary["rows"] if r["method"] == "teacher")
    assert len(teachers) >= 2
    # the teacher learned the data: its samples carry the prompt's colour (measured 0.88-0.90 in
    # --quick; noise or a blank clip scores 0.25, chance among the four colours)
    for steps in teachers:
        assert rows[f"teacher_{steps}"]["colour_ok"] > 0.5, rows[f"teacher_{steps}"]
    students = [r for r in summary["rows"] if r["method"] == "blade"]
    assert students
    for r in students:
        assert 0.0 < r["density"] < 1.0  # ASA really skipped blocks
        assert 0.0 <= r["precision"] and 0.0 <= r["coverage"]
        # distillation spreads the few-step samples over more of the data than the teacher's own
        # few-step samples reach (measured: coverage 0.773 vs 0.636 at 4 steps in --quick)
        teacher_same = rows[f"teacher_{r['steps']}"]
        assert r["coverage"] > teacher_same["coverage"], (r, teacher_same)
    assert set(summary["goals"]) and all("value" in g for g in summary["goals"].values())

    # a second run reuses the cached teacher and the finished students
    again = demo.run(["--out", str(out), "--quick", "--no-progress"])
    assert again["teacher"]["trained_this_run"] is False
    assert again["timings"]["teacher"]["wall_s"] < 5
    assert [r["precision"] for r in again["rows"]] == [r["precision"] for r in summary["rows"]]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 7's CI check 'distillation improves precision over the teacher at the "
                   "same step count' does not hold for the toy teacher: its own 4-step blur is as close to the data "
                   "in L2 as its 50-step samples (see the README demo section); strict, so it fails loudly once it holds")
def test_distillation_improves_precision_at_equal_steps(quick_run):
    _, summary = quick_run
    rows = {r["name"]: r for r in summary["rows"]}
    for r in summary["rows"]:
        if r["method"] == "blade":
            assert r["precision"] < rows[f"teacher_{r['steps']}"]["precision"]


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_summary_json_is_strict_json(tmp_path, monkeypatch):
    # a student whose last fake-score step was skipped has a NaN loss in its trainer record, which
    # the summary copies: json.dumps wrote it as a bare NaN, which jq / JavaScript / pandas refuse
    import torch

    from videoblade import demo
    from videoblade.toy import pipeline

    def fake_run_pipeline(out, prof, device="cpu", progress=True):
        return {"profile": prof.to_dict(), "rows": [{"name": "blade_4", "precision": float("nan"), "density": 0.2}],
                "students": {"k4_asa": {"last": {"loss_fake": float("nan"), "loss_gen": float("inf")}}},
                "goals": {}, "timings": {}}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    out = tmp_path / "run"
    out.mkdir()
    demo.run(["--out", str(out), "--quick", "--threads", str(torch.get_num_threads())])
    s = _strict_loads((out / "summary.json").read_text())
    assert s["rows"][0]["precision"] is None and s["rows"][0]["density"] == 0.2
    assert s["students"]["k4_asa"]["last"] == {"loss_fake": None, "loss_gen": None}
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no temporary file left behind


@pytest.mark.parametrize("threads", ["0", "-1", "two"])
def test_bad_thread_count_is_refused(threads, capsys):
    # --threads 0 silently meant "the default", a negative count failed inside torch
    from videoblade import demo

    with pytest.raises(SystemExit):
        demo._parse(["--threads", threads])
    assert "--threads" in capsys.readouterr().err
    assert demo._parse(["--threads", "3"]).threads == 3


def test_unusable_device_is_refused_before_any_work(capsys):
    # it failed with a traceback from inside torch once the teacher folder had been built
    import torch

    from videoblade import demo

    bad = ["foo"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit):
            demo._parse(["--device", device])
        assert f"--device '{device}'" in capsys.readouterr().err
    assert demo._parse(["--device", "cpu"]).device == "cpu"


def _copy_package(dst):
    import shutil
    from pathlib import Path

    import videoblade

    src = Path(videoblade.__file__).resolve().parent
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _touch(path):
    path.write_text(path.read_text() + "\n# edited\n")


def test_teacher_stamp_follows_the_teacher_code_and_settings(tmp_path, monkeypatch):
    from dataclasses import replace

    from videoblade.toy import pipeline

    root = _copy_package(tmp_path / "videoblade")
    monkeypatch.setattr(pipeline, "_PACKAGE_ROOT", root)
    prof = pipeline.PROFILES["quick"]
    base = pipeline.teacher_stamp(prof)
    assert pipeline.teacher_stamp(prof) == base and base["code"]["torch"]
    # code that does not train the teacher (the evaluation, the report, another family)
    for name in ("toy/metrics.py", "demo.py", "models/cogvideox.py", "distill/trainer.py"):
        _touch(root / name)
        assert pipeline.teacher_stamp(prof) == base, name
    # code that does, and its settings
    assert pipeline.teacher_stamp(replace(prof, teacher=replace(prof.teacher, steps=401))) != base
    _touch(root / "toy" / "teacher.py")
    assert pipeline.teacher_stamp(prof) != base


def test_student_cache_is_reused_only_when_nothing_changed(tmp_path, monkeypatch):
    from videoblade.distill import trainer
    from videoblade.toy import pipeline

    root = _copy_package(tmp_path / "videoblade")
    monkeypatch.setattr(pipeline, "_PACKAGE_ROOT", root)
    trained = []

    def fake_train(cfg, progress=True):  # what the trainer leaves in its run folder
        from pathlib import Path

        out = Path(cfg.train.output_dir)
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
        summary = {"step": cfg.train.max_train_steps, "finished": True}
        (out / "summary.json").write_text(json.dumps(summary))
        trained.append(cfg.train.output_dir)
        return summary

    monkeypatch.setattr(trainer, "train", fake_train)
    prof = pipeline.PROFILES["quick"]
    folder = tmp_path / "teacher"
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"teacher weights")
    out = tmp_path / "run"

    def distill():
        run_dir, summary = pipeline.distill(out, prof, folder, tmp_path / "store", {"t": 1}, 4, True, False)
        assert summary["finished"]
        return run_dir

    run_dir = distill()
    assert len(trained) == 1
    distill()
    assert len(trained) == 1  # reused
    # a stamp cut short by a killed run: trained again (json.loads raised on it)
    stamp = run_dir / "demo_stamp.json"
    stamp.write_text(stamp.read_text()[:20])
    distill()
    assert len(trained) == 2
    # the LoRA gone: trained again (the evaluation would fail on it)
    (run_dir / "pytorch_lora_weights.safetensors").unlink()
    distill()
    assert len(trained) == 3
    # code that does not train students: reused; the trainer's code, or the teacher's weights: trained again
    _touch(root / "toy" / "metrics.py")
    distill()
    assert len(trained) == 3
    _touch(root / "distill" / "trainer.py")
    distill()
    assert len(trained) == 4
    weights.write_bytes(b"other teacher weights")
    distill()
    assert len(trained) == 5
    assert not list(run_dir.glob(".*tmp"))


def test_grid_labels_keep_the_method_on_one_line():
    # the grid's label split at the first ", ", inside "teacher (dense, CFG 2)": "teacher (dense" / "CFG 2), 50 steps"
    from PIL import Image, ImageDraw

    from videoblade.toy.pipeline import PROFILES, grid_label

    prof = PROFILES["full"]
    labels = [grid_label({"method": "teacher", "steps": 50, "density": None}, prof),
              grid_label({"method": "blade", "steps": 4, "density": 0.216}, prof),
              grid_label({"method": "data", "steps": None, "density": None}, prof)]
    assert labels == ["teacher (dense, CFG 2)\n50 steps", "student TDM + ASA\n4 steps (density 0.22)",
                      "data (fresh draws of the factor grid)"]
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    assert all(draw.multiline_textbbox((4, 0), t)[2] < 190 for t in labels)  # inside the label column

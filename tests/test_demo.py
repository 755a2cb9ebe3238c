"""The tiny demo runs end to end and writes its run directory."""

from __future__ import annotations

import json

import numpy as np

from videoblade.config import load_config
from videoblade.io.video import read_video


def test_demo_writes_run_dir(tmp_path):
    from videoblade import demo

    out = tmp_path / "run"
    summary = demo.run(["--out", str(out), "--model-dir", str(tmp_path / "models"), "--no-progress",
                        "sample.steps=3", "model.frames=5", "model.height=32", "model.width=32"])
    assert {p.name for p in out.iterdir()} >= {"video.mp4", "summary.json", "config.yaml"}

    written = json.loads((out / "summary.json").read_text())
    assert written["shapes"]["latent_shape"] == [4, 2, 4, 4] and written["shapes"]["token_grid"] == [2, 2, 2]
    assert written["settings"]["steps"] == 3 and written["latent_stats"]["finite"]
    assert set(written["timings_s"]) >= {"load_s", "sample_s", "decode_s"}
    assert written == json.loads(json.dumps(summary))

    video = read_video(out / "video.mp4")
    assert video.shape == (5, 32, 32, 3) and video.std() > 1.0

    cfg = load_config(out / "config.yaml")  # the resolved config reloads
    assert (cfg.model.frames, cfg.model.height, cfg.model.width, cfg.sample.steps) == (5, 32, 32, 3)
    assert cfg.model.family == "tiny-wan" and cfg.model.path == written["model_folder"]

    # same seed, same video (the tiny model folder is reused from the cache)
    again = demo.run(["--out", str(tmp_path / "run2"), "--model-dir", str(tmp_path / "models"), "--no-progress",
                      "sample.steps=3", "model.frames=5", "model.height=32", "model.width=32"])
    assert again["latent_stats"] == summary["latent_stats"]
    assert np.array_equal(read_video(tmp_path / "run2" / "video.mp4"), video)

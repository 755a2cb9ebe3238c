"""Video IO: mp4 written through imageio-ffmpeg reads back with the right frame count, size and content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from videoblade.io.video import read_video, to_uint8_frames, video_info, write_gif, write_video


def smooth_clip(f: int, h: int, w: int) -> np.ndarray:
    """A moving gradient (compresses well, so decoded pixels stay close to the originals)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([(xx * 4 + 12 * i) % 256, (yy * 6) % 256, np.full_like(xx, 40 + 20 * i)], -1)
              for i in range(f)]
    return np.stack(frames).astype(np.uint8)


@pytest.mark.parametrize("f, h, w", [(9, 32, 48), (17, 64, 96), (1, 16, 16)], ids=["9x32x48", "17x64x96", "1frame"])
def test_mp4_roundtrip(tmp_path, f, h, w):
    clip = smooth_clip(f, h, w)
    path = tmp_path / "sub" / "v.mp4"
    assert write_video(path, clip, fps=8) == (h, w)
    back = read_video(path)
    assert back.shape == (f, h, w, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(np.int16) - clip).mean() < 6.0  # lossy, but the content is there
    info = video_info(path)
    assert info["frames"] == f and (info["height"], info["width"]) == (h, w) and info["fps"] == pytest.approx(8.0)


def test_frames_stay_in_order(tmp_path):
    # each frame a different flat grey level: the decoded order must match
    levels = np.linspace(20, 235, 7).astype(np.uint8)
    clip = np.broadcast_to(levels[:, None, None, None], (7, 16, 32, 3)).copy()
    write_video(tmp_path / "g.mp4", clip, fps=4)
    back = read_video(tmp_path / "g.mp4").reshape(7, -1).mean(1)
    assert np.all(np.abs(back - levels) < 4) and np.all(np.diff(back) > 0)


def test_odd_size_padded_not_resized(tmp_path):
    clip = smooth_clip(5, 33, 47)
    assert write_video(tmp_path / "o.mp4", clip) == (34, 48)
    back = read_video(tmp_path / "o.mp4")
    assert back.shape == (5, 34, 48, 3)
    assert np.abs(back[:, :33, :47].astype(np.int16) - clip).mean() < 6.0


def test_inputs_torch_float_and_batch(tmp_path):
    clip = torch.from_numpy(smooth_clip(5, 16, 16)).float() / 255.0
    assert to_uint8_frames(clip[None]).shape == (5, 16, 16, 3)
    write_video(tmp_path / "t.mp4", clip[None])
    assert read_video(tmp_path / "t.mp4").shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        to_uint8_frames(np.zeros((5, 16, 16)))


def test_gif(tmp_path):
    import imageio.v3 as iio

    clip = smooth_clip(6, 20, 30)
    write_gif(tmp_path / "a.gif", clip, fps=10)
    back = iio.imread(tmp_path / "a.gif")
    assert back.shape[:3] == (6, 20, 30)


def test_write_is_atomic_and_failures_raise(tmp_path):
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # no temporary file left
    (tmp_path / "dir.mp4").mkdir()  # the target is a folder: an error, not a silent success
    with pytest.raises(OSError):
        write_video(tmp_path / "dir.mp4", frames)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "b.mp4", frames, fps=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "dir.mp4"]


def _spy_ffmpeg_paths(monkeypatch) -> list:
    """The paths write_video hands ffmpeg (its temporary files), recorded as it writes."""
    import imageio_ffmpeg

    seen = []
    real = imageio_ffmpeg.write_frames

    def spy(path, *a, **k):
        seen.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", spy)
    return seen


def test_long_names_and_temporary_files(tmp_path, monkeypatch):
    """A name of up to NAME_MAX (255 bytes) is written (the temporary name beside it must not be longer),
    and the temporary file is never a '.mp4' a scorer listing the folder would take for a video (a run
    killed by SIGTERM, as a job scheduler's time limit does, leaves it behind)."""

    frames = smooth_clip(3, 16, 16)
    name = "é" * 122 + "-4.mp4"  # 250 bytes
    assert len(name.encode()) == 250
    assert write_video(tmp_path / name, frames) == (16, 16)
    assert read_video(tmp_path / name).shape == (3, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]

    seen = _spy_ffmpeg_paths(monkeypatch)
    write_video(tmp_path / "a cat-0.mp4", frames)
    assert len(seen) == 1 and not seen[0].lower().endswith((".mp4", ".gif", ".jpg", ".png"))
    assert video_info(tmp_path / "a cat-0.mp4")["frames"] == 3


def test_temporary_names_differ_for_names_sharing_a_prefix(tmp_path, monkeypatch):
    """Two eval-folder names that agree in their first 64 bytes (long prompts that differ at the end) get
    different temporary files, so two writers in one process (threads) cannot write into the same one."""
    seen = _spy_ffmpeg_paths(monkeypatch)
    frames = smooth_clip(2, 16, 16)
    common = "a" * 80
    for name in (common + " red-0.mp4", common + " blue-0.mp4"):
        write_video(tmp_path / name, frames)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(len(Path(p).name.encode()) <= 255 for p in seen)

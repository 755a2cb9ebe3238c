"""Frames to mp4 (H.264, yuv420p) and GIF, and an mp4 reader; frames are uint8 [F, H, W, 3].

mp4 goes through imageio-ffmpeg's bundled ffmpeg, so no system ffmpeg is needed. yuv420p needs
even sizes: an odd height or width is padded by one replicated row/column (never resized), so
every pixel of the input is kept exactly where it was; `write_video` returns the written size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = ["to_uint8_frames", "write_video", "read_video", "write_gif", "video_info"]


def to_uint8_frames(frames) -> np.ndarray:
    """Accept uint8 [F, H, W, 3] (torch or numpy; a leading batch of 1 is squeezed), or float in
    [0, 1]; return a C-contiguous uint8 numpy array [F, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.dtype == torch.bfloat16:
            frames = frames.float()
        frames = frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating):
            frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        else:
            raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.shape[0] < 1:
        raise ValueError("no frames to write")
    return np.ascontiguousarray(frames)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def write_video(path: str | Path, frames, fps: float = 16, crf: int = 18) -> tuple[int, int]:
    """Write an H.264 mp4 (yuv420p, plays everywhere). Returns the written (height, width).

    Written to a temporary file beside ``path`` and renamed when ffmpeg has finished, so a scorer
    never reads a half-written video; imageio-ffmpeg does not report ffmpeg's exit status, so a
    missing or empty result raises here instead of passing for a video. The temporary name is short
    (any ``path`` name up to the file system's 255 bytes works) and does not end in ``.mp4``: one left
    behind by a killed run is not taken for a video by a scorer that lists the folder."""
    import imageio_ffmpeg

    path = Path(path)
    if not float(fps) > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = _pad_even(to_uint8_frames(frames))
    _, h, w, _ = frames.shape
    stem = path.stem.encode("utf-8")[:64].decode("utf-8", errors="ignore")
    # the full name's hash, the process and the thread: names sharing their first 64 bytes, or written by
    # two threads at once, never share a temporary file
    tag = hashlib.sha1(path.name.encode("utf-8")).hexdigest()[:8]
    tmp = path.with_name(f".{stem}.{tag}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=float(fps), codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-movflags", "+faststart", "-f", "mp4"],
        )
        writer.send(None)  # start the generator
        for frame in frames:
            writer.send(frame)
        writer.close()
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError(f"ffmpeg wrote no video for {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return h, w


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video file to uint8 [F, H, W, 3]."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def video_info(path: str | Path) -> dict:
    """{"frames", "height", "width", "fps"} of a video file (decodes it to count frames exactly)."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    n = sum(1 for _ in gen)
    w, h = meta["size"]
    return {"frames": n, "height": h, "width": w, "fps": float(meta.get("fps", 0.0))}


def write_gif(path: str | Path, frames, fps: float = 16, loop: int = 0) -> Path:
    """Write an animated GIF (for READMEs and notebooks)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8_frames(frames)
    iio.imwrite(path, frames, extension=".gif", duration=1000.0 / float(fps), loop=loop)
    return path

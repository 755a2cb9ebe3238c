"""Files written whole or not at all: a temporary file beside the target, renamed over it when
complete. A run killed while writing leaves the old file (or none), never a truncated one that
every later reader (a resume, a scorer, the next run's cache check) would fail on."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file in ``path``'s folder, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    replace_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_file_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, atomically."""
    from safetensors.torch import save_file

    replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

"""JSON files other tools read (summaries, stamps, metrics lines): strict JSON, written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

from videoblade.io.atomic import write_text_atomic


def strict_json(obj):
    """obj with every non-finite float as None, tuples as lists: json.dumps writes NaN / Infinity
    bare, which is not JSON (jq, JavaScript and pandas' strict readers reject it). A trainer's
    record holds a NaN loss when a fake-score step was skipped."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    """Strict JSON (see strict_json), written atomically (:mod:`videoblade.io.atomic`)."""
    write_text_atomic(path, json.dumps(strict_json(obj), indent=2, allow_nan=False))

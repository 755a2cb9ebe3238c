"""Model adapters: one per family (`wan`, `cogvideox`); `tiny` builds tiny diffusers folders of both."""

from videoblade.models.base import (
    ALL_COMPONENTS,
    LoadedModel,
    ModelAdapter,
    ModelInfo,
    ModelRequestError,
    VideoGeometry,
    attach_schedule,
    device_problem,
    family_of_folder,
    get_adapter,
    parse_decode_chunk,
    parse_dtype,
    schedule_of,
    unwrap_model,
)
from videoblade.models.cogvideox import CogVideoXAdapter
from videoblade.models.wan import WanAdapter

__all__ = [
    "ALL_COMPONENTS",
    "CogVideoXAdapter",
    "LoadedModel",
    "ModelAdapter",
    "ModelInfo",
    "ModelRequestError",
    "VideoGeometry",
    "WanAdapter",
    "attach_schedule",
    "device_problem",
    "family_of_folder",
    "get_adapter",
    "parse_decode_chunk",
    "parse_dtype",
    "schedule_of",
    "unwrap_model",
]

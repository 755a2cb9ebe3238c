"""Prompt-embedding store (safetensors shards + manifest), its distributed sampler, prompt encoding
and the default prompt lists (`prompts/train.txt`, `prompts/val.txt`)."""

from pathlib import Path

from videoblade.data.encode import encode_prompt_file, encode_prompts_to_store
from videoblade.data.prompt_store import (
    DistributedPromptSampler,
    PromptStore,
    PromptStoreError,
    read_prompt_file,
    write_prompt_store,
)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_TRAIN_PROMPTS = PROMPTS_DIR / "train.txt"
DEFAULT_VAL_PROMPTS = PROMPTS_DIR / "val.txt"

__all__ = [
    "DEFAULT_TRAIN_PROMPTS",
    "DEFAULT_VAL_PROMPTS",
    "DistributedPromptSampler",
    "PROMPTS_DIR",
    "PromptStore",
    "PromptStoreError",
    "encode_prompt_file",
    "encode_prompts_to_store",
    "read_prompt_file",
    "write_prompt_store",
]

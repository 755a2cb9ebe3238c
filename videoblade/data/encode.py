"""Encode a prompt file with a model folder's own text encoder into a prompt store.

    from videoblade.data import encode_prompt_file
    encode_prompt_file("models/Wan2.1-T2V-1.3B-Diffusers", "videoblade/data/prompts/train.txt", "runs/prompts-wan")

The embeddings are exactly what the family's diffusers pipeline feeds the transformer
(`ModelAdapter.encode_prompts`), so the trainer never loads the text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from videoblade.data.prompt_store import (
    STORE_DTYPES,
    PromptStoreError,
    check_store_target,
    read_prompt_file,
    write_prompt_store,
)

__all__ = ["encode_prompt_file", "encode_prompts_to_store"]


def encode_prompts_to_store(model_path: str | Path, prompts: list[str], out_dir: str | Path, *,
                            text_max_length: int | None = None, dtype: str = "bf16", negative_prompt: str = "",
                            batch_size: int = 8, shard_size: int = 1024, device: str | None = None,
                            progress: bool = True) -> Path:
    from videoblade.models import device_problem, get_adapter

    model_path = Path(model_path)
    adapter = get_adapter(model_path)  # reads configs only; raises ModelRequestError with a fix
    adapter.check_components(model_path, ("text_encoder", "tokenizer"))
    if not prompts:
        raise PromptStoreError("no prompts to encode")
    if batch_size < 1 or shard_size < 1:
        raise PromptStoreError("batch_size and shard_size must be >= 1")
    out_dir = Path(out_dir)
    check_store_target(out_dir)
    # everything checked before the (multi-GB) text encoder loads
    if dtype not in STORE_DTYPES:
        raise PromptStoreError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    family_len = adapter.text_max_length(model_path)
    max_len = int(text_max_length) if text_max_length is not None else int(family_len)
    if max_len < 1:
        raise PromptStoreError(f"text_max_length must be >= 1, got {max_len}")
    if adapter.family.replace("tiny-", "") == "cogvideox" and max_len != family_len:
        raise PromptStoreError(f"CogVideoX takes exactly {family_len} text tokens (its max_text_seq_length), "
                               f"got text_max_length {max_len}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(device)
    if problem:
        raise PromptStoreError(f"device {device!r} is not available here: {problem}")
    enc_dtype = encoder_dtype(dtype, device)
    loaded = adapter.load(model_path, dtype=enc_dtype, device=device, components=("text_encoder", "tokenizer"))

    def batches():
        it = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="encoding prompts", unit="batch")
        for i in it:
            yield adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, prompts[i:i + batch_size],
                                         max_length=max_len).float().cpu()

    neg = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, [negative_prompt], max_length=max_len)
    return write_prompt_store(out_dir, batches(), prompts, family=adapter.family, text_max_length=max_len,
                              negative_embeds=neg.float().cpu(), negative_prompt=negative_prompt, dtype=dtype,
                              shard_size=shard_size, model_path=str(model_path))


def encoder_dtype(store_dtype: str, device) -> torch.dtype:
    """The dtype the text encoder computes in for a store of ``store_dtype``: float32 on the CPU (bf16
    matmuls are slow there), else the store's dtype, except fp16: T5 encoders overflow in fp16 (the
    reason the pipelines run them in bf16 or fp32), so an fp16 store is computed in bf16 and cast."""
    from videoblade.models import parse_dtype

    if torch.device(device).type == "cpu":
        return torch.float32
    dt = parse_dtype(store_dtype)
    return torch.bfloat16 if dt == torch.float16 else dt


def encode_prompt_file(model_path: str | Path, prompts_file: str | Path, out_dir: str | Path, **kwargs) -> Path:
    """Encode every prompt of `prompts_file` (one per line) into a prompt store at `out_dir`."""
    return encode_prompts_to_store(model_path, read_prompt_file(prompts_file), out_dir, **kwargs)

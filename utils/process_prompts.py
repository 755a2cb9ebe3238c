"""Encode a prompt text file (one prompt per line) into a prompt store for TDM training.

    python utils/process_prompts.py --model /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompts videoblade/data/prompts/train.txt --out runs/prompts-wan

The model folder's own text encoder and tokenizer are used (the trainer never loads them);
the store also holds the teacher's CFG negative-prompt embedding (`--negative_prompt`, default "") and
records its text in manifest.json: the trainer refuses a run whose `tdm.negative_prompt` differs from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videoblade.data import DEFAULT_TRAIN_PROMPTS, PromptStoreError, encode_prompt_file  # noqa: E402
from videoblade.models import ModelRequestError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local diffusers model folder (Wan2.1 or CogVideoX)")
    ap.add_argument("--prompts", default=str(DEFAULT_TRAIN_PROMPTS), help="text file, one prompt per line")
    ap.add_argument("--out", required=True, help="output folder of the prompt store")
    ap.add_argument("--max_length", type=int, default=None, help="text tokens (default: the family's, Wan 512 / CogVideoX 226)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="stored dtype")
    ap.add_argument("--negative_prompt", default="", help="the teacher's CFG negative prompt (the run's tdm.negative_prompt must be the same text)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--shard_size", type=int, default=1024, help="prompts per safetensors shard")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    a = ap.parse_args(argv)
    try:
        out = encode_prompt_file(a.model, a.prompts, a.out, text_max_length=a.max_length, dtype=a.dtype,
                                 negative_prompt=a.negative_prompt, batch_size=a.batch_size,
                                 shard_size=a.shard_size, device=a.device)
    except (PromptStoreError, ModelRequestError) as e:  # a request that cannot work: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prompt store written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

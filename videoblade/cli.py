"""The `videoblade` command: `videoblade generate ...` (inference) and `videoblade train ...` (TDM).

    videoblade generate --model ckpt/Wan2.1-T2V-1.3B-Diffusers --lora runs/wan/pytorch_lora_weights.safetensors \
        --prompt "a corgi surfing a wave at sunset" --out runs/samples
    videoblade generate --model ckpt/Wan2.1-T2V-1.3B-Diffusers --baseline --prompt-file prompts.txt \
        --eval-dir runs/eval
    videoblade train --config wanx/configs/tdm_asa.yaml model.path=... train.prompt_store=... train.max_train_steps=300

`generate` is `videoblade.inference.main` (also `python utils/inference.py`); `train` hands its
arguments to `videoblade.train.main`.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = """usage: videoblade {generate,train} ...

commands:
  generate   sample videos from a distilled student or the dense baseline (mp4 + JSON report)
  train      TDM + ASA distillation (python -m videoblade.train)

`videoblade <command> --help` shows a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        from videoblade.inference import main as generate_main

        return int(generate_main(rest, prog="videoblade generate") or 0)
    if cmd == "train":
        try:
            from videoblade.train import main as train_main
        except ImportError as e:
            print(f"error: the trainer is not available in this installation ({e})", file=sys.stderr)
            return 2
        return int(train_main(rest) or 0)
    print(f"error: unknown command {cmd!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

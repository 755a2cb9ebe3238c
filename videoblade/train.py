"""Entry point: `python -m videoblade.train --config X.yaml key=value ...` (or under `accelerate launch`).

Loads the typed config (YAML + dotted overrides), validates the whole request (model folder, sizes,
prompt store, output dir, DeepSpeed JSON) before any weights load, and runs TDM distillation
(`videoblade.distill.trainer`). Outputs land in `train.output_dir`.
"""

from __future__ import annotations

import argparse
import sys

from videoblade.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m videoblade.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config (e.g. wanx/configs/tdm_asa.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.path=/models/wan train.max_train_steps=10")
    args = ap.parse_intermixed_args(argv)  # the launch scripts append the user's arguments after their overrides
    from videoblade.distill.trainer import TrainRequestError, train

    try:
        cfg = load_config(args.config, args.overrides, require=("model.path", "train.prompt_store"))
        summary = train(cfg)
    except (ConfigError, TrainRequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    close_process_group()
    print(f"done: step {summary['step']}/{summary['max_train_steps']}, LoRA: {summary['loras'].get('student', '-')}")
    return 0


def close_process_group() -> None:
    """Destroy the default process group once a run has finished.

    Left to interpreter exit, gloo's worker threads can be torn down after the interpreter and
    abort a finished run with SIGABRT ("terminate called without an active exception",
    pytorch/pytorch#190489): seen once in the 2-process gloo test. Only after success, as
    torchtitan does: after an error another rank may still wait in a collective, and destroying
    the group there can hang instead of exiting."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

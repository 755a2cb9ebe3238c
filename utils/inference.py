"""Sample videos from a distilled Video-BLADE student (8 steps, sparse attention) or the dense baseline.

Thin entry point; the logic lives in `videoblade.inference` (same options as `videoblade generate`):

    python utils/inference.py --model ckpt/Wan2.1-T2V-1.3B-Diffusers \
        --lora runs/wan/pytorch_lora_weights.safetensors --prompt "a red fox in fresh snow" --out runs/samples
    python utils/inference.py --model ckpt/Wan2.1-T2V-1.3B-Diffusers --baseline --prompt-file prompts.txt \
        --eval-dir runs/eval            # -> runs/eval/wan_videos/baseline/<prompt>-0.mp4

Run `python utils/inference.py --help` for every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from videoblade.inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="utils/inference.py"))

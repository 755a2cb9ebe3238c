"""The tiny end-to-end demo: build a tiny Wan model folder, sample a clip, write mp4 + JSON.

    python -m videoblade.demo --out runs/demo [--family wan|cogvideox] [key=value ...]

Everything runs on CPU in seconds: the tiny model is a real diffusers-layout folder with random
weights (built once and cached, see `videoblade.models.tiny`), loaded through the model adapter,
sampled with the shared few-step eta sampler (`videoblade.sampling.sample`) and decoded by its
VAE. Random weights give coloured noise, not a picture: the demo shows that the whole path
(configs -> adapter -> sampler -> VAE -> mp4) works. The run directory receives `video.mp4`,
`summary.json` (settings, timings, shapes) and `config.yaml` (the resolved config).
Overrides use the `videoblade.config.RunConfig` keys, e.g. `sample.steps=4 model.frames=9`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEFAULT_PROMPT = "a red robot walking through a city street at night, camera view"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m videoblade.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="run directory (created)")
    p.add_argument("--family", default="wan", choices=("wan", "cogvideox"), help="tiny model architecture")
    p.add_argument("--model-dir", default=None,
                   help="where the tiny model folder is built/cached (default: $VIDEOBLADE_CACHE or ~/.cache/videoblade)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny model's random weights")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (videoblade.config.RunConfig keys)")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    from videoblade.config import dump_config, load_config, to_dict
    from videoblade.io.video import write_video
    from videoblade.models import get_adapter
    from videoblade.models.tiny import tiny_model_folder
    from videoblade.sampling import sample

    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    folder = tiny_model_folder(args.family, seed=args.model_seed, cache_dir=args.model_dir)
    timings["build_or_reuse_model_s"] = time.perf_counter() - t0

    adapter = get_adapter(folder)
    base = [f"model.family=tiny-{adapter.family}", f"model.path={folder}", "model.dtype=fp32",
            f"train.output_dir={out}"]
    cfg = load_config(None, base + list(args.overrides))
    m, s = cfg.model, cfg.sample
    if s.sampler != "tdm":
        raise SystemExit("the demo samples with the shared eta sampler: sample.sampler must be tdm")

    # every check (family, files, size) runs before any weights are read
    geometry = adapter.geometry(folder, m.height, m.width, m.frames)
    m.height, m.width, m.frames = geometry.height, geometry.width, geometry.frames
    m.text_max_length = m.text_max_length or adapter.text_max_length(folder)
    dump_config(cfg, out)

    t0 = time.perf_counter()
    comps = adapter.load(folder, dtype=m.dtype, device="cpu",
                         components=("transformer", "vae", "text_encoder", "tokenizer"))
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    embeds = adapter.encode_prompts(comps.text_encoder, comps.tokenizer, [args.prompt], m.text_max_length)
    negative = None
    if s.guidance != 1.0:
        negative = adapter.encode_prompts(comps.text_encoder, comps.tokenizer, [cfg.tdm.negative_prompt],
                                          m.text_max_length)
    timings["encode_prompt_s"] = time.perf_counter() - t0

    generator = torch.Generator("cpu").manual_seed(s.seed)
    t0 = time.perf_counter()
    latents = sample(adapter, comps.transformer, comps.schedule, embeds, geometry, steps=s.steps, eta=s.eta,
                     generator=generator, guidance=s.guidance, negative_embeds=negative,
                     progress=not args.no_progress, desc=f"sampling ({s.steps} steps)")
    timings["sample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    frames = adapter.decode(comps.vae, latents)[0]  # uint8 [F, H, W, 3]
    timings["decode_s"] = time.perf_counter() - t0

    video = out / "video.mp4"
    t0 = time.perf_counter()
    written_hw = write_video(video, frames, fps=s.fps)
    timings["write_video_s"] = time.perf_counter() - t0

    summary = {
        "what": "tiny random-weight model sampled end to end (configs -> adapter -> sampler -> VAE -> mp4)",
        "family": adapter.family,
        "model_folder": str(folder),
        "prompt": args.prompt,
        "settings": {"steps": s.steps, "eta": s.eta, "guidance": s.guidance, "seed": s.seed, "fps": s.fps,
                     "dtype": m.dtype, "text_max_length": m.text_max_length},
        "shapes": {
            "request": {"height": geometry.height, "width": geometry.width, "frames": geometry.frames},
            "latent_shape": list(geometry.latent_shape),
            "token_grid": list(geometry.token_grid),
            "video_tokens": geometry.video_tokens,
            "text_tokens": geometry.text_tokens,
            "prompt_embeds": list(embeds.shape),
            "frames": list(frames.shape),
            "video_written_hw": list(written_hw),
        },
        "latent_stats": {"mean": float(latents.mean()), "std": float(latents.std()),
                         "finite": bool(torch.isfinite(latents).all())},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "files": {"video": video.name, "config": "config.yaml", "summary": "summary.json"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": "cpu", "threads": torch.get_num_threads()},
        "config": to_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = run(argv)
    t = summary["timings_s"]
    sh = summary["shapes"]
    print(f"wrote {Path(summary['config']['train']['output_dir']) / 'video.mp4'}: "
          f"{sh['frames'][0]} frames {sh['frames'][1]}x{sh['frames'][2]}, latents {sh['latent_shape']}, "
          f"tokens {sh['token_grid']}; sample {t['sample_s']:.2f}s, decode {t['decode_s']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

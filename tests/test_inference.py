"""Inference (`videoblade generate` / utils/inference.py) on a tiny Wan folder with a LoRA from a real
tiny TDM training run: mp4s that read back at the requested size, a complete JSON report, both
LoRA layouts, sparse and dense, the eval-dir layout, per-prompt failure isolation, and every
request error raised with its message before any weights load."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videoblade import cli
from videoblade.inference import (
    InferenceError,
    build_parser,
    choose_decode,
    compare_decode,
    configure_vae,
    inspect_lora,
    main,
    plan_from_args,
    psnr,
    sanitize_prompt,
    video_filename,
)
from videoblade.io.lora import read_lora, save_lora
from videoblade.io.video import read_video
from videoblade.models.tiny import tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
H, W, FRAMES = 64, 96, 9  # tiny folder: latent 4x3x8x12, token grid 3x4x6 = 72 tokens
ASA_YAML = "asa:\n  block_size: 16\n  samples_per_block: 4\n  pool: 4\n  min_retain: 0.2\n  max_retain: 0.4\n"


@pytest.fixture(scope="module")
def tiny_wan():
    return tiny_model_folder("wan")


@pytest.fixture(scope="module")
def trained(tiny_wan, tmp_path_factory):
    """A LoRA from a real (one-step) TDM + ASA training run on the tiny Wan model."""
    from videoblade.data import encode_prompts_to_store
    from videoblade.train import main as train_main

    root = tmp_path_factory.mktemp("train")
    encode_prompts_to_store(tiny_wan, ["a red fox in snow", "a boat at dawn"], root / "store", progress=False)
    rc = train_main([f"model.path={tiny_wan}", f"train.prompt_store={root / 'store'}",
                     f"train.output_dir={root / 'run'}", "train.max_train_steps=1", "train.train_batch_size=1",
                     "train.gradient_accumulation_steps=1", "train.validation_steps=0", "train.report_to=none",
                     "train.mixed_precision='no'", "train.gradient_checkpointing=false", "train.checkpointing_steps=1",
                     "model.height=32", "model.width=48", "model.frames=5", "model.dtype=fp32", "lora.rank=4",
                     "lora.lora_alpha=4", "tdm.k_step=2", "asa.block_size=16", "asa.samples_per_block=4",
                     "asa.pool=4", "optim.lr_warmup_steps=0"])
    assert rc == 0
    run = root / "run"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "lora_comfy.safetensors").is_file()
    # the student moved away from the base (B != 0 after one step): the LoRA changes the outputs
    sd = read_lora(run / "pytorch_lora_weights.safetensors").state_dict
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_B" in k)
    return run


@pytest.fixture(scope="module")
def asa_yaml(tmp_path_factory):
    p = tmp_path_factory.mktemp("asa") / "asa.yaml"
    p.write_text(ASA_YAML)
    return p


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Every weight/tokenizer load raises, so an error test proves its check came first."""
    import diffusers
    import transformers

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"{name}.from_pretrained was called before the request was validated")
        return classmethod(f) if name != "AutoTokenizer" else staticmethod(f)

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", forbid("ModelMixin"))
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbid("PreTrainedModel"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbid("AutoTokenizer"))


def _common(tiny_wan, *extra):
    return ["--model", str(tiny_wan), "--height", str(H), "--width", str(W), "--frames", str(FRAMES),
            "--steps", "2", "--no-progress", *extra]


def _check_video(path: Path, frames=FRAMES, height=H, width=W):
    assert path.is_file(), path
    v = read_video(path)
    assert v.shape == (frames, height, width, 3), v.shape
    assert v.dtype.name == "uint8" and v.std() > 0  # decoded content, not a constant frame


SETTINGS_KEYS = {"model", "family", "method", "lora", "height", "width", "frames", "latent_shape", "token_grid",
                 "steps", "guidance", "sampler", "eta", "flow_shift", "negative_prompt", "attention", "asa", "seed",
                 "num_videos_per_prompt", "dtype", "vae_dtype", "vae_tiling", "vae_chunk", "device", "fps",
                 "text_max_length"}


def _check_report(report: dict, n_videos: int):
    assert SETTINGS_KEYS <= set(report["settings"])
    assert report["environment"]["torch"] == torch.__version__
    assert report["timings"]["load_s"] > 0
    vids = [v for e in report["prompts"] for v in e["videos"]]
    assert len(vids) == n_videos
    for e in report["prompts"]:
        if "error" not in e:
            assert e["text_encoding_s"] > 0
    for v in vids:
        if "error" in v:
            continue
        assert v["denoising_s"] > 0 and v["decoding_s"] > 0
        assert v["decode_frames_per_call"] == 1  # "auto" on the CPU: diffusers' own loop
        assert 0 < v["density"] <= 1
        assert (v["frames"], v["height"], v["width"]) == (FRAMES, H, W)
    s = report["summary"]
    assert s["videos"] == n_videos and s["ok"] + s["failed"] == n_videos and s["complete"] is True
    assert s["mean_denoising_s"] > 0 and s["mean_decoding_s"] > 0 and s["mean_text_encoding_s"] > 0


# ---------------------------------------------------------------------------- runs
def test_blade_sparse_eval_dir(tiny_wan, trained, asa_yaml, tmp_path):
    """Student LoRA (diffusers layout) + ASA, VBench layout <dir>/wan_videos/blade/<prompt>-<k>.mp4."""
    prompts = ["A red fox walks through fresh snow.", "a boat / at dawn?"]
    pf = tmp_path / "prompts.txt"
    pf.write_text("# eval prompts\n" + "\n".join(prompts) + "\n\n")
    rc = cli.main(["generate", *_common(tiny_wan, "--lora", str(trained), "--prompt-file", str(pf), "--asa-config",
                                        str(asa_yaml), "--eval-dir", str(tmp_path / "eval"))])
    assert rc == 0
    method_dir = tmp_path / "eval" / "wan_videos" / "blade"
    assert sorted(p.name for p in method_dir.iterdir()) == sorted(
        ["A red fox walks through fresh snow.-0.mp4", "a boat at dawn-0.mp4"])
    for p in method_dir.iterdir():
        _check_video(p)
    report = json.loads((tmp_path / "eval" / "wan_videos" / "blade.json").read_text())
    _check_report(report, 2)
    st = report["settings"]
    assert st["method"] == "blade" and st["attention"] == "sparse" and st["steps"] == 2 and st["guidance"] == 1.0
    assert st["lora"]["layout"] == "diffusers" and st["lora"]["rank"] == 4 and st["lora"]["family"] == "wan"
    assert st["lora"]["fused"] is True  # merged into the weights by default (--no-fuse-lora keeps adapters)
    assert st["asa"]["block_size"] == 16 and st["sampler"] == "tdm"
    # 72 tokens in blocks of 16 with at most 40 % of key blocks kept (+ the diagonal): really sparse
    for v in (v for e in report["prompts"] for v in e["videos"]):
        assert v["density"] < 0.9 and set(v["density_per_layer"]) == {"0", "1"}


def test_dense_original_layout_unipc_failure_isolated(tiny_wan, trained, tmp_path, monkeypatch):
    """The original-Wan/ComfyUI export, dense, UniPC, two videos per prompt; one prompt failing does
    not stop the others and the exit code says so."""
    from videoblade.models.wan import WanAdapter

    real = WanAdapter.encode_prompts

    def flaky(self, te, tok, prompts, *a, **k):
        if any("EXPLODE" in p for p in prompts):
            raise RuntimeError("simulated text-encoder failure")
        return real(self, te, tok, prompts, *a, **k)

    monkeypatch.setattr(WanAdapter, "encode_prompts", flaky)
    out = tmp_path / "out"
    rc = main(_common(tiny_wan, "--lora", str(trained / "lora_comfy.safetensors"), "--dense", "--sampler", "unipc",
                      "--prompt", "a lighthouse EXPLODE", "--prompt", "a lighthouse at night",
                      "--num-videos-per-prompt", "2", "--seed", "7", "--out", str(out)))
    assert rc == 1
    report = json.loads((out / "inference.json").read_text())
    _check_report(report, 4)
    assert "simulated text-encoder failure" in report["prompts"][0]["error"]
    assert report["summary"]["failed"] == 2 and report["summary"]["ok"] == 2
    vids = report["prompts"][1]["videos"]
    assert [v["seed"] for v in vids] == [7, 8]
    for v in vids:
        assert v["density"] == 1.0
        _check_video(Path(v["path"]))
    assert sorted(p.name for p in out.glob("*.mp4")) == ["0001-a lighthouse at night-0.mp4",
                                                          "0001-a lighthouse at night-1.mp4"]
    st = report["settings"]
    assert st["method"] == "tdm" and st["attention"] == "dense" and st["sampler"] == "unipc"
    assert st["lora"]["layout"] == "wan_original" and st["asa"] is None
    # the two seeds give different videos
    a, b = (read_video(Path(v["path"])) for v in vids)
    assert (a.astype(int) - b.astype(int)).__abs__().mean() > 0.5


def test_baseline_preset(tiny_wan, trained, tmp_path):
    args = build_parser().parse_args(_common(tiny_wan, "--baseline", "--lora", str(trained), "--prompt", "x",
                                             "--out", str(tmp_path)))
    args.steps = None  # the preset's own step count
    plan = plan_from_args(args)
    assert (plan.steps, plan.guidance, plan.sampler, plan.asa, plan.lora, plan.method) == (
        50, 5.0, "unipc", None, None, "baseline")
    assert any("ignores --lora" in n for n in plan.notes)
    # LoRA-only flags under --baseline without --lora are said to be ignored, not dropped silently
    plan = plan_from_args(build_parser().parse_args(_common(tiny_wan, "--baseline", "--lora-scale", "0.5",
                                                            "--lora-rank", "8", "--prompt", "x",
                                                            "--out", str(tmp_path))))
    assert any("ignores --lora-scale" in n for n in plan.notes)
    assert any("ignores --lora-rank" in n for n in plan.notes)
    with pytest.raises(InferenceError, match="dense by definition"):
        plan_from_args(build_parser().parse_args(_common(tiny_wan, "--baseline", "--sparse", "--prompt", "x",
                                                         "--out", str(tmp_path))))
    # a short CFG run through the real path (two passes per step + the encoded negative prompt)
    rc = main(_common(tiny_wan, "--baseline", "--steps", "2", "--prompt", "a lighthouse at night",
                      "--eval-dir", str(tmp_path / "eval")))
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "wan_videos" / "baseline.json").read_text())
    _check_report(report, 1)
    assert report["settings"]["guidance"] == 5.0 and report["settings"]["negative_prompt"] == ""
    assert report["timings"]["negative_prompt_encoding_s"] > 0
    _check_video(tmp_path / "eval" / "wan_videos" / "baseline" / "a lighthouse at night-0.mp4")


def test_script_entry_point(tiny_wan, tmp_path):
    """`python utils/inference.py` is the same program (errors exit 2 with one line)."""
    r = subprocess.run([sys.executable, str(ROOT / "utils" / "inference.py"), "--model", str(tiny_wan), "--frames",
                        "10", "--prompt", "x", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert "frames=10 is not of the form 4k+1" in r.stderr


# ---------------------------------------------------------------------------- errors before weights
def _foreign_loras(tmp_path: Path, trained: Path) -> dict[str, Path]:
    """LoRA files that must be refused: another family (with and without metadata), rank mismatch
    inside the file, a different model size."""
    sd_cog = {}
    for i in range(2):
        for m, (i_f, o_f) in {"to_q": (32, 32), "to_v": (32, 32)}.items():
            sd_cog[f"transformer_blocks.{i}.attn1.{m}.lora_A.weight"] = torch.zeros(4, i_f)
            sd_cog[f"transformer_blocks.{i}.attn1.{m}.lora_B.weight"] = torch.zeros(o_f, 4)
    cog = save_lora(tmp_path / "cog", sd_cog, family="cogvideox", rank=4, alpha=4)
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(cog)), str(tmp_path / "cog_nometa.safetensors"))  # no metadata at all
    wan_sd = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    meta = dict(read_lora(trained).meta)
    meta["rank"] = 8
    save_file(wan_sd, str(tmp_path / "bad_meta.safetensors"), metadata={"videoblade": json.dumps(meta)})
    wide = {k: (torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else torch.zeros(2 * v.shape[0], v.shape[1]))
            for k, v in wan_sd.items()}
    bigger = save_lora(tmp_path / "big", {k[len("transformer."):]: v for k, v in wide.items()}, family="wan", rank=4,
                       alpha=4)
    # key layouts the loader does not read: original-Wan names without diffusion_model., peft's ".default"
    noprefix = {k.replace("transformer.", "").replace("attn1.to_q", "self_attn.q").replace("lora_A", "lora_down")
                .replace("lora_B", "lora_up"): v for k, v in wan_sd.items()}
    save_file(noprefix, str(tmp_path / "wan_noprefix.safetensors"))
    for name, strip in (("peft_default", "transformer."), ("diffusers_default", "")):
        save_file({k.replace(strip, "", 1).replace(".weight", ".default.weight"): v for k, v in wan_sd.items()},
                  str(tmp_path / f"{name}.safetensors"))
    return {"cog": cog, "cog_nometa": tmp_path / "cog_nometa.safetensors", "bad_meta": tmp_path / "bad_meta.safetensors",
            "bigger": bigger, "noprefix": tmp_path / "wan_noprefix.safetensors",
            "peft_default": tmp_path / "peft_default.safetensors",
            "diffusers_default": tmp_path / "diffusers_default.safetensors"}


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory, trained):
    return _foreign_loras(tmp_path_factory.mktemp("bad_loras"), trained)


def _foreign_folder(root: Path) -> Path:
    d = root / "unet_model"
    (d / "transformer").mkdir(parents=True)
    (d / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return d


@pytest.mark.parametrize("case", [
    "missing_model", "foreign_model", "incomplete_model", "lora_other_family", "lora_other_family_no_metadata",
    "lora_rank_expected", "lora_rank_inconsistent", "lora_other_size", "lora_missing", "lora_layout_noprefix",
    "lora_layout_peft_default", "lora_layout_diffusers_default", "eval_names_collide", "eval_base_unnamed",
    "bad_method_name", "bad_fps", "bad_text_length", "nan_guidance", "bad_device", "bad_frames", "bad_height",
    "empty_prompt_file", "out_is_file", "out_unwritable", "asa_unknown_key", "bad_vae_chunk",
    "steps_beyond_schedule", "unipc_steps_repeat", "seed_out_of_range", "bad_flow_shift", "eta_with_unipc",
    "lora_scale_without_lora", "negative_prompt_without_cfg", "vae_chunk_with_tiling", "asa_section_not_mapping",
    "out_and_eval_dir", "out_names_a_video",
])
def test_errors_before_weights(case, tiny_wan, trained, bad_loras, tmp_path, no_weight_loads, capsys):
    import shutil

    pf = tmp_path / "p.txt"
    pf.write_text("a cat\n")
    args = ["--model", str(tiny_wan), "--prompt-file", str(pf), "--out", str(tmp_path / "out")]

    def with_(**kw):
        a = list(args)
        if "eval_dir" in kw:  # --eval-dir replaces --out
            del a[a.index("--out"):a.index("--out") + 2]
        for k, v in kw.items():
            flag = "--" + k.replace("_", "-")
            if flag in a:
                a[a.index(flag) + 1] = str(v)
            else:
                a += [flag] + ([str(v)] if v is not None else [])
        return a

    incomplete = tmp_path / "incomplete"
    if case == "incomplete_model":
        shutil.copytree(tiny_wan, incomplete, ignore=shutil.ignore_patterns("vae"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad_yaml = tmp_path / "asa.yaml"
    bad_yaml.write_text("asa:\n  blocksize: 16\n")
    cases = {
        "missing_model": (with_(model=tmp_path / "nope"), "does not exist"),
        "foreign_model": (with_(model=_foreign_folder(tmp_path)), "'UNet2DConditionModel' is not supported"),
        "incomplete_model": (with_(model=incomplete), "has no usable vae/"),
        "lora_other_family": (with_(lora=bad_loras["cog"]), "was trained for a cogvideox model"),
        "lora_other_family_no_metadata": (with_(lora=bad_loras["cog_nometa"]), "it looks like a cogvideox LoRA"),
        "lora_rank_expected": (with_(lora=trained, lora_rank=8), "has rank 4, but --lora-rank 8"),
        "lora_rank_inconsistent": (with_(lora=bad_loras["bad_meta"]), "metadata says rank 8 but the tensors have rank 4"),
        "lora_other_size": (with_(lora=bad_loras["bigger"]), "a LoRA for a different model size"),
        "lora_layout_noprefix": (with_(lora=bad_loras["noprefix"]), "unknown LoRA key layout"),
        "lora_layout_peft_default": (with_(lora=bad_loras["peft_default"]), "unknown LoRA key layout"),
        "lora_layout_diffusers_default": (with_(lora=bad_loras["diffusers_default"]), "unknown LoRA key layout"),
        "lora_missing": (with_(lora=tmp_path / "none.safetensors"), "does not exist"),
        "eval_names_collide": ([*with_(lora=trained, eval_dir=tmp_path / "ev", prompt_file=_write(
            tmp_path / "c.txt", "a cat?\na cat\n"))], "'a cat?' and 'a cat' both become 'a cat-<k>.mp4'"),
        "eval_base_unnamed": (with_(eval_dir=tmp_path / "ev"), "name its --eval-dir folder with --method"),
        "bad_method_name": (with_(lora=trained, eval_dir=tmp_path / "ev", method="../up"), "--method '../up'"),
        "bad_fps": (with_(fps=0), "--fps must be positive, got 0"),
        "bad_text_length": (with_(max_text_length=0), "--max-text-length must be >= 1, got 0"),
        "nan_guidance": (with_(guidance="nan"), "--guidance must be >= 1"),
        "bad_device": (with_(device="tpu"), "--device 'tpu': use cpu, cuda or cuda:N"),
        "bad_frames": (with_(frames=10), "frames=10 is not of the form 4k+1"),
        "bad_height": (with_(height=50), "height=50 is not divisible by"),
        "empty_prompt_file": (with_(prompt_file=_write(tmp_path / "empty.txt", "\n# only a comment\n\n")),
                              "holds no prompts"),
        "out_is_file": (with_(out=blocker), "exists and is not a folder"),
        "out_unwritable": (with_(out=blocker / "sub"), "cannot be written"),
        "asa_unknown_key": (with_(sparse=None, asa_config=bad_yaml), "unknown ASA keys ['blocksize']"),
        "bad_vae_chunk": (with_(vae_chunk=0), "--vae-chunk must be 'auto', 'all' or a positive integer, got 0"),
        # requests that used to pass the plan and then fail every video after the weights loaded
        "steps_beyond_schedule": (with_(steps=2000), "--steps 2000 is more than the model's 1000 training timesteps"),
        "unipc_steps_repeat": (with_(sampler="unipc", steps=600), "--steps 600 with --sampler unipc repeats timesteps"),
        "seed_out_of_range": (with_(seed=2**64), f"--seed {2**64}"),
        "bad_flow_shift": (with_(sampler="unipc", flow_shift=0), "--flow-shift must be a positive number, got 0"),
        # flags that used to be accepted and silently ignored
        "eta_with_unipc": (with_(sampler="unipc", eta=0.5), "--eta applies to --sampler tdm only"),
        "lora_scale_without_lora": (with_(lora_scale=0.5), "--lora-scale needs --lora"),
        "negative_prompt_without_cfg": (with_(negative_prompt="blurry"), "--negative-prompt needs --guidance > 1"),
        "vae_chunk_with_tiling": (with_(vae_tiling=None, vae_chunk=2), "--vae-chunk does not apply with --vae-tiling"),
        "out_and_eval_dir": ([*with_(lora=trained, eval_dir=tmp_path / "ev"), "--out", str(tmp_path / "out")],
                             "--out and --eval-dir"),
        "out_names_a_video": (with_(out=tmp_path / "fox.mp4"), "--out names the output folder"),
        # a crash (TypeError) instead of a message
        "asa_section_not_mapping": (with_(sparse=None, asa_config=_write(tmp_path / "a5.yaml", "asa: 5\n")),
                                    "'asa:' must be a mapping of ASA keys"),
    }
    argv, msg = cases[case]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err, err
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "out" / "inference.json").exists()


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_inspect_lora_reads_header_only(trained):
    for name, layout in (("pytorch_lora_weights.safetensors", "diffusers"), ("lora_comfy.safetensors", "wan_original")):
        info = inspect_lora(trained / name)
        assert (info.layout, info.rank, info.alpha, info.family) == (layout, 4, 4.0, "wan")
        assert "blocks.0.attn1.to_q" in info.target_modules
    assert inspect_lora(trained).path.name == "pytorch_lora_weights.safetensors"  # a folder resolves to the file


# ---------------------------------------------------------------------------- names, sampler, decode
def test_sanitized_names():
    assert video_filename("A dog / cat: \"running\"?", 3) == "A dog cat running-3.mp4"
    assert video_filename("a  b\tc.", 0) == "a b c.-0.mp4"  # a final '.' is not at the end of the file name: kept
    assert sanitize_prompt("///") == "prompt" and sanitize_prompt("...") == "prompt"
    assert video_filename(".hidden", 0) == "hidden-0.mp4"  # never a hidden file
    long = sanitize_prompt("é" * 500)
    # NAME_MAX is 255 bytes: room for "NNNN-" (--out) and "-<k>.mp4" beside the longest stem
    assert 230 <= len(long.encode()) <= 240 and long == "é" * len(long)
    assert len(("0000-" + video_filename("é" * 500, 9999)).encode()) <= 255


@pytest.mark.parametrize("kind", ["flow", "v_prediction"])
def test_unipc_recovers_x0_from_an_exact_model(kind):
    """With a network that returns the exact output for a fixed x0, UniPC lands on x0: the
    scheduler is wired to the same noise schedule (flow shift / zero-SNR v-pred) as the model."""
    from videoblade.sampling import unipc_denoise, unipc_scheduler
    from videoblade.schedules import Schedule

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 4, 4, generator=g)
    if kind == "flow":
        sched_vb = Schedule.flow(1000, 3.0)
        sch = unipc_scheduler(sched_vb)

        def predict(x, t):  # v = (x - x0) / sigma at the scheduler's current sigma
            s = sch.sigmas[sch.step_index if sch.step_index is not None else 0].item()
            return (x - x0) / s
    else:
        cfg = {"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
               "rescale_betas_zero_snr": True, "snr_shift_scale": 3.0, "timestep_spacing": "trailing",
               "set_alpha_to_one": True, "clip_sample": False}
        sched_vb = Schedule.from_scheduler_config(cfg)
        sch = unipc_scheduler(sched_vb)
        assert torch.allclose(sch.alphas_cumprod[:-1].float(), (sched_vb.alphas[:-1] ** 2), atol=1e-6)

        def predict(x, t):
            a = sched_vb.alpha(t).view(-1, 1, 1, 1, 1)
            s = sched_vb.sigma(t).view(-1, 1, 1, 1, 1)
            eps = (x - a * x0) / s
            return a * eps - s * x0
    out = unipc_denoise(predict, sch, torch.randn(x0.shape, generator=g), 8)
    assert (out - x0).abs().max() < 1e-3


def test_compare_decode_and_choice(tiny_wan):
    from videoblade.models import get_adapter

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae
    lat = torch.randn(1, 4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    rows = compare_decode(ad, vae, lat, [{"dtype": "bf16", "tiling": False, "compile": False}], repeats=1)
    assert [r["setting"]["dtype"] for r in rows] == ["fp32", "bf16"]
    assert math.isinf(rows[0]["psnr_db"]) and 25 < rows[1]["psnr_db"] < 200
    assert all(r["median_s"] > 0 for r in rows)
    fake = [{"setting": "fp32", "median_s": 3.0, "psnr_db": float("inf")},
            {"setting": "bf16", "median_s": 2.0, "psnr_db": 45.0},
            {"setting": "fp8", "median_s": 1.0, "psnr_db": 35.0}]
    assert choose_decode(fake)["setting"] == "bf16"
    assert choose_decode(fake, min_psnr=50.0)["setting"] == "fp32"
    a = torch.zeros(2, 3, dtype=torch.uint8)
    assert psnr(a, a) == float("inf") and abs(psnr(a, a + 1) - 20 * math.log10(255)) < 1e-9


def test_wan_vae_compile_fuses_the_decoder_norms(tiny_wan):
    """`--vae-compile` on Wan compiles only the decoder's RMS norms, one fused pass each (in the
    residual blocks with the conv bias before them, the SiLU after them and the residual add),
    with the frames of the eager decode in diffusers' loop and in videoblade's; the toy identity
    VAE has nothing to compile."""
    from videoblade.models import get_adapter

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):  # non-trivial norm weights, so a dropped gamma would show
            p.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    lat = torch.randn(1, 4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    z = ad.denormalize_latents(vae, lat)
    from torch._dynamo.utils import counters

    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        norms = [m for m in vae.decoder.modules() if type(m).__name__ == "WanRMS_norm"]
        blocks = [m for m in vae.decoder.modules() if type(m).__name__ == "WanResidualBlock"]
        assert all(b.conv1.bias.abs().max() > 1e-3 for b in blocks)  # a dropped conv bias would show
        graphs_before = counters["stats"]["unique_graphs"]
        assert ad.compile_vae(vae, backend="aot_eager") == len(norms) > 10
        assert ad.compile_vae(vae, backend="aot_eager") == 0  # already fused: not wrapped twice
        assert len(blocks) > 4 and all(isinstance(b.forward, functools.partial) for b in blocks)
        out = vae.decode(z, return_dict=False)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        configure_vae(vae, adapter=ad, chunk="all")  # videoblade's loop over the same fused blocks
        torch.testing.assert_close(ad.vae_decode(vae, z), ref, rtol=1e-5, atol=1e-5)
    # the norms share graphs (one per width, variant and size-1 specialisation), not one graph per
    # module: dynamo's default limit of 8 graphs per code object would leave most of them eager
    assert 0 < counters["stats"]["unique_graphs"] - graphs_before <= 16
    with pytest.raises(ValueError, match="adapter"):
        configure_vae(vae, compile=True)

    class NoDecoder:
        decoder = None

    assert ad.compile_vae(NoDecoder()) == 0


def test_cli_dispatch(capsys):
    assert cli.main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "--eval-dir" in capsys.readouterr().out


def _student_prediction(tiny_wan, tmp_path, *extra):
    """The loaded transformer and its prediction on fixed inputs, for a dense plan with ``extra``."""
    from videoblade.inference import load_components

    plan = plan_from_args(build_parser().parse_args(_common(tiny_wan, "--dense", "--prompt", "x", "--out",
                                                            str(tmp_path), *extra)))
    comps = load_components(plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *plan.geometry.latent_shape, generator=g)
    emb = torch.randn(1, plan.text_max_length, 32, generator=g)
    with torch.no_grad():
        return comps.transformer, plan.adapter.predict(comps.transformer, x, torch.tensor([500]), emb, plan.geometry)


def test_lora_is_applied_with_its_scale(tiny_wan, trained, tmp_path):
    """The loaded student differs from the base model, and --lora-scale 0 gives the base back."""
    base = _student_prediction(tiny_wan, tmp_path)[1]
    student = _student_prediction(tiny_wan, tmp_path, "--lora", str(trained))[1]
    off = _student_prediction(tiny_wan, tmp_path, "--lora", str(trained), "--lora-scale", "0")[1]
    assert (student - base).abs().max() > 1e-6
    assert torch.allclose(off, base, atol=1e-6)


def test_lora_is_merged_into_the_weights_unless_kept_apart(tiny_wan, trained, tmp_path):
    """By default the LoRA is merged after loading (no adapter layers left to run), at its scale;
    --no-fuse-lora keeps the adapter layers. Both give the same student."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def adapters(t):
        return sum(isinstance(m, BaseTunerLayer) for m in t.modules())

    for scale in ("1", "0.5"):
        merged_t, merged = _student_prediction(tiny_wan, tmp_path, "--lora", str(trained), "--lora-scale", scale)
        kept_t, kept = _student_prediction(tiny_wan, tmp_path, "--lora", str(trained), "--lora-scale", scale,
                                           "--no-fuse-lora")
        assert adapters(merged_t) == 0 and adapters(kept_t) > 0
        assert torch.allclose(merged, kept, atol=1e-5, rtol=1e-5), (merged - kept).abs().max()
    base = _student_prediction(tiny_wan, tmp_path)[1]
    assert (merged - base).abs().max() > 1e-6  # the merge changed the weights


def test_wan_decode_in_chunks_matches_diffusers(tiny_wan, monkeypatch):
    """`--vae-chunk`: the Wan decoder called on several latent frames at a time gives diffusers'
    one-frame-per-call decode; "auto" falls back to smaller chunks when the GPU runs out of memory
    and remembers what fitted; an explicit setting does not hide the error; other families refuse it."""
    from videoblade.models import ModelRequestError, get_adapter
    from videoblade.models import wan as wan_mod

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae
    lat = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(0))
    z = ad.denormalize_latents(vae, lat)
    with torch.no_grad():
        fresh = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae  # has never decoded
        configure_vae(fresh, adapter=ad, chunk="all")
        first = ad.vae_decode(fresh, z)
        assert ad.last_decode_chunk(fresh) == 5  # the first decode of a run takes the chunked path too
        ref = vae.decode(z, return_dict=False)[0]
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
        assert ref.shape[2] == 21
        configure_vae(vae, adapter=ad)  # auto on the CPU: diffusers' own loop, bit for bit
        assert torch.equal(ad.vae_decode(vae, z), ref) and ad.last_decode_chunk(vae) == 1
        for chunk, used in ((2, 2), ("4", 4), ("all", 5), (50, 5)):
            configure_vae(vae, adapter=ad, chunk=chunk)
            torch.testing.assert_close(ad.vae_decode(vae, z), ref, rtol=1e-5, atol=1e-5)
            assert ad.last_decode_chunk(vae) == used
        frames = ad.decode(vae, lat)  # the uint8 path goes through the same decode
        assert frames.shape == (1, 21, 32, 48, 3)

        calls = []
        real = wan_mod._decode_in_chunks

        def short_of_memory(vae_, z_, chunk):  # a GPU that fits at most 2 latent frames per call
            calls.append(chunk)
            if chunk > 2:
                raise torch.OutOfMemoryError("simulated")
            return real(vae_, z_, chunk)

        monkeypatch.setattr(wan_mod, "_decode_in_chunks", short_of_memory)
        monkeypatch.setattr(wan_mod, "_auto_chunk", lambda v, z_: min(z_.shape[2], getattr(v, wan_mod._CHUNK_CAP_ATTR, 99)))
        configure_vae(vae, adapter=ad)
        with pytest.warns(UserWarning, match="ran out of GPU memory with 5 latent frames per call; retrying with 2"):
            out = ad.vae_decode(vae, z)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert calls == [5, 2] and ad.last_decode_chunk(vae) == 2
        ad.vae_decode(vae, z)  # starts from what fitted
        assert calls == [5, 2, 2]
        configure_vae(vae, adapter=ad, chunk="all")
        with pytest.raises(torch.OutOfMemoryError):
            ad.vae_decode(vae, z)
    for bad in (0, -1, "some", 2.5, True):
        with pytest.raises(ModelRequestError, match="positive integer"):
            configure_vae(vae, adapter=ad, chunk=bad)
    with pytest.raises(ModelRequestError, match="Wan's causal VAE only"):
        get_adapter("cogvideox").configure_decode_chunk(vae, 4)
    get_adapter("cogvideox").configure_decode_chunk(vae, "auto")
    with pytest.raises(ValueError, match="adapter"):
        configure_vae(vae, chunk=2)


def test_decode_cudnn_benchmark_is_scoped_to_the_decode(tiny_wan, monkeypatch):
    """`configure_vae(cudnn_benchmark=...)`: cuDNN's autotuner is set while the VAE decodes and the
    global setting is back afterwards (also when the decode raises); None leaves it alone."""
    from videoblade.models import get_adapter

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae
    lat = torch.randn(1, 4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    seen = []
    real = type(ad).vae_decode

    def spy(self, vae_, z_):
        seen.append(torch.backends.cudnn.benchmark)
        if getattr(vae_, "_fail", False):
            raise RuntimeError("decode failed")
        return real(self, vae_, z_)

    monkeypatch.setattr(type(ad), "vae_decode", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for setting, during in ((True, True), (False, False), (None, False)):
        configure_vae(vae, adapter=ad, cudnn_benchmark=setting)
        ad.decode(vae, lat)
        assert seen[-1] is during and torch.backends.cudnn.benchmark is False
    torch.backends.cudnn.benchmark = True
    configure_vae(vae, adapter=ad, cudnn_benchmark=False)
    vae._fail = True
    with pytest.raises(RuntimeError, match="decode failed"):
        ad.decode(vae, lat)
    assert seen[-1] is False and torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_upsample2x_conv_is_upsample_then_conv(bias, channels_last):
    """The Wan decoder's nearest 2x upsample + 3x3 convolution as one phase convolution at low
    resolution: the same outputs (odd sizes, borders included), in a channels-last layout."""
    from videoblade.models.wan import _upsample2x_conv

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    with torch.no_grad():
        for prm in conv.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g))
        x = torch.randn(3, 6, 5, 7, generator=g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        out = _upsample2x_conv(conv, x)
    assert out.shape == ref.shape == (3, 5, 10, 14)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    # each phase is used: shuffling the phases (a wrong interleave) would not match
    assert not torch.allclose(out[..., 0::2, :], ref[..., 1::2, :], atol=1e-2)


def test_wan_decode_runs_the_phase_upsampler(tiny_wan, monkeypatch):
    """videoblade's decode loop runs every upsampler of the tiny Wan VAE (two with a temporal
    upsample, one spatial only) through ``_upsample2x_conv``, and still gives diffusers' frames."""
    from videoblade.models import get_adapter
    from videoblade.models import wan as wan_mod

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="fp32", components=("vae",)).vae
    for name, prm in vae.named_parameters():  # non-zero biases, so a dropped bias would show
        if name.endswith("bias"):
            prm.data.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(len(name)))
    lat = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    z = ad.denormalize_latents(vae, lat)
    calls = []
    real = wan_mod._upsample2x_conv

    def counted(conv, x):
        calls.append(tuple(x.shape))
        return real(conv, x)

    monkeypatch.setattr(wan_mod, "_upsample2x_conv", counted)
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        configure_vae(vae, adapter=ad, chunk="all")
        out = ad.vae_decode(vae, z)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # 2 decoder calls (the first latent frame alone, then 3) x 3 upsamplers; the second call's
    # temporal upsamplers double the frames: 3 -> 6 -> 12 frames at the spatial-only one
    assert [c[0] for c in calls] == [1, 1, 1, 6, 12, 12]
    assert out.shape[2] == ref.shape[2] == 13


@pytest.mark.gpu
def test_wan_fast_decode_matches_diffusers_on_the_gpu(tiny_wan):
    """On CUDA (bf16, channels-last, norms compiled) videoblade's Wan decode loop gives diffusers'
    frames to bf16 rounding, with all latent frames in one call by default."""
    from videoblade.models import get_adapter

    ad = get_adapter(tiny_wan)
    vae = ad.load(tiny_wan, dtype="bf16", device="cuda", components=("vae",)).vae
    lat = torch.randn(1, 4, 6, 4, 6, generator=torch.Generator().manual_seed(0)).cuda()
    z = ad.denormalize_latents(vae, lat)
    with torch.no_grad():
        ref = vae.float().decode(z.float(), return_dict=False)[0]
        vae.to(torch.bfloat16)
        z = z.bfloat16()
        plain = vae.decode(z, return_dict=False)[0].float()
        configure_vae(vae, compile=True, adapter=ad)  # chunk "auto": all frames on CUDA
        fast = ad.vae_decode(vae, z).float()
    assert ad.last_decode_chunk(vae) == 5
    assert fast.shape == ref.shape == (1, 3, 21, 32, 48)
    err_fast = (fast - ref).pow(2).mean().sqrt().item()
    err_plain = (plain - ref).pow(2).mean().sqrt().item()
    assert err_fast < 2 * err_plain + 1e-3, (err_fast, err_plain)  # bf16 rounding, not a different function


def test_steps_and_eta_default_to_what_the_lora_was_trained_with(tiny_wan, trained, tmp_path, no_weight_loads):
    # the fixture's student was trained with tdm.k_step=2 (eta 0.9): sampled on its own grid by
    # default; explicit flags win; without a LoRA the defaults stay 8 and 0.9
    from videoblade.inference import inspect_lora

    lora = trained / "pytorch_lora_weights.safetensors"
    assert (inspect_lora(lora).k_step, inspect_lora(lora).eta) == (2, 0.9)
    base = ["--model", str(tiny_wan), "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--no-progress",
            "--prompt", "x", "--out", str(tmp_path)]
    plan = plan_from_args(build_parser().parse_args([*base, "--lora", str(lora)]))
    assert (plan.steps, plan.eta) == (2, 0.9) and any("k_step the LoRA was trained with" in n for n in plan.notes)
    plan = plan_from_args(build_parser().parse_args([*base, "--lora", str(lora), "--steps", "6", "--eta", "0.5"]))
    assert (plan.steps, plan.eta) == (6, 0.5) and not any(n.startswith(("--steps", "--eta")) for n in plan.notes)
    plan = plan_from_args(build_parser().parse_args(base))
    assert (plan.steps, plan.eta) == (8, 0.9)
    plan = plan_from_args(build_parser().parse_args([*base, "--baseline", "--lora", str(lora)]))
    assert plan.steps == 50


def test_method_labels_and_custom_method_folder(tiny_wan, trained, tmp_path, no_weight_loads):
    # the base model with its own settings is not the baseline; --method names any folder
    base = ["--model", str(tiny_wan), "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--prompt",
            "a cat", "--prompt", "a cat", "--no-progress"]
    plan = plan_from_args(build_parser().parse_args([*base, "--steps", "3", "--out", str(tmp_path / "o")]))
    assert plan.method == "teacher" and len(plan.jobs) == 2  # --out numbers the files: both kept
    plan = plan_from_args(build_parser().parse_args([*base, "--baseline", "--out", str(tmp_path / "o")]))
    assert plan.method == "baseline"
    assert plan.sampler == "unipc" and plan.flow_shift == plan.adapter.schedule(tiny_wan).shift  # resolved, not null
    (tmp_path / "o2" / "inference.json").mkdir(parents=True)
    with pytest.raises(InferenceError, match="is a folder"):
        plan_from_args(build_parser().parse_args([*base, "--baseline", "--out", str(tmp_path / "o2")]))
    plan = plan_from_args(build_parser().parse_args([*base, "--lora", str(trained), "--method", "blade-step300",
                                                     "--eval-dir", str(tmp_path / "ev")]))
    assert plan.out_dir == tmp_path / "ev" / "wan_videos" / "blade-step300"
    assert plan.report_path == tmp_path / "ev" / "wan_videos" / "blade-step300.json"
    assert len(plan.jobs) == 1 and any("duplicate prompt skipped" in n for n in plan.notes)


def test_prompt_file_with_a_byte_order_mark(tiny_wan, tmp_path, no_weight_loads):
    # editors on Windows save UTF-8 with a BOM: it must not turn the comment line into a prompt
    pf = tmp_path / "bom.txt"
    pf.write_bytes("\ufeff# my prompts\na dog on a beach\n".encode("utf-8"))
    plan = plan_from_args(build_parser().parse_args(["--model", str(tiny_wan), "--height", str(H), "--width", str(W),
                                                     "--frames", str(FRAMES), "--prompt-file", str(pf), "--out",
                                                     str(tmp_path / "o")]))
    assert [j.prompt for j in plan.jobs] == ["a dog on a beach"]


def test_prompt_file_reads_like_process_prompts(tiny_wan, tmp_path, no_weight_loads):
    # one reader for --prompt-file and utils/process_prompts.py: a U+2028 or form feed inside a line
    # does not cut the prompt, so the videos follow the prompts that were encoded
    from videoblade.data import read_prompt_file

    pf = tmp_path / "p.txt"
    pf.write_text("a dog\u2028on a beach\nfireworks\x0cat night\n", encoding="utf-8")
    plan = plan_from_args(build_parser().parse_args(["--model", str(tiny_wan), "--height", str(H), "--width", str(W),
                                                     "--frames", str(FRAMES), "--prompt-file", str(pf), "--out",
                                                     str(tmp_path / "o")]))
    assert [j.prompt for j in plan.jobs] == read_prompt_file(pf) and len(plan.jobs) == 2


def test_report_is_written_after_every_prompt(tiny_wan, tmp_path, monkeypatch):
    # a run stopped part-way (Ctrl-C, a kill) still leaves a report of the videos it made
    from videoblade import inference as inf

    real, calls = inf._write_video, []

    def stop_at_second(path, frames, fps):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not an Exception: ends the run like Ctrl-C
        return real(path, frames, fps)

    monkeypatch.setattr(inf, "_write_video", stop_at_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(_common(tiny_wan, "--prompt", "a red kite", "--prompt", "a blue kite", "--out", str(out)))
    report = json.loads((out / "inference.json").read_text())
    assert report["summary"]["complete"] is False and report["summary"]["ok"] == 1
    assert [e["prompt"] for e in report["prompts"]] == ["a red kite"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


# VBench's standard mode looks for exactly f"{prompt}-{index}.mp4" (prompt_en of its full-info JSON); its
# prompts include ones ending in '.' and ones up to 210 bytes long
VBENCH_PROMPTS = [
    "Fireworks.",
    "A 3D model of a 1800s victorian house.",
    "Snow rocky mountains peaks canyon. snow blanketed rocky mountains surround and shadow deep canyons. the canyons "
    "twist and bend through the high elevated mountain peaks, featuring a steady and smooth perspective",
]


def test_eval_names_are_the_vbench_prompt_text(tiny_wan, trained, tmp_path, no_weight_loads):
    pf = _write(tmp_path / "vbench.txt", "\n".join(VBENCH_PROMPTS) + "\n")
    plan = plan_from_args(build_parser().parse_args([
        "--model", str(tiny_wan), "--lora", str(trained), "--prompt-file", str(pf), "--num-videos-per-prompt", "5",
        "--eval-dir", str(tmp_path / "ev")]))
    assert [j.path.name for j in plan.jobs] == [f"{p}-{k}.mp4" for p in VBENCH_PROMPTS for k in range(5)]
    # a prompt and the same prompt with a final '.' are two prompts (VBench has both kinds), not a collision
    pf2 = _write(tmp_path / "dots.txt", "a cat\na cat.\n")
    plan = plan_from_args(build_parser().parse_args([
        "--model", str(tiny_wan), "--lora", str(trained), "--prompt-file", str(pf2), "--eval-dir", str(tmp_path / "e2")]))
    assert [j.path.name for j in plan.jobs] == ["a cat-0.mp4", "a cat.-0.mp4"]


def test_eval_dir_notes_videos_of_an_earlier_run(tiny_wan, trained, tmp_path, no_weight_loads):
    # a scorer reads every video in the method folder: one left by an earlier run with other prompts is named
    folder = tmp_path / "ev" / "wan_videos" / "blade"
    folder.mkdir(parents=True)
    (folder / "an old prompt-0.mp4").write_bytes(b"x")
    (folder / "a cat-0.mp4").write_bytes(b"x")  # this run rewrites it: not stale
    argv = ["--model", str(tiny_wan), "--lora", str(trained), "--prompt", "a cat", "--eval-dir", str(tmp_path / "ev")]
    plan = plan_from_args(build_parser().parse_args(argv))
    stale = [n for n in plan.notes if "does not write" in n]
    assert len(stale) == 1 and "1 video" in stale[0] and "an old prompt-0.mp4" in stale[0]
    (folder / "an old prompt-0.mp4").unlink()
    assert not [n for n in plan_from_args(build_parser().parse_args(argv)).notes if "does not write" in n]


def test_asa_config_with_an_empty_section(tiny_wan, tmp_path, no_weight_loads):
    # `asa:` with nothing under it is the defaults (it used to crash with a TypeError)
    from videoblade.config import ASAConfig

    cfg = _write(tmp_path / "asa.yaml", "asa:\n")
    plan = plan_from_args(build_parser().parse_args(["--model", str(tiny_wan), "--sparse", "--asa-config", str(cfg),
                                                     "--prompt", "x", "--out", str(tmp_path / "o")]))
    assert plan.asa.enabled and plan.asa.block_size == ASAConfig().block_size


def test_non_finite_latents_fail_the_video(tiny_wan, tmp_path, monkeypatch):
    # NaN latents (an fp16 overflow, a broken schedule) decode to a flat frame: the video must be
    # reported as failed, not written and counted as made
    from videoblade import inference as inf

    real, calls = inf.denoise, []

    def nan_for_the_second(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(inf, "denoise", nan_for_the_second)
    out = tmp_path / "out"
    rc = main(_common(tiny_wan, "--prompt", "a first kite", "--prompt", "a second kite", "--out", str(out)))
    assert rc == 1
    report = json.loads((out / "inference.json").read_text())
    assert report["summary"]["ok"] == 1 and report["summary"]["failed"] == 1
    assert "non-finite" in report["prompts"][1]["videos"][0]["error"]
    assert [p.name for p in out.glob("*.mp4")] == ["0000-a first kite-0.mp4"]


def test_attention_defaults_to_what_the_lora_was_trained_with(tiny_wan, trained, tmp_path, no_weight_loads):
    # a LoRA of a TDM-only run (videoblade records asa: null) samples dense by default, in the `tdm`
    # folder, instead of landing sparse in `blade`; --sparse still turns ASA on; an ASA file that says
    # enabled: false is dense unless --sparse is given
    from safetensors.torch import load_file, save_file

    lora = trained / "pytorch_lora_weights.safetensors"
    meta = dict(read_lora(trained).meta, asa=None)
    dense_lora = tmp_path / "dense_lora.safetensors"
    save_file(load_file(str(lora)), str(dense_lora), metadata={"videoblade": json.dumps(meta)})
    base = ["--model", str(tiny_wan), "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--no-progress",
            "--prompt", "x"]

    def plan(*extra):
        return plan_from_args(build_parser().parse_args([*base, *extra]))

    p = plan("--lora", str(dense_lora), "--eval-dir", str(tmp_path / "ev"))
    assert p.asa is None and p.method == "tdm" and any("trained with dense attention" in n for n in p.notes)
    p = plan("--lora", str(dense_lora), "--sparse", "--out", str(tmp_path / "o"))
    assert p.asa is not None and p.asa.enabled and p.method == "blade"
    p = plan("--lora", str(lora), "--out", str(tmp_path / "o"))  # trained with ASA: sparse, its own settings
    assert p.asa is not None and p.asa.block_size == 16 and p.method == "blade"
    off = _write(tmp_path / "off.yaml", ASA_YAML + "  enabled: false\n")
    p = plan("--lora", str(lora), "--asa-config", str(off), "--out", str(tmp_path / "o"))
    assert p.asa is None and p.method == "tdm" and any("enabled: false" in n for n in p.notes)
    p = plan("--lora", str(lora), "--asa-config", str(off), "--sparse", "--out", str(tmp_path / "o"))
    assert p.asa is not None and p.asa.enabled and p.asa.block_size == 16


def test_flow_match_scheduler_folder_is_a_flow_model(tiny_wan, tmp_path, no_weight_loads):
    # a Wan folder whose scheduler is FlowMatchEulerDiscreteScheduler (no prediction_type key) is a
    # flow model, as Schedule reads it: --flow-shift is accepted and the UniPC run records the shift
    import shutil

    folder = tmp_path / "wan_flowmatch"
    shutil.copytree(tiny_wan, folder)
    _write(folder / "scheduler" / "scheduler_config.json",
           json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    base = ["--model", str(folder), "--height", str(H), "--width", str(W), "--frames", str(FRAMES), "--no-progress",
            "--prompt", "x", "--out", str(tmp_path / "o"), "--sampler", "unipc"]
    assert plan_from_args(build_parser().parse_args(base)).flow_shift == 3.0
    assert plan_from_args(build_parser().parse_args([*base, "--flow-shift", "5"])).flow_shift == 5.0
    # a resolution-dependent shift (use_dynamic_shifting: UniPC's set_timesteps then needs mu, which
    # failed after the weights loaded) is refused while planning, with what to change
    _write(folder / "scheduler" / "scheduler_config.json",
           json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                       "use_dynamic_shifting": True}))
    with pytest.raises(InferenceError, match="use_dynamic_shifting"):
        plan_from_args(build_parser().parse_args(base))

"""The README's CPU commands, run on a tiny Wan folder, and the names it uses checked against the code.

Drift checks (fast, no weights): every `--flag` of the Inference section is a `videoblade generate`
option and the table's plain defaults are the parser's; every config key the README names exists in
the schema; its override examples parse as it says; the recipe values it quotes are the YAMLs'; its
launch commands, run with a stand-in interpreter, call accelerate the way the text says.

End to end (one tiny Wan, CPU, ~30 s): step 1 of "Training on real weights" (`utils/process_prompts.py`),
step 2 (`wanx/train/train_wanx_1.3b.sh` on one process, stopped after a step and started again: the
resume), every file the "Run directory" paragraph lists, then the Inference section's two commands and
its `--eval-dir` loop as written, with the tiny folder and the trained LoRA in place of `ckpt/...` and
`runs/wan/...`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from videoblade.config import ASAConfig, ConfigError, RunConfig, check_asa, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FLAT = " ".join(README.split())  # the README with line breaks folded, for phrases that wrap
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def _section(title: str) -> str:
    """The README from the heading `title` to the next heading of the same or a higher level
    (headings inside code blocks, i.e. shell comments, do not count)."""
    lines, fence, start, level = README.splitlines(), False, None, 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        n = len(line) - len(line.lstrip("#"))
        if start is None and line[n:].strip().startswith(title):
            start, level = i, n
        elif start is not None and n <= level:
            return "\n".join(lines[start:i])
    assert start is not None, f"README has no section {title!r}"
    return "\n".join(lines[start:])


def _code_commands(text: str) -> list[str]:
    """Shell commands of the bash blocks in `text`, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(" ".join(cmd.split()))
    return out


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in [k for k in env if k.startswith("ACCELERATE_") or k in (
            "CONFIG", "MODEL_PATH", "PROMPT_STORE", "OUTPUT_DIR", "NUM_GPUS", "NUM_MACHINES", "MACHINE_RANK",
            "MAIN_IP", "MAIN_PORT", "MIXED_PRECISION", "PYTHON")]:
        env.pop(k)
    return env | extra


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- names against the code
def test_every_flag_the_inference_section_names_is_a_generate_option():
    from videoblade.inference import build_parser

    opts = set(build_parser()._option_string_actions)
    named = set(re.findall(r"--[a-z][a-z0-9-]*", _section("Inference")))
    assert named and not named - opts, f"README names generate flags the parser lacks: {sorted(named - opts)}"


def test_the_inference_tables_plain_defaults_are_the_parsers():
    from videoblade.inference import build_parser

    p = build_parser()
    defaults = {a.option_strings[0]: a.default for a in p._actions if a.option_strings}
    checked = 0
    for row in re.findall(r"^\| (`--.*)$", _section("Inference"), flags=re.M):
        cells = [c.strip() for c in row.split(" | ")]
        flags = re.findall(r"`(--[a-z-]+)`", cells[0].split(" / ")[0])
        vals = [v.strip().strip("`") for v in cells[1].split(",")]
        if len(vals) == 1 and vals[0] in ("off", "none"):
            vals = vals * len(flags)
        if len(vals) != len(flags):
            continue
        for flag, val in zip(flags, vals):
            have = defaults[flag]
            if val == "off":
                assert have is False, (flag, have)
            elif val == "none":
                assert have is None, (flag, have)
            elif re.fullmatch(r"-?\d+(\.\d+)?", val):
                assert have == float(val), (flag, have)
            elif val == "auto":
                assert have == "auto", (flag, have)
            else:
                continue
            checked += 1
    assert checked >= 8  # --lora, --lora-scale, --lora-rank, --seed, --num-videos-per-prompt, --eval-dir, ...


def test_every_config_key_the_readme_names_exists():
    keys = set(re.findall(r"\b(model|asa|lora|tdm|optim|train|sample)\.([a-z_]+)\b(?!\.)", README))
    keys = {(s, k) for s, k in keys if k not in ("py", "txt", "json", "yaml", "md", "sh")}
    assert len(keys) >= 10
    missing = [f"{s}.{k}" for s, k in sorted(keys) if k not in {f.name for f in dataclasses.fields(SECTIONS[s])}]
    assert not missing, f"README names config keys the schema lacks: {missing}"
    # keys named bare in the sentences that list a section's settings
    sample = re.search(r"Validation videos follow `sample\.\*` \((.*?)\); a setting", FLAT).group(1)
    bare = {w for w in re.findall(r"`([a-z_]+)`", sample)}
    assert bare == {"sampler", "steps", "eta", "guidance", "flow_shift"}
    assert bare <= {f.name for f in dataclasses.fields(SECTIONS["sample"])}
    modes = _section("Configuration").split("**ASA mask modes**")[1]
    asa_fields = {f.name for f in dataclasses.fields(ASAConfig)}
    for key in ("energy_threshold", "min_retain", "max_retain", "topk", "level_fractions", "level_pools"):
        assert f"`{key}" in modes and key in asa_fields, key
    for mode in re.findall(r"`(energy|topk|levels)`", modes):
        check_asa(ASAConfig(mode=mode))
    pools = re.search(r"`level_pools`, default `(\[[\d, ]+\])`", modes).group(1)
    assert ASAConfig().level_pools == json.loads(pools)
    assert RunConfig().train.resume_from_checkpoint == "latest"  # README: train.resume_from_checkpoint=latest
    for key in ("checkpoints_total_limit", "validation_steps"):  # the Run directory paragraph
        assert f"`{key}`" in README and key in {f.name for f in dataclasses.fields(SECTIONS["train"])}


def test_the_override_examples_parse_as_the_readme_says(monkeypatch):
    spans = re.findall(r"`([a-z]+\.[a-z_]+=[^`]*)`", _section("Configuration"))
    overrides = []
    for s in spans:
        if s.split(".")[0] not in SECTIONS:
            continue  # `section.key=value`, the pattern itself
        parts = s.split(" ")
        multi = len(parts) > 1 and all(re.fullmatch(r"[a-z]+\.[a-z_]+=\S+", x) for x in parts)
        overrides += parts if multi else [s]
    assert {"tdm.negative_prompt=blurry, low quality: bad hands", "train.output_dir=runs/exp #3",
            "asa.min_retain=1", "tdm.k_step=4"} <= set(overrides)
    cfg = load_config(ROOT / "wanx/configs/tdm_asa.yaml", overrides)
    for o in overrides:
        key, value = o.split("=", 1)
        section, name = key.split(".")
        have = getattr(getattr(cfg, section), name)
        # text as typed, the rest as YAML; None (Python's null) clears an optional field of any type
        want = None if value in ("None", "none") else value if isinstance(have, str) else yaml.safe_load(value)
        assert have == want, (o, have)
    assert cfg.asa.min_retain == 1.0 and cfg.asa.max_retain < 1.0  # min_retain=1 whatever max_retain says
    # one pair of quotes dropped, null clears an optional text, ${oc.env:VAR} resolves
    monkeypatch.setenv("VB_README_DIR", "/tmp/somewhere")
    cfg = load_config(None, ["tdm.negative_prompt='a: b'", "train.validation_prompts=null",
                             "train.output_dir=${oc.env:VB_README_DIR}"])
    assert (cfg.tdm.negative_prompt, cfg.train.validation_prompts, cfg.train.output_dir) == ("a: b", None,
                                                                                               "/tmp/somewhere")
    with pytest.raises(ConfigError, match=r"energy_treshold.*energy_threshold"):  # names the key and the fix
        load_config(None, ["asa.energy_treshold=0.9"])


def test_the_recipe_values_the_readme_quotes_are_the_yamls():
    for phrase in ("Wan: teacher CFG 5.0, `lambda_reg` 0, compensation pool 32",
                   "CogVideoX: CFG 3.5, `lambda_reg` 0.5, pool 16",
                   "`k_step` 8, `eta` 0.9, 300 optimizer steps, batch 5 per GPU x grad-accum 4, lr 1e-4 / 5e-4",
                   "betas (0, 0.95), cosine with restarts, warmup 5, grad clip 1.0, bf16, gradient checkpointing"):
        assert phrase in FLAT, phrase
    for model, (cfg_scale, lambda_reg, pool) in {"wanx": (5.0, 0.0, 32), "cogvideox": (3.5, 0.5, 16)}.items():
        c = load_config(ROOT / model / "configs/tdm_asa.yaml")
        assert (c.tdm.cfg, c.tdm.lambda_reg, c.asa.pool) == (cfg_scale, lambda_reg, pool)
        assert (c.tdm.k_step, c.tdm.eta, c.train.max_train_steps) == (8, 0.9, 300)
        assert (c.train.train_batch_size, c.train.gradient_accumulation_steps) == (5, 4)
        assert (c.optim.learning_rate, c.optim.learning_rate_fake) == (1e-4, 5e-4)
        assert (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.lr_scheduler) == (0.0, 0.95, "cosine_with_restarts")
        assert (c.optim.lr_warmup_steps, c.optim.max_grad_norm) == (5, 1.0)
        assert (c.train.mixed_precision, c.train.gradient_checkpointing, c.asa.mode) == ("bf16", True, "energy")


def test_other_commands_the_readme_names_exist():
    # `make demo  # = python -m videoblade.demo --out runs/demo`
    assert "-m videoblade.demo --out runs/demo" in (ROOT / "Makefile").read_text()
    from videoblade.demo import _parse

    assert (_parse(["--quick"]).out, _parse(["--out", "runs/demo-q", "--quick"]).quick) == ("runs/demo", True)
    # benchmark flags named in the Benchmarks section: each in a script's parser
    sources = "".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.py"))
    from videoblade.inference import build_parser

    gen = set(build_parser()._option_string_actions)
    for flag in set(re.findall(r"--[a-z][a-z0-9-]*", _section("Benchmarks"))) - gen:
        assert f'"{flag}"' in sources, flag
    for script in ("attention", "transformer", "train", "e2e"):  # "--merge-from ... each script"
        assert '"--merge-from"' in (ROOT / "benchmarks" / f"{script}.py").read_text(), script


def test_process_prompts_flags_in_the_text(capsys):
    spec = importlib.util.spec_from_file_location("process_prompts2", ROOT / "utils/process_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    help_text = capsys.readouterr().out
    named = set(re.findall(r"process_prompts\.py[^`\n]*?(--[a-z_]+)", README))
    named |= set(re.findall(r"--[a-z_]+", " ".join(c for c in _code_commands(README) if "process_prompts" in c)))
    assert {"--model", "--out", "--negative_prompt"} <= named
    for flag in named:
        assert flag in help_text, flag


@pytest.fixture()
def fake_python(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    fake.chmod(0o755)
    return fake


def _after(args, flag):
    return args[args.index(flag) + 1]


def test_the_launch_commands_call_accelerate_as_the_text_says(fake_python):
    cmds = [c for c in _code_commands(_section("Training on real weights")) if " bash " in f" {c}"]
    assert len(cmds) == 2
    for cmd in cmds:
        model = "wanx" if "wanx/" in cmd else "cogvideox"
        user = shlex.split(cmd.split(".sh", 1)[1])
        model_path = re.search(r"MODEL_PATH=(\S+)", cmd).group(1)
        for extra, multi in (("", False), ("ACCELERATE_CONFIG= ", True),
                             ("NUM_MACHINES=2 MACHINE_RANK=1 MAIN_IP=10.0.0.7 MAIN_PORT=1234 ", False)):
            r = subprocess.run(["bash", "-c", extra + cmd], cwd=ROOT, env=_env(PYTHON=str(fake_python)),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            pwd, *args = r.stdout.splitlines()
            assert pwd == str(ROOT) and args[:2] == ["-m", "accelerate.commands.launch"]
            # `accelerate launch --config_file <model>/train/config.yaml -m videoblade.train --config <model>/configs/tdm_asa.yaml ...`
            assert _after(args, "--config") == f"{ROOT}/{model}/configs/tdm_asa.yaml"
            assert args[args.index("--config") - 2:args.index("--config")] == ["-m", "videoblade.train"]
            if multi:  # `ACCELERATE_CONFIG=` (empty): plain DDP
                assert "--multi_gpu" in args and "--config_file" not in args
            else:
                assert _after(args, "--config_file") == f"{ROOT}/{model}/train/config.yaml"
            if "NUM_MACHINES" in extra:
                assert (_after(args, "--num_machines"), _after(args, "--machine_rank")) == ("2", "1")
                assert (_after(args, "--main_process_ip"), _after(args, "--main_process_port")) == ("10.0.0.7", "1234")
                assert _after(args, "--num_processes") == "16"  # NUM_GPUS is per node
            else:
                assert _after(args, "--num_processes") == "8"
            assert f"model.path={model_path}" in args
            assert args[len(args) - len(user):] == user  # the user's key=value overrides come last


# ---------------------------------------------------------------------------- end to end on a tiny Wan
TINY_RUN = ["model.height=64", "model.width=96", "model.frames=17", "model.dtype=fp32", "train.mixed_precision=no",
            "train.max_train_steps=2", "train.train_batch_size=1", "train.gradient_accumulation_steps=1",
            "train.validation_steps=1", "train.num_validation_videos=1", "train.checkpointing_steps=1",
            "train.checkpoints_total_limit=1", "lora.rank=4", "lora.lora_alpha=4", "asa.block_size=16", "asa.pool=8",
            "asa.samples_per_block=8", "asa.min_retain=0.25", "asa.max_retain=0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from videoblade.models.tiny import tiny_model_folder

    work = tmp_path_factory.mktemp("readme")
    model = tiny_model_folder("wan")
    steps = _code_commands(_section("Training on real weights"))
    # step 1 as written (default prompt list), from a run folder, with the tiny folder for the model
    step1 = next(c for c in steps if "process_prompts.py" in c and "prompts-wan" in c)
    argv = [sys.executable if a == "python" else a for a in shlex.split(step1)]
    argv = [str(model) if "Wan2.1" in a else str(ROOT / a) if a.endswith(".py") else a for a in argv]
    r = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # step 2 on one CPU process (ACCELERATE_CONFIG empty, NUM_GPUS=1) at the tiny size
    step2 = next(c for c in steps if "train_wanx_1.3b.sh" in c)
    env = dict(re.findall(r"(\w+)=(\S+)", step2.split(" bash ")[0]))
    assert env["PROMPT_STORE"] == "runs/prompts-wan"
    try:
        import tensorboard  # noqa: F401

        report = "tensorboard"
    except ImportError:
        report = "none"
    env.update(MODEL_PATH=str(model), NUM_GPUS="1", ACCELERATE_CONFIG="", PYTHON=sys.executable,
               MAIN_PORT=str(_port()))
    env = _env(**env)
    cmd = ["bash", str(ROOT / "wanx/train/train_wanx_1.3b.sh"), *TINY_RUN, f"train.report_to={report}"]
    for extra in (["train.stop_at_step=1"], []):  # interrupted after step 1, then started again: resumes
        r = subprocess.run(cmd + extra, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return {"work": work, "model": model, "out": work / env["OUTPUT_DIR"], "report": report}


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, list(f.keys())


def test_the_run_directory_holds_what_the_readme_lists(run):
    out = run["out"]
    para = " ".join(re.search(r"\*\*Run directory\*\*(.*?)\n\n", README, flags=re.S).group(1).split())
    listed = ["config.yaml", "metrics.jsonl", "logs/", "checkpoints/checkpoint-N/", "samples/", "summary.json",
              "pytorch_lora_weights.safetensors", "lora_comfy.safetensors", "fake/pytorch_lora_weights.safetensors",
              "validation_embeds.safetensors"]
    for name in listed:
        assert f"`{name}" in para, f"the Run directory paragraph no longer names {name}"
    assert load_config(out / "config.yaml").train.output_dir == str(out)  # the resolved config
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss_fake", "loss_gen", "skipped_fake_steps", "lr_student", "grad_norm_student", "density_student",
                "s_per_it", "peak_memory_gb"):  # losses, skipped fake steps, lr, grad norms, density, s/it, memory
        assert key in rows[-1], key
    if run["report"] == "tensorboard":
        assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # the last checkpoints_total_limit
    assert sorted(p.name for p in (out / "samples").glob("*.mp4")) == ["step000001_0.mp4", "step000002_0.mp4"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"].endswith("checkpoint-1")  # rerun: resumed
    meta, _ = _meta(out / "pytorch_lora_weights.safetensors")
    record = json.loads(meta["videoblade"])
    assert {"family", "k_step", "eta", "rank", "lora_alpha", "asa"} <= set(record)
    assert (record["family"], record["rank"], record["asa"]["block_size"]) == ("wan", 4, 16)
    _, keys = _meta(out / "lora_comfy.safetensors")
    assert keys and all(k.startswith("diffusion_model.blocks.") for k in keys)  # the original-Wan / ComfyUI layout
    assert (out / "fake" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation_embeds.safetensors").is_file()


def _generate(cmd: str, run, cwd, **subst) -> int:
    from videoblade.cli import main

    for a, b in {"ckpt/Wan2.1-T2V-1.3B-Diffusers": str(run["model"]),
                 "runs/wan/pytorch_lora_weights.safetensors": str(run["out"] / "pytorch_lora_weights.safetensors"),
                 **subst}.items():
        cmd = cmd.replace(a, b)
    argv = shlex.split(cmd)
    assert argv[:2] == ["videoblade", "generate"], cmd
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return main(argv[1:] + ["--no-progress"])
    finally:
        os.chdir(old)


def test_the_inference_commands_as_written(run, tmp_path):
    import torch

    cmds = [c for c in _code_commands(_section("Inference").split("### Evaluation batches")[0])
            if c.startswith("videoblade generate")]
    assert len(cmds) == 2
    (tmp_path / "prompts.txt").write_text("# a comment\na cat walking in the city\n\na dog on the beach.\n")
    for cmd in cmds:
        assert _generate(cmd, run, tmp_path) == 0, cmd
    student = json.loads((tmp_path / "runs/samples/inference.json").read_text())
    s = student["settings"]
    # LoRA given: 8 steps (its recorded k_step), guidance 1, sparse, the tdm sampler at its recorded eta
    assert (s["method"], s["steps"], s["guidance"], s["attention"], s["sampler"], s["eta"]) == (
        "blade", 8, 1.0, "sparse", "tdm", 0.9)
    assert (tmp_path / "runs/samples/0000-a red fox trotting through fresh snow, golden hour-0.mp4").is_file()
    # what the report paragraph lists
    for key in ("height", "width", "frames", "latent_shape", "token_grid", "steps", "guidance", "sampler", "eta",
                "flow_shift", "negative_prompt", "asa", "lora", "dtype", "vae_dtype", "vae_tiling", "vae_chunk",
                "vae_compile", "seed"):
        assert key in s, key
    assert {"path", "layout", "rank", "alpha"} <= set(s["lora"]) and s["lora"]["rank"] == 4
    assert {"torch", "diffusers", "gpu", "commit"} <= set(student["environment"])
    assert "load_s" in student["timings"] and student["summary"]["complete"]
    video = student["prompts"][0]["videos"][0]
    for key in ("denoising_s", "decoding_s", "writing_s", "decode_frames_per_call", "frames", "density",
                "density_per_layer"):
        assert key in video, key
    if not torch.cuda.is_available():  # the table's CPU defaults
        assert (s["dtype"], s["vae_dtype"], s["vae_chunk"], video["decode_frames_per_call"]) == ("fp32", "fp32",
                                                                                                 "auto", 1)
    teacher = json.loads((tmp_path / "runs/teacher/inference.json").read_text())
    t = teacher["settings"]
    # --baseline: 50 steps, the family's CFG with the (empty) negative prompt, dense, UniPC
    assert (t["method"], t["steps"], t["guidance"], t["negative_prompt"], t["attention"], t["sampler"]) == (
        "baseline", 50, 5.0, "", "dense", "unipc")
    names = sorted(p.name for p in (tmp_path / "runs/teacher").glob("*.mp4"))
    assert names == ["0000-a cat walking in the city-0.mp4", "0001-a dog on the beach.-0.mp4"]  # # and blank skipped


def test_the_eval_dir_loop_as_written(run, tmp_path):
    text = _section("Evaluation batches")
    loop = next(c for c in _code_commands(text) if c.startswith("videoblade generate"))
    (tmp_path / "vbench_prompts.txt").write_text('Fireworks.\na cat: walking / in the "city"?\nFireworks.\n')
    comfy = str(run["out"] / "lora_comfy.safetensors")  # the ComfyUI export loads too
    for m in ("baseline", "blade"):
        flag = "--baseline --steps 4" if m == "baseline" else f"--lora {comfy}"
        cmd = re.sub(r"\$\(.*\)$", flag, loop)
        assert _generate(cmd, run, tmp_path) == 0, cmd
    root = tmp_path / "runs/eval/wan_videos"
    stems = ["Fireworks.", "a cat walking in the city"]  # separators and <>:"/\|?* removed, final '.' kept
    for m in ("baseline", "blade"):
        assert sorted(p.name for p in (root / m).iterdir()) == sorted(f"{s}-{k}.mp4" for s in stems for k in range(5))
        rep = json.loads((root / f"{m}.json").read_text())  # reports beside the folders
        assert rep["settings"]["method"] == m and rep["summary"]["ok"] == 10  # a prompt given twice: once
    assert rep["settings"]["lora"]["layout"] == "wan_original"
    assert "runs/eval/wan_videos/baseline/<prompt>-0.mp4" in text and "runs/eval/wan_videos/baseline.json" in text


def test_the_default_deepspeed_launch_with_the_recipes_validation_prompts(run, tmp_path):
    # step 2 as written keeps ACCELERATE_CONFIG (DeepSpeed ZeRO-3, ds_config.json) and the recipe's
    # train.validation_prompts file; one CPU process. The validation text encoder used to load under
    # transformers' zero.Init, partitioned to empty weights ("'weight' must be 2-D")
    env = _env(MODEL_PATH=str(run["model"]), PROMPT_STORE=str(run["work"] / "runs/prompts-wan"), NUM_GPUS="1",
               OUTPUT_DIR=str(tmp_path / "ds"), PYTHON=sys.executable, MAIN_PORT=str(_port()))
    tiny = [a for a in TINY_RUN if not a.startswith("train.max_train_steps")] + [
        "train.max_train_steps=1", "train.report_to=none"]
    r = subprocess.run(["bash", str(ROOT / "wanx/train/train_wanx_1.3b.sh"), *tiny], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "ds" / "samples").glob("*.mp4")) == ["step000001_0.mp4"]

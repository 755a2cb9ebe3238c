"""TDM trainer through the real entry point on tiny Wan / CogVideoX models (CPU).

Single process, DeepSpeed ZeRO-3 (single process), 2-process DDP on gloo; exact resume
(6 straight == 3 + resume + 3, bit for bit) and resume after SIGKILL; request validation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_port, subprocess_env
from safetensors import safe_open

from videoblade.config import load_config
from videoblade.data import encode_prompts_to_store
from videoblade.models.tiny import tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"a {c} {a} {m} in the {p}" for c in ("red", "blue", "green") for a in ("cat", "robot")
           for m in ("walking", "dancing") for p in ("city", "forest")]


def _env():
    return subprocess_env()


def _port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for fam in ("wan", "cogvideox"):
        folder = tiny_model_folder(fam)
        store = encode_prompts_to_store(folder, PROMPTS, root / f"store-{fam}", dtype="fp32", progress=False)
        out[fam] = (folder, store)
    return out


def _args(tiny, fam, out_dir, **over):
    folder, store = tiny[fam]
    base = {"model.path": folder, "train.prompt_store": store, "train.output_dir": out_dir,
            "model.dtype": "fp32", "train.mixed_precision": "'no'", "train.report_to": "none",
            "train.train_batch_size": 1, "train.gradient_accumulation_steps": 2, "train.max_train_steps": 3,
            "train.validation_steps": 0, "lora.rank": 4, "lora.lora_alpha": 4, "asa.block_size": 16,
            "asa.pool": 8, "asa.samples_per_block": 8, "asa.min_retain": 0.25, "asa.max_retain": 0.5}
    if fam == "cogvideox":
        base.update({"tdm.cfg": 3.5, "tdm.lambda_reg": 0.5})
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _run(args, launcher=(), timeout=600, check=True, env=None):
    cmd = [*launcher] if launcher else [sys.executable, "-m", "videoblade.train"]
    r = subprocess.run([*cmd, *args], env=_env() | (env or {}), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _no_constants(name):
    raise AssertionError(f"{name} in a JSON file: not JSON, strict readers reject it")


def _metrics(out_dir):
    # strict: a bare NaN / Infinity fails (other tools read these files)
    return [json.loads(x, parse_constant=_no_constants) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_run_files_are_strict_json():
    # a skipped fake step's loss can be NaN: the run files write null there
    from videoblade.io.jsonfile import strict_json as _strict_json

    rec = {"loss_fake": float("nan"), "x": [1.5, float("-inf")], "nested": {"y": float("inf")}, "n": 3, "s": "a"}
    text = json.dumps(_strict_json(rec))
    assert json.loads(text, parse_constant=_no_constants) == {"loss_fake": None, "x": [1.5, None],
                                                              "nested": {"y": None}, "n": 3, "s": "a"}


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _check_trained(out_dir, fake_trained=True):
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text(), parse_constant=_no_constants)
    assert summary["finished"]
    rows = _metrics(out_dir)
    assert [r["step"] for r in rows] == list(range(1, summary["step"] + 1))
    for r in rows:
        for k in ("loss_fake", "loss_gen", "real_fake_gap", "lr_student", "lr_fake", "s_per_it", "peak_memory_gb"):
            assert torch.isfinite(torch.tensor(r[k])), (k, r)
    assert rows[-1]["lr_student"] > 0 and rows[-1]["lr_fake"] > rows[-1]["lr_student"]
    student = _tensors(out_dir / "pytorch_lora_weights.safetensors")
    fake = _tensors(out_dir / "fake" / "pytorch_lora_weights.safetensors")
    # LoRA B starts at zero: any non-zero B means the optimizer moved the weights
    assert max(v.abs().max().item() for k, v in student.items() if "lora_B" in k) > 0
    moved = max(v.abs().max().item() for k, v in fake.items() if "lora_B" in k)
    assert (moved > 0) == fake_trained
    assert (out_dir / "config.yaml").is_file()
    cfg = load_config(out_dir / "config.yaml")
    assert cfg.train.output_dir == str(out_dir)
    return summary, rows


@pytest.mark.slow
def test_single_process_wan_with_validation_video(tiny, tmp_path):
    out = tmp_path / "wan"
    r = _run(_args(tiny, "wan", out, **{"train.validation_steps": 3, "train.num_validation_videos": 1}))
    assert "TDM:" in r.stderr  # the progress bar
    summary, rows = _check_trained(out)
    assert not summary["deepspeed"] and summary["shared_base"] and summary["num_processes"] == 1
    assert 0 < rows[-1]["density_student"] < 1  # ASA ran sparse on the student
    from videoblade.io.video import read_video

    assert len(summary["videos"]) == 1
    frames = read_video(summary["videos"][0])
    assert frames.shape[0] == 17 and frames.shape[-1] == 3
    assert (out / "lora_comfy.safetensors").is_file()
    from videoblade.io.lora import read_lora

    info = read_lora(out)
    assert info.meta["family"] == "wan" and info.meta["k_step"] == 8 and info.meta["asa"]["block_size"] == 16
    assert (out / "checkpoints" / "checkpoint-3" / "state.json").is_file()


@pytest.mark.slow
def test_single_process_cogvideox_and_skipped_fake_steps(tiny, tmp_path):
    # a bound below any loss: every fake step is skipped and counted; the student still trains
    out = tmp_path / "cog"
    r = _run(_args(tiny, "cogvideox", out, **{"tdm.max_fake_loss": 1e-12}), env={"TQDM_DISABLE": "1"})
    assert "TDM:" not in r.stderr  # tqdm's own switch silences the training bar
    summary, rows = _check_trained(out, fake_trained=False)
    assert summary["skipped_fake_steps"] == summary["fake_steps"] == 6
    assert rows[-1]["skipped_fake_steps"] == 6 and rows[-1]["loss_fake_reg"] > 0
    assert not (out / "lora_comfy.safetensors").exists()  # the ComfyUI layout is Wan's


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_args(tiny, "wan", out, **{"train.max_train_steps": 6, "train.checkpointing_steps": 1}))
    return out


def _assert_same_run(a, b):
    ra, rb = _metrics(a), _metrics(b)
    keys = ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_student", "lr_student", "density_student")
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    for f in ("pytorch_lora_weights.safetensors", "fake/pytorch_lora_weights.safetensors"):
        ta, tb = _tensors(Path(a) / f), _tensors(Path(b) / f)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


CURVE = ROOT / "tests" / "data" / "tdm_tiny_wan_curve.json"


@pytest.mark.slow
def test_loss_curve_matches_the_committed_one(straight):
    """The tiny Wan run's per-step losses, grad norms and density against the committed curve
    (torchtitan's practice): a change to the TDM functions, the sampler, the schedule or ASA that
    moves the numbers shows here even when every run still trains. Tolerance rtol 1e-3: float32
    CPU matmuls may round differently across CPUs and BLAS builds, far below any real change.
    After an intended change: VIDEOBLADE_UPDATE_CURVES=1 rewrites the file (commit it, say why)."""
    keys = ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_student", "density_student")
    got = {k: [r[k] for r in _metrics(straight)] for k in keys}
    if os.environ.get("VIDEOBLADE_UPDATE_CURVES") == "1":
        CURVE.parent.mkdir(parents=True, exist_ok=True)
        CURVE.write_text(json.dumps({"run": "tests/test_trainer.py straight fixture (tiny Wan, 6 steps)", **got},
                                    indent=1) + "\n")
    want = json.loads(CURVE.read_text())
    for k in keys:
        assert len(got[k]) == len(want[k]) == 6, k
        torch.testing.assert_close(torch.tensor(got[k], dtype=torch.float64), torch.tensor(want[k], dtype=torch.float64),
                                   rtol=1e-3, atol=1e-6, msg=lambda m, k=k: f"{k}: {m} (see the docstring)")


@pytest.mark.slow
def test_resume_is_bit_exact(tiny, straight, tmp_path):
    out = tmp_path / "resumed"
    args = _args(tiny, "wan", out, **{"train.max_train_steps": 6, "train.checkpointing_steps": 1})
    _run(args + ["train.stop_at_step=3"])
    assert not (out / "summary.json").exists() or not json.loads((out / "summary.json").read_text())["finished"]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    _run(args)
    _assert_same_run(straight, out)
    # checkpoints_total_limit (3) keeps the newest ones only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{i}" for i in (4, 5, 6)]


@pytest.mark.slow
def test_sigkill_midrun_resumes_from_last_checkpoint(tiny, straight, tmp_path):
    out = tmp_path / "killed"
    args = _args(tiny, "wan", out, **{"train.max_train_steps": 6, "train.checkpointing_steps": 1})
    p = subprocess.Popen([sys.executable, "-m", "videoblade.train", *args], env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "checkpoint-1" / "state.json").exists():
            assert p.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    assert not (out / "summary.json").exists()
    done = [r["step"] for r in _metrics(out)]
    assert done and done[-1] < 6
    r = _run(args)
    assert "done: step 6/6" in r.stdout
    # it resumed (did not restart) and ends exactly where the uninterrupted run ends
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    ra = _metrics(out)
    assert [x["step"] for x in ra][-6:] != [1, 2, 3, 4, 5, 6] or len(ra) == 6
    for f in ("pytorch_lora_weights.safetensors", "fake/pytorch_lora_weights.safetensors"):
        ta, tb = _tensors(straight / f), _tensors(out / f)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tiny, tmp_path):
    # train.compile: the same run with every block under torch.compile (aot_eager: the graph
    # capture, autograd and role switches under compile, without inductor's C++ build time)
    over = {"train.max_train_steps": 2, "train.gradient_accumulation_steps": 1}
    _run(_args(tiny, "wan", tmp_path / "eager", **over))
    _run(_args(tiny, "wan", tmp_path / "comp", **over, **{"train.compile": "true", "train.compile_backend": "aot_eager"}))
    summary, _ = _check_trained(tmp_path / "comp")
    assert summary["compiled_blocks"] == 2 and summary["compiled_graphs"] > 0
    assert json.loads((tmp_path / "eager" / "summary.json").read_text())["compiled_graphs"] == 0
    ra, rc = _metrics(tmp_path / "eager"), _metrics(tmp_path / "comp")
    for k in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_student", "density_student"):
        assert [r[k] for r in rc] == pytest.approx([r[k] for r in ra], rel=1e-4, abs=1e-6), k
    for f in ("pytorch_lora_weights.safetensors", "fake/pytorch_lora_weights.safetensors"):
        te, tc = _tensors(tmp_path / "eager" / f), _tensors(tmp_path / "comp" / f)
        for k in te:
            torch.testing.assert_close(tc[k], te[k], rtol=1e-4, atol=1e-6)
    assert load_config(tmp_path / "comp" / "config.yaml").train.compile is True


@pytest.mark.slow
def test_deepspeed_zero3_single_process(tiny, tmp_path):
    ds = json.loads((ROOT / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(ds))
    out = tmp_path / "ds"
    _run(_args(tiny, "wan", out, **{"train.deepspeed_config": cfg, "train.checkpointing_steps": 2}))
    summary, rows = _check_trained(out)
    assert summary["deepspeed"] and not summary["shared_base"]
    assert (out / "checkpoints" / "checkpoint-3" / "ds_student").is_dir()


@pytest.mark.slow
def test_ddp_two_processes_gloo_through_the_launch_script(tiny, tmp_path):
    # the shipped launch script (plain DDP: ACCELERATE_CONFIG empty), 2 processes on gloo
    out = tmp_path / "ddp"
    folder, store = tiny["cogvideox"]
    env = dict(_env(), MODEL_PATH=str(folder), PROMPT_STORE=str(store), OUTPUT_DIR=str(out), NUM_GPUS="2",
               ACCELERATE_CONFIG="", MIXED_PRECISION="no", MAIN_PORT=str(_port()), PYTHON=sys.executable)
    args = [a for a in _args(tiny, "cogvideox", out) if not a.startswith(("model.path=", "train.prompt_store=",
                                                                           "train.output_dir="))]
    args += ["model.height=64", "model.width=96", "model.frames=17", "train.validation_prompts=null"]
    r = subprocess.run(["bash", "cogvideox/train/train_tdm.sh", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    summary, rows = _check_trained(out)
    assert summary["num_processes"] == 2 and summary["shared_base"]
    a, b = summary["lora_checksums_per_rank"]
    assert a == b  # gradients were all-reduced: both ranks hold the same LoRAs
    cfg = load_config(out / "config.yaml")
    assert (cfg.tdm.cfg, cfg.tdm.lambda_reg, cfg.asa.pool) == (3.5, 0.5, 8)  # the YAML recipe + overrides


def test_entry_point_destroys_the_process_group_after_a_finished_run(monkeypatch):
    # left to interpreter exit, gloo's threads can abort a finished rank (SIGABRT): the entry
    # point destroys the group itself once training has returned
    import torch.distributed as dist

    from videoblade import train as entry

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_port()))
    monkeypatch.setattr(entry, "load_config", lambda *a, **k: object())
    monkeypatch.setattr("videoblade.distill.trainer.train",
                        lambda cfg: {"step": 1, "max_train_steps": 1, "loras": {}})
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert entry.main(["model.path=x"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_validate_request_fails_before_loading(tiny, tmp_path, monkeypatch):
    from videoblade.data import read_prompt_file
    from videoblade.distill.trainer import TrainRequestError, validate_request

    def cfg(**over):
        return load_config(None, _args(tiny, "wan", tmp_path / "v", **over))

    req = validate_request(cfg())
    assert req.family == "wan" and req.geometry.latent_shape[0] == 4
    with pytest.raises(TrainRequestError, match="encoded for a cogvideox model"):
        validate_request(cfg(**{"train.prompt_store": tiny["cogvideox"][1]}))
    with pytest.raises(TrainRequestError, match="height=72 is not divisible by 16"):
        validate_request(cfg(**{"model.height": 72}))
    with pytest.raises(TrainRequestError, match="not a prompt store|process_prompts"):
        validate_request(cfg(**{"train.prompt_store": tmp_path}))
    with pytest.raises(TrainRequestError, match="does not exist"):
        validate_request(cfg(**{"model.path": tmp_path / "missing"}))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            with pytest.raises(TrainRequestError, match="not writable"):
                validate_request(cfg(**{"train.output_dir": ro / "x"}))
    finally:
        ro.chmod(0o700)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(TrainRequestError, match="optimizer"):
        validate_request(cfg(**{"train.deepspeed_config": bad}))
    with pytest.raises(TrainRequestError, match="train.compile does not work under DeepSpeed"):
        validate_request(cfg(**{"train.deepspeed_config": ROOT / "ds_config.json", "train.compile": "true"}))
    # LoRA targets are checked on a meta-device transformer: one that matches nothing, and one that
    # matches a layer peft cannot wrap (it failed inside peft after the weights had loaded)
    with pytest.raises(TrainRequestError, match=r"\['to_qq'\] match no module"):
        validate_request(cfg(**{"lora.target_modules": "[to_q,to_qq]", "train.export_comfy": "false"}))
    with pytest.raises(TrainRequestError, match=r"norm_q \(RMSNorm\).*linear, convolution and embedding"):
        validate_request(cfg(**{"lora.target_modules": "[norm_q]", "train.export_comfy": "false"}))
    assert validate_request(cfg(**{"lora.target_modules": "[to_q,ffn.net.2]"})).target_modules == ["to_q", "ffn.net.2"]
    # the recipes' relative validation list (videoblade/data/prompts/val.txt) is found from any directory;
    # a relative path that exists where the run starts wins
    monkeypatch.chdir(tmp_path)
    req = validate_request(cfg(**{"train.validation_prompts": "videoblade/data/prompts/val.txt"}))
    assert req.validation_prompts == read_prompt_file(ROOT / "videoblade/data/prompts/val.txt")
    (tmp_path / "videoblade/data/prompts").mkdir(parents=True)
    (tmp_path / "videoblade/data/prompts/val.txt").write_text("my own prompt\n")
    req = validate_request(cfg(**{"train.validation_prompts": "videoblade/data/prompts/val.txt"}))
    assert req.validation_prompts == ["my own prompt"]
    # k_step, t_max and sample.steps are checked against tdm.num_train_timesteps: it must be the folder's
    with pytest.raises(TrainRequestError, match="scheduler has 1000 training timesteps"):
        validate_request(cfg(**{"tdm.num_train_timesteps": 2000}))
    # a Wan store encoded at another text length than the family's (what WanPipeline uses) is refused
    # unless the run asks for that length explicitly
    folder, _ = tiny["wan"]
    short = encode_prompts_to_store(folder, PROMPTS[:3], tmp_path / "short", text_max_length=8, dtype="fp32",
                                    progress=False)
    with pytest.raises(TrainRequestError, match="has text_max_length 8"):
        validate_request(cfg(**{"train.prompt_store": short}))
    assert validate_request(cfg(**{"train.prompt_store": short, "model.text_max_length": 8})).store.text_max_length == 8


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    from videoblade.distill.trainer import latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "checkpoint-2").mkdir(parents=True)
    (root / "checkpoint-2" / "state.json").write_text("{}")
    (root / ".tmp-checkpoint-4").mkdir()  # a save killed half way
    (root / "checkpoint-3").mkdir()  # no state.json: not complete
    assert latest_checkpoint(tmp_path) == root / "checkpoint-2"
    assert latest_checkpoint(tmp_path / "nothing") is None


def _average_worker(rank, port, out):
    # one rank of test_skipped_boundary_step_averages_the_window_over_ranks
    from types import SimpleNamespace

    import torch.distributed as dist

    from videoblade.distill.trainer import TDMTrainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))  # rank 0: 1, rank 1: 2 -> mean 1.5
        b.grad = torch.tensor([float(rank) * 4.0, 0.0, -2.0])
        fake = SimpleNamespace(engines=None, params={"fake": [a, b, c]},
                               accelerator=SimpleNamespace(num_processes=2, sync_gradients=True))
        TDMTrainer._average_unsynced_grads(fake, "fake")
        out.put((rank, a.grad.tolist(), b.grad.tolist(), c.grad))
        fake.accelerator.sync_gradients = False  # inside the window: DDP's own no_sync, left alone
        a.grad = torch.full((3,), float(rank))
        TDMTrainer._average_unsynced_grads(fake, "fake")
        out.put((rank, a.grad.tolist()))
    finally:
        dist.destroy_process_group()


def test_skipped_boundary_step_averages_the_window_over_ranks():
    # DDP + gradient accumulation: a fake step skipped at the accumulation boundary runs no backward,
    # so DDP never all-reduces the window's earlier (no_sync) gradients; the trainer averages them by
    # hand, or each rank would step on its own and the fake LoRAs would drift apart
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_average_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    synced = sorted((g for g in got if len(g) == 4), key=lambda g: g[0])
    assert [g[0] for g in synced] == [0, 1]
    for _, a, b, c in synced:  # both ranks: the mean of the two, and no gradient made up for c
        assert a == [1.5, 1.5, 1.5] and b == [2.0, 0.0, -2.0] and c is None
    assert sorted(g for g in got if len(g) == 2) == [(0, [0.0, 0.0, 0.0]), (1, [1.0, 1.0, 1.0])]


def test_entry_point_takes_config_after_overrides(monkeypatch, tmp_path):
    # the launch scripts put their own key=value pairs first and the user's arguments after them, so
    # `bash wanx/train/train_wanx_1.3b.sh --config my.yaml tdm.cfg=4` reaches argparse as overrides,
    # then --config, then more overrides
    from videoblade import train as entry

    y = tmp_path / "my.yaml"
    y.write_text("tdm:\n  cfg: 3.0\n")
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return {"step": 1, "max_train_steps": 1, "loras": {}}

    monkeypatch.setattr("videoblade.distill.trainer.train", fake_train)
    assert entry.main(["model.path=m", "train.prompt_store=s", "--config", str(y), "tdm.lambda_reg=0.5"]) == 0
    c = seen["cfg"]
    assert (c.model.path, c.train.prompt_store, c.tdm.cfg, c.tdm.lambda_reg) == ("m", "s", 3.0, 0.5)


def test_negative_prompt_must_be_the_one_the_store_embedded(tiny, tmp_path):
    # the teacher's CFG uses the store's negative embedding: tdm.negative_prompt must name the same
    # prompt, or the run would silently use another negative prompt than the config says
    from videoblade.distill.trainer import TrainRequestError, validate_request

    folder, _ = tiny["wan"]
    store = encode_prompts_to_store(folder, PROMPTS[:2], tmp_path / "neg", dtype="fp32", negative_prompt="blurry",
                                    progress=False)

    def cfg(**over):
        return load_config(None, _args(tiny, "wan", tmp_path / "v", **{"train.prompt_store": store, **over}))

    assert validate_request(cfg(**{"tdm.negative_prompt": "blurry"})).store.negative_prompt == "blurry"
    with pytest.raises(TrainRequestError, match=r"tdm.negative_prompt='' .*'blurry'.*process_prompts.py"):
        validate_request(cfg())
    with pytest.raises(TrainRequestError, match=r"tdm.negative_prompt='static' .*'blurry'.*--negative_prompt"):
        validate_request(cfg(**{"tdm.negative_prompt": "static"}))
    # the default store (negative "") and the default config agree
    assert validate_request(cfg(**{"train.prompt_store": tiny["wan"][1]})).store.negative_prompt == ""
    # an older store whose manifest does not record its negative prompt: only the default can run (with a note)
    mf = Path(store) / "manifest.json"
    m = json.loads(mf.read_text())
    del m["negative_prompt"]
    mf.write_text(json.dumps(m))
    req = validate_request(cfg())
    assert req.store.negative_prompt is None and any("negative prompt" in n for n in req.notes)
    with pytest.raises(TrainRequestError, match=r"does not record.*re-encode"):
        validate_request(cfg(**{"tdm.negative_prompt": "blurry"}))


def test_validation_videos_follow_the_sample_settings(tiny, tmp_path):
    # sample.steps / eta / guidance / sampler / flow_shift drive the validation videos (None: tdm.k_step, tdm.eta)
    from types import SimpleNamespace

    from videoblade.distill.trainer import TDMTrainer, validate_request
    from videoblade.sampling import sample, sample_unipc

    req = validate_request(load_config(None, _args(tiny, "wan", tmp_path / "v")))
    transformer = req.adapter.load(req.folder, dtype=torch.float32, components=("transformer",)).transformer
    calls = []
    transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    embeds = req.store.get([0, 1]).float()
    negative = req.store.negative().float()

    def latents(**over):
        cfg = load_config(None, _args(tiny, "wan", tmp_path / "v", **{"tdm.k_step": 3, "tdm.eta": 0.5, **over}))
        fake = SimpleNamespace(cfg=cfg, req=req, roles=SimpleNamespace(select=lambda role: None),
                               nograd_model={"student": transformer}, generator=torch.Generator(),
                               device=torch.device("cpu"), negative=negative)
        calls.clear()
        out = TDMTrainer._validation_latents(fake, embeds)
        return out, len(calls)

    def gen():
        return torch.Generator().manual_seed(0)

    common = dict(progress=False)
    got, n = latents()  # defaults: the student's own k_step and eta
    assert n == 3
    torch.testing.assert_close(got, sample(req.adapter, transformer, req.schedule, embeds, req.geometry, steps=3,
                                           eta=0.5, generator=gen(), **common), rtol=0, atol=0)
    got, n = latents(**{"sample.steps": 2, "sample.eta": 1.0, "sample.guidance": 2.0})
    assert n == 4  # 2 steps x (cond + uncond)
    want = sample(req.adapter, transformer, req.schedule, embeds, req.geometry, steps=2, eta=1.0, generator=gen(),
                  guidance=2.0, negative_embeds=negative, **common)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got, n = latents(**{"sample.sampler": "unipc", "sample.steps": 2, "sample.flow_shift": 5.0})
    assert n == 2
    want = sample_unipc(req.adapter, transformer, req.schedule, embeds, req.geometry, steps=2, generator=gen(),
                        flow_shift=5.0, **common)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    other = sample_unipc(req.adapter, transformer, req.schedule, embeds, req.geometry, steps=2, generator=gen(),
                         **common)
    assert not torch.equal(want, other)  # the shift reached the scheduler


def test_sample_settings_the_model_cannot_use_fail_before_loading(tiny, tmp_path):
    from videoblade.distill.trainer import TrainRequestError, validate_request

    with pytest.raises(TrainRequestError, match="sample.flow_shift.*flow-matching"):
        validate_request(load_config(None, _args(tiny, "cogvideox", tmp_path / "c", **{
            "sample.sampler": "unipc", "sample.flow_shift": 5.0})))
    cfg = load_config(None, _args(tiny, "cogvideox", tmp_path / "c", **{"sample.sampler": "unipc"}))
    assert validate_request(cfg).family == "cogvideox"


def _ds_cfg(tmp_path, **keys):
    ds = json.loads((ROOT / "ds_config.json").read_text())
    ds.update(keys)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    return p


@pytest.mark.parametrize("key, value, run_key, run_value", [
    ("gradient_accumulation_steps", 8, "train.gradient_accumulation_steps", 2),
    ("train_micro_batch_size_per_gpu", 4, "train.train_batch_size", 1),
    ("train_batch_size", 16, "train.train_batch_size", 1),
    ("gradient_clipping", 0.5, "optim.max_grad_norm", 1.0),
    ("bf16", {"enabled": True}, "train.mixed_precision", "no"),
    ("bf16", {"enabled": False}, "train.mixed_precision", "bf16"),
    ("fp16", {"enabled": True}, "train.mixed_precision", "bf16"),
], ids=["accum", "micro", "global", "clip", "bf16-on", "bf16-off", "fp16-on"])
def test_deepspeed_json_contradicting_the_run_config_is_refused(tiny, tmp_path, monkeypatch, key, value, run_key,
                                                                 run_value):
    # an explicit number in the DeepSpeed JSON that the run config contradicts: DeepSpeed would train with
    # one, the resolved config.yaml would record the other
    from videoblade.distill.trainer import TrainRequestError, _fill_ds_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = _ds_cfg(tmp_path, **{key: value})
    cfg = load_config(None, _args(tiny, "wan", tmp_path / "v", **{run_key: run_value}))
    shown = value["enabled"] if isinstance(value, dict) else value
    with pytest.raises(TrainRequestError, match=rf"{key}.*{str(shown).lower()}.*{run_key}.*ds\.json"):
        _fill_ds_config(str(ds), cfg)


def test_deepspeed_json_agreeing_with_the_run_config_is_kept(tiny, tmp_path, monkeypatch):
    from videoblade.distill.trainer import _fill_ds_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = _ds_cfg(tmp_path, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=1, train_batch_size=4,
                 gradient_clipping=1, bf16={"enabled": False}, fp16={"enabled": "false"})
    cfg = load_config(None, _args(tiny, "wan", tmp_path / "v"))  # batch 1 x accum 2, clip 1.0, precision no
    d = _fill_ds_config(str(ds), cfg)
    assert (d["gradient_accumulation_steps"], d["train_micro_batch_size_per_gpu"], d["train_batch_size"]) == (2, 1, 4)
    bf = load_config(None, _args(tiny, "wan", tmp_path / "v", **{"train.mixed_precision": "bf16"}))
    assert _fill_ds_config(str(_ds_cfg(tmp_path, bf16={"enabled": True})), bf)["bf16"]["enabled"] is True
    # "auto" is still filled from the run config
    auto = _fill_ds_config(str(ROOT / "ds_config.json"), cfg)
    assert (auto["gradient_accumulation_steps"], auto["train_batch_size"], auto["gradient_clipping"]) == (2, 4, 1.0)


def test_comfy_export_of_unmappable_lora_targets_fails_before_loading(tiny, tmp_path):
    # the original-Wan / ComfyUI layout names the blocks' attention and feed-forward only: a LoRA on
    # proj_out could not be exported at the end of the run, so the request is refused up front
    from videoblade.distill.trainer import TrainRequestError, validate_request

    def cfg(fam="wan", **over):
        return load_config(None, _args(tiny, fam, tmp_path / "v", **over))

    targets = {"lora.target_modules": "[to_q,to_k,ffn.net.0.proj,proj_out]"}
    with pytest.raises(TrainRequestError, match=r"proj_out.*train.export_comfy=false"):
        validate_request(cfg(**targets))
    assert validate_request(cfg(**targets, **{"train.export_comfy": "false"})).target_modules[-1] == "proj_out"
    assert validate_request(cfg(**{"lora.target_modules": "[to_q,to_out.0,ffn.net.0.proj,ffn.net.2]"}))
    # no ComfyUI export for CogVideoX (whose feed-forward is ff.net.*: ffn.net.* matches nothing there)
    assert validate_request(cfg("cogvideox", **{"lora.target_modules": "[to_q,to_k,ff.net.0.proj,proj_out]"}))


def test_launch_script_resolves_relative_paths_from_where_it_is_started(tmp_path):
    # a researcher starts the model's script from a run folder with relative paths: the data paths
    # are the caller's, the recipe YAML and accelerate config the repository's (the script cds there)
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
    fake.chmod(0o755)
    work = tmp_path / "work"
    (work / "my").mkdir(parents=True)
    (work / "my" / "run.yaml").write_text("{}\n")
    env = dict(os.environ, MODEL_PATH="models/wan", PROMPT_STORE="stores/wan", OUTPUT_DIR="runs/a", NUM_GPUS="1",
               PYTHON=str(fake))
    r = subprocess.run(["bash", str(ROOT / "wanx/train/train_wanx_1.3b.sh"), "tdm.cfg=4"], env=env, cwd=work,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(ROOT)
    assert f"model.path={work}/models/wan" in lines and f"train.prompt_store={work}/stores/wan" in lines
    assert f"train.output_dir={work}/runs/a" in lines and lines[-1] == "tdm.cfg=4"
    assert lines[lines.index("--config") + 1] == f"{ROOT}/wanx/configs/tdm_asa.yaml"
    assert lines[lines.index("--config_file") + 1] == f"{ROOT}/wanx/train/config.yaml"
    # a CONFIG that exists where the script was started is that one
    r = subprocess.run(["bash", str(ROOT / "wanx/train/train_wanx_1.3b.sh")], env=dict(env, CONFIG="my/run.yaml"),
                       cwd=work, capture_output=True, text=True, timeout=60)
    lines = r.stdout.splitlines()
    assert lines[lines.index("--config") + 1] == f"{work}/my/run.yaml"

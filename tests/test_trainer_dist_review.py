"""Trainer review, multi-process and DeepSpeed paths: 2-process DDP on gloo (`accelerate launch
--multi_gpu`, CPU) and DeepSpeed ZeRO in one CPU process, on a tiny Wan (32x32x5, k_step 2).

Fake-step skips are forced where a test needs them: run as a script under the launcher, this file
wraps `tdm.fake_score_loss` so the calls listed in VB_SKIP_CALLS (0-based, per rank) return NaN, then
calls the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, subprocess_env, tiny_train_overrides, tiny_wan_with_store

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat walking", "a blue robot dancing", "a green car in the city", "sunset over the sea",
           "a dog on a beach", "rain in a forest"]


def _driver() -> int:
    from videoblade import train as entry
    from videoblade.distill import tdm

    skip = {int(x) for x in os.environ.get("VB_SKIP_CALLS", "").split(",") if x}
    real = tdm.fake_score_loss
    calls = [0]

    def fake_score_loss(*a, **k):
        loss, parts = real(*a, **k)
        i = calls[0]
        calls[0] += 1
        if i in skip:
            loss = loss * float("nan")
        return loss, parts

    tdm.fake_score_loss = fake_score_loss
    return entry.main(sys.argv[1:])


def _env(**extra):
    return subprocess_env(TQDM_DISABLE="1", **extra)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return tiny_wan_with_store(tmp_path_factory, PROMPTS)


def _args(wan, out, **over):
    return tiny_train_overrides(*wan, out, **{"train.gradient_accumulation_steps": 2, "train.max_train_steps": 2,
                                              "train.checkpointing_steps": 1, **over})


def _launch(args, nproc=2, skip=(), timeout=300, check=True):
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", __file__]
    else:
        cmd = [sys.executable, __file__]
    r = subprocess.run([*cmd, *args], env=_env(VB_SKIP_CALLS=",".join(map(str, skip))), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


LORAS = ("pytorch_lora_weights.safetensors", "fake/pytorch_lora_weights.safetensors")


@pytest.mark.slow
def test_ddp_shared_base_fake_step_skipped_at_the_accumulation_boundary(wan, tmp_path):
    # shared base under DDP (find_unused_parameters=True), accumulation 2, the fake step skipped at the
    # boundary (call 1) after a fake backward inside the window (call 0, under no_sync): DDP's reducer
    # still counted the fake LoRA as used this window, and the generator's synced backward found it with
    # no gradient (zero_grad had set it to None) -> "RuntimeError: Encountered gradient which is
    # undefined, but still allreduced by DDP reducer" on both ranks
    out = tmp_path / "ddp"
    _launch(_args(wan, out), skip=(1,))
    s = _summary(out)
    assert s["finished"] and s["num_processes"] == 2 and s["shared_base"]
    assert s["skipped_fake_steps"] == 1 and s["fake_steps"] == 4
    a, b = s["lora_checksums_per_rank"]
    assert a == b  # the fake LoRA stepped on the averaged window on both ranks
    rows = _metrics(out)
    assert [r["skipped_fake_steps"] for r in rows] == [1, 1]
    assert rows[0]["grad_norm_fake"] > 0  # step 1 stepped on the window's first micro-step
    assert max(v.abs().max().item() for k, v in _tensors(out / LORAS[1]).items() if "lora_B" in k) > 0


def _ds_json(tmp_path, stage):
    ds = json.loads((ROOT / "ds_config.json").read_text())
    ds["zero_optimization"] = {"stage": stage}
    p = tmp_path / f"ds{stage}.json"
    p.write_text(json.dumps(ds))
    return p


DS_OVER = {"train.max_train_steps": 3, "train.share_base": "false", "train.checkpointing_steps": 1,
           "train.checkpoints_total_limit": 3}


@pytest.fixture(scope="module")
def zero2(wan, tmp_path_factory):
    """3 steps, the fake step skipped at step 1's boundary (call 1): fp32 ZeRO-2 in one process, and the
    same run without DeepSpeed (separate bases, as DeepSpeed has)."""
    tmp = tmp_path_factory.mktemp("zero2")
    ds = _ds_json(tmp, 2)
    _launch(_args(wan, tmp / "ref", **DS_OVER), nproc=1, skip=(1,))
    _launch(_args(wan, tmp / "ds", **DS_OVER, **{"train.deepspeed_config": ds}), nproc=1, skip=(1,))
    return tmp, ds


@pytest.mark.slow
def test_deepspeed_fake_step_skipped_at_the_boundary_steps_like_without_deepspeed(zero2):
    # DeepSpeed steps an engine inside the boundary's backward: with the boundary's fake step skipped,
    # the window's first micro-step stayed in the engine and was folded into the next window's update
    # (step 2 stepped on 3 micro-steps, grad_norm_fake missing at step 1), unlike DDP / one process,
    # which step on the window minus the skipped micro-step. fp32 ZeRO-2 against the run without
    # DeepSpeed: the same numbers.
    tmp, _ = zero2
    s = _summary(tmp / "ds")
    assert s["deepspeed"] and s["skipped_fake_steps"] == 1
    ref, ds = _metrics(tmp / "ref"), _metrics(tmp / "ds")
    for k in ("grad_norm_fake", "grad_norm_student", "loss_fake", "loss_gen", "lr_fake", "lr_student"):
        want, got = [r.get(k) for r in ref], [r.get(k) for r in ds]
        assert None not in got[1:] and (want[0] is None) == (got[0] is None), (k, got)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), k
    for f in LORAS:
        a, b = _tensors(tmp / "ref" / f), _tensors(tmp / "ds" / f)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_deepspeed_checkpoint_holds_the_loras_only_and_resumes_exactly(wan, zero2):
    # DeepSpeed's save_checkpoint wrote each engine's whole module state: under ZeRO-2 the full frozen
    # base transformer twice (student and fake engines) in every checkpoint (Wan 14B: ~56 GB each,
    # times checkpoints_total_limit). And a checkpoint written after a skipped boundary lost the
    # window's gradients the engine still held, so the resumed run trained on other gradients.
    tmp, ds = zero2
    for role in ("student", "fake"):
        (f,) = (tmp / "ds" / "checkpoints" / "checkpoint-1" / f"ds_{role}" / "state").glob("*model_states.pt")
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        assert module and all(".lora_" in k for k in module), [k for k in module if ".lora_" not in k][:3]
    out = tmp / "resumed"
    _launch(_args(wan, out, **DS_OVER, **{"train.deepspeed_config": ds, "train.stop_at_step": 1}), nproc=1,
            skip=(1,))
    _launch(_args(wan, out, **DS_OVER, **{"train.deepspeed_config": ds}), nproc=1)
    assert _summary(out)["resumed_from"].endswith("checkpoint-1")
    keys = ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_student", "lr_fake")
    assert [[r.get(k) for k in keys] for r in _metrics(out)] == [[r.get(k) for k in keys] for r in _metrics(tmp / "ds")]
    for f in LORAS:
        a, b = _tensors(tmp / "ds" / f), _tensors(out / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


if __name__ == "__main__":
    raise SystemExit(_driver())

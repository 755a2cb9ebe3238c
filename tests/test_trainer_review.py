"""Trainer review: fp16 clipping under gradient accumulation, resume checks before any weights load,
checkpoints of another run in the output folder, metrics.jsonl after a resume, the validation
embedding cache. Tiny Wan runs in-process (a few steps of a 32x32x5 video: about a second each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_train_overrides, tiny_wan_with_store

from videoblade.config import load_config
from videoblade.data import encode_prompts_to_store
from videoblade.models.tiny import tiny_model_folder

PROMPTS = ["a red cat walking", "a blue robot dancing", "a green car in the city", "sunset over the sea"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # the trainer and the fp16 test each build an Accelerator in this process; accelerate's state is a
    # process-wide singleton that refuses another mixed-precision setting once initialised
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return tiny_wan_with_store(tmp_path_factory, PROMPTS)


def _cfg(wan, out, **over):
    return load_config(None, tiny_train_overrides(*wan, out, **over))


def _train(wan, out, **over):
    from videoblade.distill.trainer import train

    return train(_cfg(wan, out, **over), progress=False)


def _steps(out):
    return [json.loads(x)["step"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(wan, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), copied by the tests that change it."""
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("finished") / "run"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert _train(wan, out)["finished"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_fp16_clip_unscales_only_the_role_being_stepped():
    # fp16 (a GradScaler) + gradient accumulation 2: accelerate's clip_grad_norm_ unscaled *every*
    # optimizer, so the fake step's clip unscaled the student's half-accumulated window; the fake's
    # scaler.update() then forgot that, and the student's own clip divided the first micro-step's
    # gradient by the loss scale again (1024 here): the student stepped on the last micro-step alone.
    # CUDA-only in accelerate (no CPU scaler): a CPU GradScaler is put in its place.
    from accelerate import Accelerator

    from videoblade.distill.trainer import TDMTrainer

    def run(scaler):
        acc = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=2)
        if scaler:
            acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
        pf, ps = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
        opt_f, opt_s = acc.prepare(torch.optim.SGD([pf], lr=1.0), torch.optim.SGD([ps], lr=1.0))
        sch = {r: torch.optim.lr_scheduler.LambdaLR(o.optimizer, lambda s: 1.0)
               for r, o in (("fake", opt_f), ("student", opt_s))}
        trainer = SimpleNamespace(engines=None, accelerator=acc, params={"fake": [pf], "student": [ps]},
                                  optimizers={"fake": opt_f, "student": opt_s}, schedulers=sch,
                                  cfg=SimpleNamespace(optim=SimpleNamespace(max_grad_norm=1e9)))
        g = torch.tensor([1.0, 2.0, 3.0])
        norms = []
        for micro in (1, 2):  # the trainer's order: fake backward + step, then student backward + step
            with acc.accumulate():
                acc.backward((pf * g).sum())
                norms.append(TDMTrainer._optimizer_step(trainer, "fake"))
                acc.backward((ps * g * micro).sum())
                norms.append(TDMTrainer._optimizer_step(trainer, "student"))
        return pf.detach(), ps.detach(), norms

    want_f, want_s, want_norms = run(scaler=False)
    torch.testing.assert_close(want_s, -1.5 * torch.tensor([1.0, 2.0, 3.0]))  # (1 + 2) / 2 micro-steps
    got_f, got_s, got_norms = run(scaler=True)
    torch.testing.assert_close(got_f, want_f)
    torch.testing.assert_close(got_s, want_s)
    assert got_norms[:2] == [None, None]
    assert got_norms[2:] == pytest.approx(want_norms[2:])  # the unscaled norms


def test_resume_that_cannot_continue_fails_before_loading(wan, finished, tmp_path):
    # a changed lora.rank failed inside load_checkpoint with a bare RuntimeError (tensor sizes), a changed
    # seed with an uncaught PromptStoreError, both after the weights had loaded; a changed target list
    # after loading too
    from videoblade.distill.trainer import TrainRequestError, validate_request

    with pytest.raises(TrainRequestError, match=r"rank \[4\], this run lora.rank=8"):
        validate_request(_cfg(wan, finished, **{"lora.rank": 8, "lora.lora_alpha": 8}))
    with pytest.raises(TrainRequestError, match="seed 42, this run uses 7"):
        validate_request(_cfg(wan, finished, **{"train.seed": 7}))
    with pytest.raises(TrainRequestError, match=r"other modules.*only in the checkpoint: \['blocks.0.attn1.to_k'"):
        validate_request(_cfg(wan, finished, **{"lora.target_modules": "[to_q,to_v,to_out.0]"}))
    with pytest.raises(TrainRequestError, match="is not a complete checkpoint"):
        validate_request(_cfg(wan, tmp_path / "o", **{"train.resume_from_checkpoint": tmp_path / "nothing"}))
    req = validate_request(_cfg(wan, finished))
    assert req.resume == finished / "checkpoints" / "checkpoint-4"
    # through the entry point: an error message and exit code 2, not a traceback
    from videoblade import train as entry

    assert entry.main([f"model.path={wan[0]}", f"train.prompt_store={wan[1]}", f"train.output_dir={finished}",
                       "model.height=32", "model.width=32", "model.frames=5", "train.seed=7", "lora.rank=4",
                       "lora.lora_alpha=4", "tdm.k_step=2", "train.validation_steps=0"]) == 2


def test_checkpoints_of_another_run_past_the_start_are_refused(wan, finished, tmp_path):
    # a run started over (resume null) or resumed from an earlier checkpoint in a folder holding later
    # checkpoints: the pruning keeps the highest steps, so it deleted this run's checkpoint right after
    # writing it, and a later `latest` resume continued the other run
    from videoblade.distill.trainer import TrainRequestError, validate_request

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(TrainRequestError, match=r"checkpoint-4, past the step this run starts from step 0"):
        validate_request(_cfg(wan, out, **{"train.resume_from_checkpoint": "null", "train.stop_at_step": 2}))
    early = out / "checkpoints" / "checkpoint-2"
    with pytest.raises(TrainRequestError, match=r"checkpoint-4, past the step this run resumes from step 2"):
        validate_request(_cfg(wan, out, **{"train.resume_from_checkpoint": early}))
    # from another folder the earlier checkpoint resumes, and its checkpoints are kept
    other = tmp_path / "branch"
    s = _train(wan, other, **{"train.resume_from_checkpoint": early, "train.checkpointing_steps": 1,
                              "train.checkpoints_total_limit": 2})
    assert s["finished"] and s["resumed_from"] == str(early)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_metrics_rows_past_the_resumed_checkpoint_are_not_repeated(wan, finished, tmp_path):
    # a run killed after logging steps 3 and 4 but before checkpoint-4: the resumed run logs 3 and 4
    # again, and metrics.jsonl held 1, 2, 3, 4, 3, 4 (plus a line cut short by the kill)
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss_ge')
    s = _train(wan, out)
    assert s["resumed_from"] == str(out / "checkpoints" / "checkpoint-2")
    assert _steps(out) == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_gen"] for r in rows] == [r["loss_gen"] for r in want]  # resumed exactly


def test_validation_embedding_cache_cut_short_is_rebuilt(wan, tmp_path):
    # the cache was written in place: a kill during the write left a file that failed every later
    # run's start (safetensors header error) until removed by hand
    from accelerate import Accelerator

    from videoblade.distill.trainer import TDMTrainer, _load_tensors, validate_request

    prompts = tmp_path / "val.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    cfg = _cfg(wan, out, **{"train.validation_steps": 2, "train.num_validation_videos": 2,
                             "train.validation_prompts": prompts})
    req = validate_request(cfg)
    trainer = SimpleNamespace(cfg=cfg, req=req, out=out, accelerator=Accelerator(cpu=True),
                              device=torch.device("cpu"))
    emb = TDMTrainer._validation_embeds(trainer)
    cache = out / "validation_embeds.safetensors"
    data = cache.read_bytes()
    cut = tmp_path / "cut.safetensors"  # a new file (emb may still map the old one)
    cut.write_bytes(data[: len(data) // 2])
    cut.replace(cache)
    again = TDMTrainer._validation_embeds(trainer)
    torch.testing.assert_close(again, emb)
    assert _load_tensors(cache)[0]["embeds"].shape == emb.shape
    assert not list(out.glob("*.tmp"))


def test_logged_learning_rate_is_the_one_the_step_used(wan, tmp_path):
    # lr_* was read after the schedulers stepped: the rate of the next step (during warmup one
    # warmup increment ahead of what the optimizer had just used)
    from diffusers.optimization import get_scheduler

    out = tmp_path / "lr"
    cfg = _cfg(wan, out, **{"optim.lr_warmup_steps": 3, "train.max_train_steps": 4, "train.checkpointing_steps": 4})
    from videoblade.distill.trainer import train

    train(cfg, progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for role in ("student", "fake"):
        o = cfg.optim
        lr = o.learning_rate if role == "student" else o.learning_rate_fake
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sch = get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.lr_warmup_steps,
                            num_training_steps=cfg.train.max_train_steps, num_cycles=o.lr_num_cycles)
        want = []
        for _ in rows:
            want.append(sch.get_last_lr()[0])
            opt.step()
            sch.step()
        assert [r[f"lr_{role}"] for r in rows] == pytest.approx(want), role


def test_validation_samples_without_lora_dropout_and_stale_save_folders_go(wan, tmp_path, monkeypatch):
    # validation sampled with the student in train mode: with lora.lora_dropout > 0 every validation
    # video carried dropout noise; a `.tmp-checkpoint-N` left by a kill during a save stayed for good
    from videoblade.distill.trainer import TDMTrainer

    out = tmp_path / "drop"
    stale = out / "checkpoints" / ".tmp-checkpoint-7"
    stale.mkdir(parents=True)
    cfg = _cfg(wan, out, **{"lora.lora_dropout": 0.5, "train.max_train_steps": 1, "train.checkpointing_steps": 1})
    trainer = TDMTrainer(cfg)
    trainer.run(progress=False)
    assert not stale.exists() and (out / "checkpoints" / "checkpoint-1").is_dir()

    student = trainer._raw["student"]
    dropouts = [m for n, m in student.named_modules() if n.endswith("lora_dropout.student")]
    assert dropouts and student.training
    seen = []
    real = trainer._validation_latents

    def spy(emb):
        seen.append([m.training for m in dropouts])
        return real(emb)

    monkeypatch.setattr(trainer, "_validation_latents", spy)
    paths = trainer.validate(trainer.req.store.get([0]).to(trainer.device))
    assert len(paths) == 1 and seen == [[False] * len(dropouts)]
    assert student.training and all(m.training for m in dropouts)  # back to training afterwards


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_family_settings_left_null_are_the_models_and_dumped(family, tmp_path):
    # without the family's YAML (python -m videoblade.train model.path=<CogVideoX> ...) a CogVideoX run
    # trained with Wan's teacher CFG 5.0, lambda_reg 0, pool 32 and 16 fps; config.yaml recorded nulls
    # for the size and the text length the run used
    from videoblade.config import dump_config
    from videoblade.distill.trainer import validate_request

    folder = tiny_model_folder(family)
    store = encode_prompts_to_store(folder, PROMPTS[:2], tmp_path / "store", dtype="fp32", progress=False)
    cfg = load_config(None, [f"model.path={folder}", f"train.prompt_store={store}", f"train.output_dir={tmp_path / 'o'}",
                             "train.report_to=none"])
    req = validate_request(cfg)
    want = {"wan": (5.0, 0.0, 32, 16), "cogvideox": (3.5, 0.5, 16, 8)}[family]
    assert (cfg.tdm.cfg, cfg.tdm.lambda_reg, cfg.asa.pool, cfg.sample.fps) == want
    g = req.geometry
    assert (cfg.model.height, cfg.model.width, cfg.model.frames) == (g.height, g.width, g.frames)
    assert cfg.model.text_max_length == req.store.text_max_length
    assert (cfg.sample.steps, cfg.sample.eta) == (cfg.tdm.k_step, cfg.tdm.eta)
    # the dump reloads to the same settings
    again = load_config(dump_config(cfg, tmp_path / "dump"))
    assert again == cfg
    # explicit values win
    cfg = load_config(None, [f"model.path={folder}", f"train.prompt_store={store}", f"train.output_dir={tmp_path / 'p'}",
                             "train.report_to=none", "tdm.cfg=2.0", "tdm.lambda_reg=0.25", "asa.pool=64",
                             "sample.fps=24"])
    validate_request(cfg)
    assert (cfg.tdm.cfg, cfg.tdm.lambda_reg, cfg.asa.pool, cfg.sample.fps) == (2.0, 0.25, 64, 24)

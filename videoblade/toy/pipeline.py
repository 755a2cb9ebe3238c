"""The `make demo` pipeline: toy data -> tiny teacher -> TDM (+ ASA) students -> measured quality.

Stages (each timed, each with a progress bar), all inside one run directory:

1. data: the procedural clips (`videoblade.toy.data`), deterministic from the seed.
2. teacher/: a toy-family diffusers folder (`videoblade.models.toy`) whose Wan-architecture
   transformer is trained with flow matching (`videoblade.toy.teacher`). Reused when its stamp
   matches, so a second `make demo` skips it: the stamp holds the teacher's settings and a hash
   of the code that trains it (`TEACHER_CODE`) with the libraries' versions, so a changed profile,
   a code change or a library upgrade trains it again.
3. prompts/: the data's prompts encoded with the teacher folder's own text encoder into the
   project's prompt store (`videoblade.data.encode_prompts_to_store`), as for a real model.
4. students/k{K}_{asa|dense}/: the project's own TDM trainer (`videoblade.distill.trainer.train`,
   the code behind `python -m videoblade.train`) distils the teacher to K = 8 and K = 4 steps,
   with ASA in the student and fake score (BLADE) and without (TDM only). Reused when finished
   under the same stamp (the trainer's settings, the teacher's stamp and weights, `STUDENT_CODE`);
   the stamp is written last, so a run killed before it finished is trained again.
5. evaluation: every method samples the same prompts from the same noise with the shared sampler
   (`videoblade.sampling.sample`): the teacher (dense, CFG) at 50, 8 and 4 steps, each student at
   its K (guidance 1, ASA on for the ASA students, realised density read from ASA's statistics).
   Precision and coverage against the training clips (`videoblade.toy.metrics`), and two
   diagnostics of prompt following: the share of samples with the prompt's colour and moving
   the prompt's way.
6. report: summary.json, metrics.png (precision and coverage vs steps), grid.mp4 / grid.gif
   (methods side by side), and a text table.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from videoblade.io.jsonfile import write_json
from videoblade.toy.data import ToyDataConfig, all_prompts, draw_reference, make_dataset
from videoblade.toy.teacher import TeacherConfig

__all__ = ["DemoProfile", "PROFILES", "run_pipeline", "format_table", "METHOD_LABELS"]

PIPELINE_VERSION = 1


@dataclass
class DemoProfile:
    """Every knob of one demo run (the full demo and the CI-sized `--quick` one)."""

    name: str = "full"
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    transformer: dict = field(default_factory=dict)  # overrides of videoblade.models.toy.TOY_TRANSFORMER
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cfg: float = 2.0  # the teacher's guidance scale, in distillation and in its own sampling
    eta: float = 0.9
    # distillation (the project's trainer); one run per (K, asa)
    k_steps: tuple[int, ...] = (8, 4)
    distill_steps: dict = field(default_factory=lambda: {8: 150, 4: 150})
    distill_batch: int = 8
    learning_rate: float = 1e-3
    learning_rate_fake: float = 2e-3
    lora_rank: int = 32
    lr_warmup_steps: int = 5
    asa: dict = field(default_factory=lambda: dict(block_size=16, pool=4, samples_per_block=4,
                                                   energy_threshold=0.95, min_retain=0.05, max_retain=0.2,
                                                   cpu_backend="gathered"))
    dense_students: bool = True  # also distil without ASA (TDM only), for the comparison
    # evaluation
    teacher_steps: tuple[int, ...] = (50, 8, 4)
    eval_per_prompt: int = 2
    eval_seed: int = 1234
    grid_prompts: int = 6

    def to_dict(self) -> dict:
        d = asdict(self)
        d["distill_steps"] = {str(k): v for k, v in self.distill_steps.items()}
        return d


def _profiles() -> dict[str, DemoProfile]:
    # 12x12 pixels x 5 frames, 4px shapes moving 1px/frame: 5 x 6 x 6 = 180 tokens (12 ASA blocks of 16)
    data = ToyDataConfig(height=12, width=12, frames=5, shape_size=4, speed=1, n_along=2, n_across=3, n_clips=192)
    model = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=128, num_layers=4)
    full = DemoProfile(data=data, transformer=model,
                       teacher=TeacherConfig(steps=3000, batch_size=16, learning_rate=5e-3, warmup_steps=50))
    quick = DemoProfile(
        name="quick",
        data=data,
        transformer=dict(model, num_layers=2),
        teacher=TeacherConfig(steps=400, batch_size=16, learning_rate=5e-3, warmup_steps=20),
        k_steps=(4,),
        distill_steps={4: 40},
        distill_batch=8,
        teacher_steps=(20, 4),
        eval_per_prompt=1,
        dense_students=False,
        grid_prompts=3,
    )
    return {"full": full, "quick": quick}


PROFILES = _profiles()

METHOD_LABELS = {"data": "data (fresh draws of the factor grid)", "teacher": "teacher (dense, CFG {cfg:g})",
                 "tdm": "student TDM (dense)", "blade": "student TDM + ASA"}


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The code each cached stage runs, as globs relative to the videoblade package, and the libraries
# it runs on: the stage's stamp holds a hash of these files and the libraries' versions, so
# editing any of them (a trainer fix, a `git pull`) retrains that stage on the next run instead of
# reusing what the old code made. This file's own stage code is covered by PIPELINE_VERSION.
TEACHER_CODE = ("toy/data.py", "toy/teacher.py", "schedules.py", "models/__init__.py", "models/base.py",
                "models/wan.py", "models/toy.py")
TEACHER_LIBRARIES = ("torch", "diffusers", "transformers")
STUDENT_CODE = ("config.py", "schedules.py", "sampling.py", "distill/*.py", "attention/*.py", "kernels/*.py",
                "data/*.py", "io/lora.py", "models/__init__.py", "models/base.py", "models/ffn.py", "models/wan.py",
                "models/toy.py")
STUDENT_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def code_fingerprint(patterns: tuple[str, ...], libraries: tuple[str, ...]) -> dict:
    """{"sources": hash of the package files matching `patterns`, library: version, ...}."""
    root = _PACKAGE_ROOT
    h = hashlib.sha1()
    for pattern in patterns:
        files = sorted(root.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no file of the videoblade package at {root} matches {pattern!r} "
                                    "(the demo's cache stamps list the code each stage runs)")
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    versions = {}
    for lib in libraries:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {"sources": h.hexdigest()[:16], **versions}


def _read_json(path: Path):
    """The JSON in `path`, or None when it is missing or unreadable (a file cut short by a killed run)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class _Timer:
    def __init__(self):
        self.stages: dict[str, dict] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()
                return self

            def __exit__(self, *exc):
                timer.stages[name] = {"wall_s": round(time.perf_counter() - self.t, 2),
                                      "cpu_s": round(time.process_time() - self.c, 2)}

        return _Ctx()


# ---------------------------------------------------------------------------- stages
def _vocabulary() -> list[str]:
    return sorted({w for p in all_prompts() for w in p.split()})


def teacher_stamp(prof: DemoProfile) -> dict:
    """Everything the teacher depends on: its settings, and the code and libraries that train it."""
    from videoblade.models.toy import TOY_TEXT_ENCODER, TOY_TRANSFORMER

    tcfg = dict(TOY_TRANSFORMER, **prof.transformer)
    stamp = {"version": PIPELINE_VERSION, "data": prof.data.to_dict(), "transformer": tcfg,
             "text_encoder": TOY_TEXT_ENCODER, "teacher": prof.teacher.to_dict(), "vocabulary": _vocabulary(),
             "code": code_fingerprint(TEACHER_CODE, TEACHER_LIBRARIES)}
    return json.loads(json.dumps(stamp))  # as it reads back from teacher.json (tuples as lists)


def ensure_teacher(out: Path, prof: DemoProfile, clips: torch.Tensor, prompts: list[str], device: str,
                   progress: bool) -> tuple[Path, dict, bool]:
    """Build + train the teacher folder unless a matching one is cached. Returns (folder, summary, trained_now)."""
    from videoblade.models import get_adapter
    from videoblade.models.toy import build_toy_model
    from videoblade.toy.teacher import STAMP, teacher_is_trained, train_teacher

    folder = out / "teacher"
    stamp = teacher_stamp(prof)
    if teacher_is_trained(folder, stamp):
        return folder, json.loads((folder / STAMP).read_text()), False
    if folder.exists():
        shutil.rmtree(folder)
    build_toy_model(folder, _vocabulary(), seed=prof.teacher.seed, transformer=prof.transformer,
                    default_size=(prof.data.height, prof.data.width, prof.data.frames))
    adapter = get_adapter(folder)
    loaded = adapter.load(folder, dtype=torch.float32, device=device,
                          components=("transformer", "text_encoder", "tokenizer"))
    summary = train_teacher(adapter, loaded, clips, prompts, prof.teacher, stamp, progress=progress)
    return folder, summary, True


def build_prompt_store(out: Path, folder: Path, progress: bool) -> Path:
    from videoblade.data import encode_prompts_to_store

    store = out / "prompts"
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(all_prompts()) + "\n")
    return encode_prompts_to_store(folder, all_prompts(), store, dtype="fp32", negative_prompt="",
                                   device="cpu", progress=progress)


def _student_overrides(prof: DemoProfile, folder: Path, store: Path, run_dir: Path, k: int, asa: bool,
                       seed: int) -> list[str]:
    ov = [
        f"model.path={folder}", "model.dtype=fp32",
        f"model.height={prof.data.height}", f"model.width={prof.data.width}", f"model.frames={prof.data.frames}",
        f"train.output_dir={run_dir}", f"train.prompt_store={store}",
        f"train.max_train_steps={prof.distill_steps[k]}", f"train.train_batch_size={prof.distill_batch}",
        "train.gradient_accumulation_steps=1", f"train.checkpointing_steps={prof.distill_steps[k]}",
        "train.checkpoints_total_limit=1", "train.mixed_precision='no'", "train.gradient_checkpointing=false",
        "train.report_to=none", "train.validation_steps=0", "train.export_comfy=false", f"train.seed={seed}",
        f"tdm.k_step={k}", f"tdm.cfg={prof.cfg}", f"tdm.eta={prof.eta}", "tdm.lambda_reg=0.0",
        f"optim.learning_rate={prof.learning_rate}", f"optim.learning_rate_fake={prof.learning_rate_fake}",
        f"optim.lr_warmup_steps={prof.lr_warmup_steps}",
        f"lora.rank={prof.lora_rank}", f"lora.lora_alpha={prof.lora_rank}",
        f"asa.enabled={str(asa).lower()}",
    ]
    ov += [f"asa.{key}={val}" for key, val in prof.asa.items()]
    return ov


def distill(out: Path, prof: DemoProfile, folder: Path, store: Path, teacher_stamp: dict, k: int, asa: bool,
            progress: bool) -> tuple[Path, dict]:
    """One TDM run with the project's trainer; reused when finished with the same settings."""
    from videoblade.config import load_config
    from videoblade.distill.trainer import train

    run_dir = out / "students" / f"k{k}_{'asa' if asa else 'dense'}"
    overrides = _student_overrides(prof, folder, store, run_dir, k, asa, seed=prof.eval_seed + k)
    # the teacher's weights, not only its settings: a teacher retrained elsewhere (other CPU kernels
    # give other weights) must not reuse students distilled from the old one
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = {"teacher": _hash(teacher_stamp), "teacher_weights": hashlib.sha1(weights.read_bytes()).hexdigest(),
             "overrides": overrides, "version": PIPELINE_VERSION,
             "code": code_fingerprint(STUDENT_CODE, STUDENT_LIBRARIES)}
    stamp_file = run_dir / "demo_stamp.json"
    # the stamp is written last, when the run finished: a run killed before that (or a stamp or
    # summary cut short) is trained again, never reused
    if _read_json(stamp_file) == stamp and (run_dir / "pytorch_lora_weights.safetensors").is_file():
        summary = _read_json(run_dir / "summary.json")
        if isinstance(summary, dict) and summary.get("finished"):
            return run_dir, summary
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = load_config(None, overrides, require=("model.path", "train.prompt_store"))
    summary = train(cfg, progress=progress)
    write_json(stamp_file, stamp)
    return run_dir, summary


# ---------------------------------------------------------------------------- evaluation
def eval_generator(seed: int, noise: torch.Tensor) -> torch.Generator:
    """The eta sampler's generator for a run whose initial noise ``noise`` is the first draw of ``seed``
    (``eval_inputs``): positioned after that draw, as inference and training draw both from one
    stream. Seeded afresh, its first eta-step noise would *be* the initial noise (about 1.34x the
    noise after step one, every sample skewed alike)."""
    g = torch.Generator().manual_seed(int(seed))
    first = torch.randn(tuple(noise.shape), generator=g)
    if not torch.equal(first, noise.cpu()):
        raise RuntimeError("the evaluation noise is not the first draw of its seed")
    return g


def _sample(adapter, transformer, schedule, emb, neg, geometry, steps, guidance, eta, noise, seed, desc, progress):
    from videoblade.sampling import sample

    return sample(adapter, transformer, schedule, emb, geometry, steps=steps, eta=eta,
                  generator=eval_generator(seed, noise), guidance=guidance, negative_embeds=neg,
                  latents=noise.clone(), progress=progress, desc=desc)


@dataclass
class EvalInputs:
    """What every evaluated method shares: the teacher folder loaded, the prompts (each
    `eval_per_prompt` times), their embeddings, the reference draws and the initial noise."""

    adapter: object
    geometry: object
    loaded: object
    prompts: list[str]
    emb: torch.Tensor
    neg: torch.Tensor
    reference: torch.Tensor
    noise: torch.Tensor


def eval_inputs(prof: DemoProfile, folder: Path, device: str) -> EvalInputs:
    from videoblade.models import get_adapter

    adapter = get_adapter(folder)
    geometry = adapter.geometry(folder, prof.data.height, prof.data.width, prof.data.frames)
    loaded = adapter.load(folder, dtype=torch.float32, device=device,
                          components=("transformer", "text_encoder", "tokenizer"))
    prompts = [p for p in all_prompts() for _ in range(prof.eval_per_prompt)]
    max_len = adapter.text_max_length(folder)
    emb = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, prompts, max_length=max_len).to(device)
    neg = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, [""], max_length=max_len).to(device)
    reference, _ = draw_reference(prof.data, prompts, seed=prof.eval_seed + 1)
    gen = torch.Generator().manual_seed(prof.eval_seed)
    noise = torch.randn((len(prompts), *geometry.latent_shape), generator=gen).to(device)
    return EvalInputs(adapter, geometry, loaded, prompts, emb, neg, reference, noise)


def evaluate_all(out: Path, prof: DemoProfile, folder: Path, students: dict, clips: torch.Tensor, device: str,
                 progress: bool) -> tuple[list[dict], dict]:
    """Sample every method on the same prompts and noise; returns (rows, samples by row name)."""
    from videoblade.attention import set_adaptive_sparse_attention
    from videoblade.config import ASAConfig
    from videoblade.io.lora import load_lora_into
    from videoblade.toy.metrics import evaluate, prompt_following

    ev = eval_inputs(prof, folder, device)
    adapter, geometry, loaded = ev.adapter, ev.geometry, ev.loaded
    emb, neg, reference, noise = ev.emb, ev.neg, ev.reference, ev.noise

    rows: list[dict] = []
    samples: dict[str, torch.Tensor] = {}

    def metrics(x):
        return evaluate(x, clips, reference) | prompt_following(x, ev.prompts, prof.data)

    rows.append({"name": "data", "method": "data", "steps": None, "density": None, "seconds": 0.0,
                 **metrics(reference)})
    samples["data"] = reference

    def record(name, method, steps, x, seconds, density=None, extra=None):
        m = metrics(x.cpu())
        rows.append({"name": name, "method": method, "steps": steps, "density": density,
                     "seconds": round(seconds, 2), **m, **(extra or {})})
        samples[name] = x.cpu()

    schedule = loaded.schedule
    teacher = loaded.transformer
    for steps in prof.teacher_steps:
        t0 = time.perf_counter()
        x = _sample(adapter, teacher, schedule, emb, neg, geometry, steps, prof.cfg, prof.eta, noise,
                    prof.eval_seed, f"teacher {steps} steps", progress)
        record(f"teacher_{steps}", "teacher", steps, x, time.perf_counter() - t0)

    for (k, asa), run in students.items():
        student = adapter.load(folder, dtype=torch.float32, device=device, components=("transformer",)).transformer
        load_lora_into(student, Path(run["dir"]) / "pytorch_lora_weights.safetensors", family="toy",
                       adapter_name="student")
        density = None
        asa_obj = None
        if asa:
            asa_obj = set_adaptive_sparse_attention(student, ASAConfig(**prof.asa))
        t0 = time.perf_counter()
        x = _sample(adapter, student, schedule, emb, None, geometry, k, 1.0, prof.eta, noise, prof.eval_seed,
                    f"student K={k} {'ASA' if asa else 'dense'}", progress)
        secs = time.perf_counter() - t0
        if asa_obj is not None:
            st = asa_obj.density_stats(reset=True)
            density = st["mean"]
        record(f"{'blade' if asa else 'tdm'}_{k}", "blade" if asa else "tdm", k, x, secs, density,
               extra={"train_steps": run["summary"].get("step"), "train_s_per_it": run["summary"].get("s_per_it")})
    return rows, samples


# ---------------------------------------------------------------------------- report
def grid_label(row: dict, prof: DemoProfile) -> str:
    """A grid row's label: the method on the first line; steps (and ASA's realised density) on the next."""
    text = METHOD_LABELS[row["method"]].format(cfg=prof.cfg)
    if row["steps"] is not None:
        text += f"\n{row['steps']} steps"
    if row["density"] is not None:
        text += f" (density {row['density']:.2f})"
    return text


def format_table(rows: list[dict], prof: DemoProfile) -> str:
    head = (f"{'method':<40} {'steps':>5} {'precision':>9} {'coverage':>8} {'colour':>6} {'motion':>6} "
            f"{'still':>6} {'rev':>6} {'density':>7} {'sample s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = METHOD_LABELS[r["method"]].format(cfg=prof.cfg)
        steps = "-" if r["steps"] is None else str(r["steps"])
        dens = "-" if r["density"] is None else f"{r['density']:.2f}"
        if r["method"] in ("teacher", "tdm") and r["steps"] is not None:
            dens = "1.00"
        lines.append(f"{name:<40} {steps:>5} {r['precision']:>9.3f} {r['coverage']:>8.3f} {r['colour_ok']:>6.2f} "
                     f"{r['motion_ok']:>6.2f} {r.get('motion_still', float('nan')):>6.2f} "
                     f"{r.get('motion_reversed', float('nan')):>6.2f} {dens:>7} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def plot_metrics(rows: list[dict], path: Path, prof: DemoProfile) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"teacher": ("o-", "tab:gray"), "tdm": ("s--", "tab:blue"), "blade": ("D-", "tab:red")}
    data = next(r for r in rows if r["method"] == "data")
    for ax, key, better in ((axes[0], "precision", "lower is better"), (axes[1], "coverage", "higher is better")):
        for method, (style, colour) in styles.items():
            pts = sorted((r["steps"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour,
                        label=METHOD_LABELS[method].format(cfg=prof.cfg))
        ax.axhline(data[key], color="tab:green", lw=1, ls=":", label="data (fresh draws of the factor grid)")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["steps"] for r in rows if r["steps"] is not None})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("sampling steps")
        ax.set_title(f"{key} ({better})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("toy demo: samples vs the training clips")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def video_grid(samples: dict[str, torch.Tensor], rows: list[dict], prof: DemoProfile, scale: int = 6,
               repeats: int = 3) -> torch.Tensor:
    """uint8 [F, H, W, 3]: one row per method (labelled), one column per grid prompt."""
    import numpy as np
    from PIL import Image, ImageDraw

    n = prof.grid_prompts
    n_prompts = len(all_prompts())
    # spread over shapes, colours and directions: prompt index = shape*16 + colour*4 + direction
    picks = [(i * 16 + (i % 4) * 4 + (i * 3) % 4) % n_prompts for i in range(n)]
    cols = [p * prof.eval_per_prompt for p in picks]
    label_w, pad = 190, 2
    tiles = []
    names = [r["name"] for r in rows]
    for name in names:
        x = samples[name][cols]  # [n, 3, F, H, W]
        u8 = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        u8 = u8.permute(0, 2, 3, 4, 1).numpy()  # [n, F, H, W, 3]
        u8 = u8.repeat(scale, axis=2).repeat(scale, axis=3)
        tiles.append(u8)
    F, h, w = tiles[0].shape[1:4]
    H = len(names) * (h + pad) + pad
    W = label_w + n * (w + pad) + pad
    frames = np.full((F, H, W, 3), 255, np.uint8)
    for ri, t in enumerate(tiles):
        y = pad + ri * (h + pad)
        for ci in range(n):
            x = label_w + pad + ci * (w + pad)
            frames[:, y:y + h, x:x + w] = t[ci]
    label_img = Image.new("RGB", (label_w, H), "white")
    draw = ImageDraw.Draw(label_img)
    for ri, r in enumerate(rows):
        y = pad + ri * (h + pad) + h // 2 - 12
        draw.multiline_text((4, y), grid_label(r, prof), fill="black")
    frames[:, :, :label_w] = np.asarray(label_img)[None]
    return torch.from_numpy(np.concatenate([frames] * repeats, axis=0))


# ---------------------------------------------------------------------------- driver
def run_pipeline(out: str | Path, prof: DemoProfile, device: str = "cpu", progress: bool = True,
                 log=print) -> dict:
    from videoblade.io.video import write_gif, write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    t_start = time.perf_counter()
    c_start = time.process_time()
    (out / "demo_profile.json").write_text(json.dumps(prof.to_dict(), indent=2))

    with timer("data"):
        clips, meta = make_dataset(prof.data)
        prompts = [c.prompt for c in meta]
    log(f"[demo] data: {clips.shape[0]} clips of {prof.data.frames}x{prof.data.height}x{prof.data.width}, "
        f"{len(set(prompts))} prompts")

    with timer("teacher"):
        folder, teacher_summary, trained = ensure_teacher(out, prof, clips, prompts, device, progress)
    log(f"[demo] teacher: {'trained' if trained else 'reused (cached)'} {folder} "
        f"(loss {teacher_summary['first_loss']:.3f} -> {teacher_summary['final_loss']:.3f})")

    with timer("prompt_store"):
        store = build_prompt_store(out, folder, progress)

    students: dict[tuple[int, bool], dict] = {}
    variants = [(k, True) for k in prof.k_steps] + ([(k, False) for k in prof.k_steps] if prof.dense_students else [])
    teacher_stamp = teacher_summary["stamp"]
    for k, asa in variants:
        name = f"distill_k{k}_{'asa' if asa else 'dense'}"
        log(f"[demo] {name}: TDM with the project's trainer, {prof.distill_steps[k]} steps")
        with timer(name):
            run_dir, summary = distill(out, prof, folder, store, teacher_stamp, k, asa, progress)
        students[(k, asa)] = {"dir": str(run_dir), "summary": summary}

    with timer("evaluate"):
        rows, samples = evaluate_all(out, prof, folder, students, clips, device, progress)

    with timer("report"):
        table = format_table(rows, prof)
        plot = plot_metrics(rows, out / "metrics.png", prof)
        grid = video_grid(samples, rows, prof)
        write_video(out / "grid.mp4", grid, fps=6)
        write_gif(out / "grid.gif", grid, fps=6)
        (out / "table.txt").write_text(table + "\n")

    by = {r["name"]: r for r in rows}
    goals = _goals(by, prof)
    summary = {
        "what": "toy miniature of Video-BLADE: tiny Wan-architecture teacher trained on procedural videos, "
                "distilled by the project's TDM trainer with and without ASA, sampled by the shared sampler",
        "profile": prof.to_dict(),
        "rows": rows,
        "goals": goals,
        "teacher": {k: v for k, v in teacher_summary.items() if k != "stamp"} | {"trained_this_run": trained},
        "students": {f"k{k}_{'asa' if a else 'dense'}": {"dir": v["dir"], "steps": v["summary"].get("step"),
                                                         "s_per_it": v["summary"].get("s_per_it"),
                                                         "skipped_fake_steps": v["summary"].get("skipped_fake_steps"),
                                                         "last": v["summary"].get("last")}
                     for (k, a), v in students.items()},
        "timings": timer.stages,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "total_cpu_s": round(time.process_time() - c_start, 1),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                        "cpu_count": os.cpu_count()},
        "files": {"plot": plot.name, "grid_mp4": "grid.mp4", "grid_gif": "grid.gif", "table": "table.txt"},
    }
    write_json(out / "summary.json", summary)
    return summary


def _goals(by: dict, prof: DemoProfile) -> dict:
    """The issue's three goals, computed from this run's rows (absent rows are skipped)."""
    goals = {}
    t50 = by.get(f"teacher_{max(prof.teacher_steps)}")
    if "blade_4" in by and "teacher_4" in by:
        ratio = by["teacher_4"]["precision"] / by["blade_4"]["precision"]
        goals["asa4_precision_gain_vs_teacher4"] = {"value": round(ratio, 3), "target": 1.5, "met": ratio >= 1.5,
                                                    "higher_is_better": True}
    if "blade_8" in by and t50 is not None:
        ratio = by["blade_8"]["precision"] / t50["precision"]
        goals["asa8_precision_vs_teacher50"] = {"value": round(ratio, 3), "target": 1.5, "met": ratio <= 1.5,
                                                "higher_is_better": False}
        cov = by["blade_8"]["coverage"] / t50["coverage"] if t50["coverage"] > 0 else float("nan")
        goals["asa8_coverage_vs_teacher50"] = {"value": round(cov, 3), "target": 0.8, "met": cov >= 0.8,
                                               "higher_is_better": True}
    return goals


def profile_with(name: str, **overrides) -> DemoProfile:
    """A named profile with top-level fields replaced (a fresh copy)."""
    return replace(copy.deepcopy(PROFILES[name]), **overrides)

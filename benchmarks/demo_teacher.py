"""How good can the demo's toy teacher get, and does few-step sampling hurt it? (issue 7)

The demo's hardest goal asks the ASA student at 4 steps to be 1.5x better in precision than the
teacher at 4 steps. That needs a teacher whose 4-step samples are clearly worse than its 50-step
ones. This sweep trains the toy teacher (the demo's own `ensure_teacher`, flow matching in
pixel space) under data, model and training variants, in parallel processes, and samples it with
the shared eta sampler at 50, 8 and 4 steps (CFG and eta of the demo unless a variant says
otherwise). It reports precision and coverage (`videoblade.toy.metrics`), per setting the
fraction of samples whose nearest clip of the full factor grid has the requested prompt, and the
demo's prompt-following diagnostics (colour, motion).

The `heads*`/`rope_hd48` variants ask whether the teacher's failure to learn the motion comes from
Wan's rotary positions at a tiny head dim: diffusers gives the h and w axes 2 * (head_dim // 6)
channels each, so the demo's head dim 16 leaves each spatial axis one useful frequency (1 rad per
patch; the other is 0.01) and no absolute position at all.

Per variant a denoising check compares the trained teacher's x0 error on noised training clips
with the ideal denoiser's, per band of noise levels (`denoise_gap`).

`--unipc` also samples every teacher with diffusers' UniPC (deterministic, the solver of the
inference `--baseline` preset) at 50, 8 and 4 steps: few-step blur would show there first.

`--ideal` adds the ideal denoiser: the exact posterior mean over the training clips of the
prompt (what a perfectly fitted teacher predicts), sampled the same way (`--ideal-etas`, e.g.
"0.9,0" for the stochastic and the deterministic eta sampler). It shows how few steps the data
itself needs.

    python benchmarks/demo_teacher.py --variants base,wide --procs 2 --threads 1
    python benchmarks/demo_teacher.py --ideal --ideal-etas 0.9,0 --variants base --unipc

On a GPU box `--device cuda` trains and samples there (one process per variant, all sharing it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import carry_over, env_info, print_table, read_merge_source, write_results  # noqa: E402

WIDE = {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512, "num_layers": 6}
# name -> overrides of the demo's full profile: data, model (transformer), teacher, top-level fields,
# and extra (steps, eta) sampler settings for the teacher
VARIANTS: dict[str, dict] = {
    "base": {"extra": [[50, 1.0], [4, 1.0], [50, 0.5]]},
    "cfg1": {"top": {"cfg": 1.0}},
    "cfg5": {"top": {"cfg": 5.0}},
    "speed2": {"data": {"speed": 2, "n_along": 1, "n_across": 3, "n_clips": 144}},
    "speed2_16px": {"data": {"height": 16, "width": 16, "speed": 2, "n_along": 3, "n_across": 3, "n_clips": 288}},
    "heads2x24": {"model": {"attention_head_dim": 24, "ffn_dim": 192}},
    "layers8": {"model": {"num_layers": 8}},
    "wide": {"model": WIDE},
    "patch1x1x1": {"model": {"patch_size": [1, 1, 1]}},
    "lr1e-3": {"teacher": {"learning_rate": 1e-3}},
    "batch64": {"teacher": {"batch_size": 64}},
    # spatial rotary channels per axis 16 / 20 / 10 instead of 4 (heads2x24: 8; see the docstring)
    "rope_hd48": {"model": {"attention_head_dim": 48, "ffn_dim": 384}},
    "heads1x64": {"model": {"num_attention_heads": 1, "attention_head_dim": 64, "ffn_dim": 256}},
    "heads4x32_l4": {"model": {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256}},
    "heads2x32": {"model": {"attention_head_dim": 32, "ffn_dim": 256}},
    # a temporal patch of 2 (8 frames): each token's input holds two frames in order, so the
    # patch embedding alone breaks the symmetry under mirroring time (`frame_order_check`)
    "patch2x2x2_f8": {"model": {"patch_size": [2, 2, 2]}, "data": {"frames": 8}},
    # a background that shows each pixel's position and frame (videoblade.toy.data.background)
    "ramp": {"data": {"background_ramp": 0.25}},
    "ramp_wide": {"data": {"background_ramp": 0.25}, "model": WIDE},
    "ramp_lr1e-3": {"data": {"background_ramp": 0.25}, "teacher": {"learning_rate": 1e-3}},
    # the flow loss read on x0 (weight sigma^2): less weight on nearly clean inputs
    "x0loss": {"teacher": {"loss_weighting": "x0"}},
    "x0loss_wide": {"teacher": {"loss_weighting": "x0"}, "model": WIDE},
    "x0loss_lr1e-3": {"teacher": {"loss_weighting": "x0", "learning_rate": 1e-3}},
}


def _profile(spec: dict):
    from videoblade.toy import pipeline as P

    prof = P.PROFILES["full"]
    return replace(prof, data=replace(prof.data, **spec.get("data", {})),
                   transformer=dict(prof.transformer, **spec.get("model", {})),
                   teacher=replace(prof.teacher, **spec.get("teacher", {})), **spec.get("top", {}))


def _ideal_denoiser(clips, meta, schedule):
    """x0(x_t, t, pid): the exact posterior mean of x0 given x_t over the training clips of
    prompt index `pid` (into `all_prompts()`), for the training clips `clips` with `meta`."""
    import torch

    from videoblade.toy.data import all_prompts

    unique = all_prompts()
    clip_pid = torch.tensor([unique.index(c.prompt) for c in meta])
    flat = clips.flatten(1).double()

    def x0(x, t, pid):
        a, s = schedule.alpha(t).double()[:, None], schedule.sigma(t).double()[:, None]
        d2 = ((x.flatten(1).double()[:, None, :] - a[:, :, None] * flat[None]) ** 2).sum(-1)  # [B, M]
        logit = (-d2 / (2 * s**2)).masked_fill(clip_pid[None, :] != pid[:, None], float("-inf"))
        return (logit.softmax(1) @ flat).float().view_as(x)

    x0.clip_pid = clip_pid
    return x0


# noise bands (integer timesteps) of the denoising check; sampling commits to a clip in the middle ones
BANDS = ((0, 300), (300, 600), (600, 800), (800, 900), (900, 1000))


def denoise_gap(adapter, transformer, schedule, geometry, clips, meta, emb_by_prompt, n=192, seed=1) -> list[dict]:
    """x0 error of the teacher and of the ideal denoiser on noised training clips, per noise band.

    Where the ideal error is ~0 the data identifies the clip; a teacher error far above it there
    means the teacher has not fitted the data at that noise level."""
    import torch

    ideal = _ideal_denoiser(clips, meta, schedule)
    device = next(transformer.parameters()).device
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lo, hi in BANDS:
        idx = torch.randint(0, len(meta), (n,), generator=g)
        x0, pid = clips[idx], ideal.clip_pid[idx]
        t = torch.randint(lo, hi, (n,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            out = adapter.predict(transformer, x_t.to(device), t.to(device), emb_by_prompt[pid].to(device),
                                  geometry, schedule=schedule)
        x0_model = schedule.to_x0_eps(out.cpu(), x_t, t)[0]
        x0_ideal = ideal(x_t, t, pid)
        rows.append({"t_band": [lo, hi], "x0_mse_teacher": round(float(((x0_model - x0) ** 2).mean()), 5),
                     "x0_mse_ideal": round(float(((x0_ideal - x0) ** 2).mean()), 5)})
    return rows


def frame_order_check(adapter, transformer, schedule, geometry, emb_by_prompt, n=32, levels=(500, 800, 950),
                      seed=2) -> dict:
    """Does the teacher know which way time runs? At each noise level, the relative change of its
    x0 prediction when the input is mirrored along one axis and the prediction mirrored back
    (0: the model is equivariant to that mirror). A model blind to the order of frames is
    equivariant to mirroring time, so for any prompt its samples move one way as often as the
    opposite way (`prompt_following`'s motion_ok ~ motion_reversed). Mirroring height or width
    also reorders the pixels inside each 2x2 patch, which no trained model undoes exactly: those
    two are the scale to read the time figure against.
    """
    import torch

    device = next(transformer.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *geometry.latent_shape), generator=g)
    emb = emb_by_prompt[torch.randint(0, emb_by_prompt.shape[0], (n,), generator=g)].to(device)

    def x0(inp, tt):
        with torch.no_grad():
            out = adapter.predict(transformer, inp.to(device), tt.to(device), emb, geometry, schedule=schedule)
        return schedule.to_x0_eps(out.cpu(), inp, tt)[0]

    row = {}
    for level in levels:
        tt = torch.full((n,), level)
        base = x0(x, tt)
        for name, dim in (("time", 2), ("height", 3), ("width", 4)):
            back = x0(x.flip(dim), tt).flip(dim)
            row[f"mirror_{name}_rel_change_t{level}"] = round(float((back - base).norm() / base.norm()), 4)
    return row


def _right_prompt(x, grid, grid_unit, prompts) -> float:
    from videoblade.toy.metrics import nearest, to_unit

    _, j = nearest(to_unit(x), grid_unit)
    return sum(grid[int(k)].prompt == prompts[i] for i, k in enumerate(j)) / len(prompts)


def run_variant(name: str, spec: dict, out: str, device: str, threads: int, unipc: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    from videoblade.sampling import sample_unipc
    from videoblade.toy import pipeline as P
    from videoblade.toy.data import factor_grid, make_dataset, render
    from videoblade.toy.metrics import evaluate, prompt_following, to_unit

    prof = _profile(spec)
    run = Path(out) / name
    clips, meta = make_dataset(prof.data)
    t0 = time.perf_counter()
    folder, summary, _ = P.ensure_teacher(run, prof, clips, [c.prompt for c in meta], device, progress=False)
    train_s = time.perf_counter() - t0
    ev = P.eval_inputs(prof, folder, device)
    prompts = ev.prompts
    grid = factor_grid(prof.data)
    grid_unit = to_unit(render(prof.data, grid))
    settings = [(s, prof.eta) for s in (50, 8, 4)] + [tuple(e) for e in spec.get("extra", [])]
    settings += [(s, None) for s in (50, 8, 4)] if unipc else []  # eta None: UniPC
    rows = []
    for steps, eta in settings:
        if eta is None:
            x = sample_unipc(ev.adapter, ev.loaded.transformer, ev.loaded.schedule, ev.emb, ev.geometry, steps=steps,
                             guidance=prof.cfg, negative_embeds=ev.neg, latents=ev.noise.clone(), progress=False)
        else:
            x = P._sample(ev.adapter, ev.loaded.transformer, ev.loaded.schedule, ev.emb, ev.neg, ev.geometry, steps,
                          prof.cfg, eta, ev.noise, prof.eval_seed, "", False)
        x = x.cpu()
        m = evaluate(x, clips, ev.reference)
        pf = prompt_following(x, prompts, prof.data)
        rows.append({"what": "teacher", "variant": name, "spec": spec, "device": device, "steps": steps,
                     "sampler": "eta" if eta is not None else "unipc",
                     "cfg": prof.cfg, "eta": eta, "precision": round(m["precision"], 3),
                     "coverage": round(m["coverage"], 3), "right_prompt": round(_right_prompt(x, grid, grid_unit,
                                                                                              prompts), 3),
                     "colour_ok": round(pf["colour_ok"], 3), "motion_ok": round(pf["motion_ok"], 3),
                     "motion_reversed": round(pf["motion_reversed"], 3),
                     "teacher_steps": prof.teacher.steps, "teacher_train_s": round(train_s, 1),
                     "final_loss": round(summary["final_loss"], 4)})
    # the evaluation prompts are all_prompts(), each eval_per_prompt times in a row: one embedding each
    emb_by_prompt = ev.emb[:: prof.eval_per_prompt].cpu()
    for r in denoise_gap(ev.adapter, ev.loaded.transformer.eval(), ev.loaded.schedule, ev.geometry, clips, meta,
                         emb_by_prompt):
        rows.append({"what": "denoising check", "variant": name, "spec": spec, "device": device, **r})
    rows.append({"what": "frame order check", "variant": name, "spec": spec, "device": device,
                 **frame_order_check(ev.adapter, ev.loaded.transformer, ev.loaded.schedule, ev.geometry, emb_by_prompt)})
    return rows


def ideal_rows(steps_list=(50, 8, 4, 2, 1), etas=(0.9,)) -> list[dict]:
    """The exact posterior-mean denoiser over the training clips of each prompt, sampled like the teacher."""
    import torch

    from videoblade.sampling import rollout
    from videoblade.schedules import Schedule, stage_timesteps
    from videoblade.toy import pipeline as P
    from videoblade.toy.data import all_prompts, draw_reference, make_dataset
    from videoblade.toy.metrics import evaluate

    prof = P.PROFILES["full"]
    clips, meta = make_dataset(prof.data)
    unique = all_prompts()
    prompts = [p for p in unique for _ in range(prof.eval_per_prompt)]
    pid = torch.tensor([unique.index(p) for p in prompts])
    reference, _ = draw_reference(prof.data, prompts, seed=prof.eval_seed + 1)
    schedule = Schedule.flow(1000, 1.0)  # the toy folder's schedule (flow, shift 1)
    ideal = _ideal_denoiser(clips, meta, schedule)

    def predict(x, t):
        return schedule.output_for(x, t, ideal(x, t, pid))

    noise = torch.randn((len(prompts), *clips.shape[1:]), generator=torch.Generator().manual_seed(prof.eval_seed))
    rows = []
    for steps in steps_list:
        for eta in etas:
            g = P.eval_generator(prof.eval_seed, noise)  # the eta noise continues after the initial draw
            x, _ = rollout(predict, schedule, noise.clone(), stage_timesteps(steps, 1000), eta, g)
            m = evaluate(x, clips, reference)
            rows.append({"what": "ideal denoiser", "variant": "ideal", "steps": steps, "sampler": "eta", "eta": eta,
                         "precision": round(m["precision"], 3), "coverage": round(m["coverage"], 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--ideal", action="store_true", help="also sample the ideal (posterior-mean) denoiser")
    p.add_argument("--ideal-etas", default="0.9", help="comma list of the eta values the ideal denoiser samples with")
    p.add_argument("--unipc", action="store_true", help="also sample each teacher with UniPC at 50, 8 and 4 steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--procs", type=int, default=1, help="variants trained in parallel")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--teacher-steps", type=int, default=None, help="override the teacher's training steps")
    p.add_argument("--work", default="runs/demo_teacher", help="where the teacher folders go")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--merge-from", default=None,
                   help="an earlier demo_teacher JSON whose rows for variants not run now are kept")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}: use {sorted(VARIANTS)}")
    # read and checked (same machine kind) before the teachers train, not after
    merge_src = read_merge_source(args.merge_from) if args.merge_from else None
    rows: list[dict] = []
    with ProcessPoolExecutor(max(1, args.procs)) as ex:
        futs = {}
        for n in names:
            spec = VARIANTS[n]
            if args.teacher_steps:  # a quick check of the script, not a measurement
                spec = dict(spec, teacher=dict(spec.get("teacher", {}), steps=args.teacher_steps))
            futs[ex.submit(run_variant, n, spec, args.work, args.device, args.threads, args.unipc)] = n
        if args.ideal:  # on this process while the variants train
            rows += ideal_rows(etas=tuple(float(e) for e in args.ideal_etas.split(",") if e))
            print("[demo_teacher] ideal denoiser done", flush=True)
        for f in as_completed(futs):
            rows += f.result()
            print(f"[demo_teacher] {futs[f]} done", flush=True)
    if merge_src is not None:
        redone = set(names) | ({"ideal"} if args.ideal else set())
        rows = carry_over(merge_src, lambda r: r["variant"] not in redone, {}) + rows
    print_table([r for r in rows if r["what"] not in ("denoising check", "frame order check")],
                ["what", "variant", "sampler", "steps", "eta", "precision", "coverage", "right_prompt", "colour_ok", "motion_ok",
                 "motion_reversed",
                 "teacher_train_s"])
    print_table([r for r in rows if r["what"] == "denoising check"],
                ["variant", "t_band", "x0_mse_teacher", "x0_mse_ideal"])
    order = [r for r in rows if r["what"] == "frame order check"]
    print_table(order, ["variant"] + [k for k in (order[0] if order else {}) if k.startswith("mirror")])
    by = {(r["variant"], r["steps"], r.get("eta")): r for r in rows if r["what"] == "teacher"}
    gaps = [by[(v, 4, e)]["precision"] / by[(v, 50, e)]["precision"] for (v, s, e) in by if s == 50 and (v, 4, e) in by]
    extra = {"environment": env_info() | {"cpu_count": os.cpu_count()},
             "max_teacher_precision_ratio_4_vs_50_steps": max(gaps) if gaps else None}
    print(json.dumps(extra, indent=1))
    write_results("demo_teacher", rows, targets={}, out_dir=args.out, **extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

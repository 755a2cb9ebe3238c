"""Toy demo pieces: procedural data, the precision/coverage metrics, the toy model family."""

from __future__ import annotations

import json

import pytest
import torch

from videoblade.toy.data import (
    COLOURS,
    DIRECTIONS,
    ToyDataConfig,
    all_prompts,
    draw_reference,
    factor_grid,
    make_dataset,
    render,
)
from videoblade.toy.data import background as data_background
from videoblade.toy.metrics import (
    coverage_fraction,
    data_spacing,
    evaluate,
    nearest,
    precision,
    prompt_following,
    to_unit,
)

SMALL = ToyDataConfig(n_clips=96, seed=3)


def test_dataset_is_deterministic_distinct_and_seeded():
    a, clips_a = make_dataset(SMALL)
    b, clips_b = make_dataset(SMALL)
    c, clips_c = make_dataset(ToyDataConfig(n_clips=96, seed=4))
    assert torch.equal(a, b) and clips_a == clips_b
    assert clips_a != clips_c
    assert a.shape == (96, 3, SMALL.frames, SMALL.height, SMALL.width)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert len(set(clips_a)) == 96  # no duplicates: the precision unit is never 0
    assert len(factor_grid(SMALL)) == 3 * 4 * 4 * SMALL.n_along * SMALL.n_across


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_clip_shows_its_prompt_colour_moving_in_its_direction(direction):
    cfg = ToyDataConfig()
    clip = next(c for c in factor_grid(cfg) if c.direction == direction and c.colour == "red" and c.shape == "square")
    x = render(cfg, [clip])[0]  # [3, F, H, W]
    rgb = (x + 1) / 2
    fg = (rgb - torch.tensor([0.12, 0.12, 0.12]).view(3, 1, 1, 1)).abs().sum(0) > 0.1  # [F, H, W]
    assert fg.flatten(1).sum(1).tolist() == [cfg.shape_size**2] * cfg.frames  # a whole square every frame
    colours = rgb.permute(1, 2, 3, 0)[fg]
    assert torch.allclose(colours, torch.tensor(COLOURS["red"]).expand_as(colours), atol=1e-6)
    ys, xs = [], []
    for f in range(cfg.frames):
        idx = fg[f].nonzero().float()
        ys.append(idx[:, 0].mean())
        xs.append(idx[:, 1].mean())
    dy, dx = DIRECTIONS[direction]
    steps_y = [float(b - a) for a, b in zip(ys, ys[1:])]
    steps_x = [float(b - a) for a, b in zip(xs, xs[1:])]
    assert steps_y == [dy * cfg.speed] * (cfg.frames - 1) and steps_x == [dx * cfg.speed] * (cfg.frames - 1)
    assert clip.prompt == f"a red square moving {direction}"


def test_ramped_background_shows_position_and_frame():
    cfg = ToyDataConfig(background_ramp=0.25)
    bg = data_background(cfg)  # [3, F, H, W]
    assert bg.shape == (3, cfg.frames, cfg.height, cfg.width)
    r, g, b = (torch.from_numpy(c) for c in bg)
    # red grows along x only, green along y only, blue along the frames only, each by the ramp
    assert torch.all(r.diff(dim=2) > 0) and torch.all(r.diff(dim=1) == 0) and torch.all(r.diff(dim=0) == 0)
    assert torch.all(g.diff(dim=1) > 0) and torch.all(g.diff(dim=2) == 0) and torch.all(g.diff(dim=0) == 0)
    assert torch.all(b.diff(dim=0) > 0) and torch.all(b.diff(dim=1) == 0) and torch.all(b.diff(dim=2) == 0)
    assert float(r.max() - r.min()) == pytest.approx(0.25) and float(b.min()) == pytest.approx(0.12)
    # every (frame, y, x) has its own background colour
    assert torch.from_numpy(bg).flatten(1).T.unique(dim=0).shape[0] == cfg.frames * cfg.height * cfg.width
    # clips keep it wherever no shape is, and the plain config is unchanged
    x = (render(cfg, factor_grid(cfg)[:3]) + 1) / 2
    shape_free = (x - torch.from_numpy(bg)).abs().sum(1) < 1e-6
    assert shape_free.float().mean() > 0.8
    assert (data_background(ToyDataConfig()) == 0.12).all()


def test_bad_data_config_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        ToyDataConfig(speed=4)
    with pytest.raises(ValueError, match="n_clips"):
        ToyDataConfig(n_clips=10_000)
    with pytest.raises(ValueError, match="background_ramp"):
        ToyDataConfig(background_ramp=0.8)


@pytest.mark.parametrize("bad, match", [(dict(shape_size=3), "not all distinct"),  # the diamond is the cross
                                        (dict(shape_size=2), "not all distinct"),  # diamond and cross empty
                                        (dict(speed=0), "speed"), (dict(frames=1), "frames"),
                                        (dict(n_along=0), "n_along")])
def test_data_configs_with_duplicate_clips_are_refused_up_front(bad, match):
    # each of these drew identical clips for different factors; the duplicates surfaced only at the
    # evaluation (data_spacing), after the teacher had trained on them
    with pytest.raises(ValueError, match=match):
        ToyDataConfig(**bad)
    # every accepted config renders a factor grid of distinct clips
    for cfg in (ToyDataConfig(shape_size=4, n_clips=1), ToyDataConfig(frames=2, n_clips=1)):
        x = render(cfg, factor_grid(cfg)).flatten(1)
        assert x.unique(dim=0).shape[0] == x.shape[0]


def test_reference_draws_follow_the_prompts():
    prompts = all_prompts()[:5] * 2
    x, clips = draw_reference(SMALL, prompts, seed=0)
    assert [c.prompt for c in clips] == prompts and x.shape[0] == 10
    with pytest.raises(ValueError, match="not a toy-data prompt"):
        draw_reference(SMALL, ["a purple cat"], seed=0)


def test_metrics_on_known_cases():
    data, clips = make_dataset(SMALL)
    d = to_unit(data)
    spacing = data_spacing(d)
    assert spacing > 0
    # training clips themselves: distance 0, and each is its own nearest neighbour
    assert precision(d[:10], d) == 0.0
    assert coverage_fraction(d[:10], d) == pytest.approx(10 / 96)
    # a blur of two training clips of one prompt (what few-step sampling does) is far from the data
    same = [i for i, c in enumerate(clips) if c.prompt == clips[0].prompt]
    assert len(same) >= 2
    blur = (data[same[0]] + data[same[1]]) / 2
    assert precision(to_unit(blur[None]), d, spacing) > 0.5
    # collapse onto one clip: coverage drops to one clip's worth
    ref, _ = draw_reference(SMALL, [c.prompt for c in clips[:20]], seed=1)
    collapsed = data[:1].expand(20, -1, -1, -1, -1)
    m = evaluate(collapsed, data, ref)
    assert m["covered_fraction"] == pytest.approx(1 / 96)
    assert m["coverage"] < 0.2 and m["precision"] == 0.0
    assert evaluate(ref, data, ref)["coverage"] == 1.0
    with pytest.raises(ValueError, match="as many reference clips"):
        evaluate(collapsed, data, ref[:5])
    dist, idx = nearest(d[:3], d)
    assert dist.tolist() == [0.0, 0.0, 0.0] and idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("cfg", [ToyDataConfig(), ToyDataConfig(height=12, width=12, shape_size=4, speed=1,
                                                                   n_along=2, n_across=3, n_clips=192),
                                 ToyDataConfig(background_ramp=0.25)])
def test_prompt_following_reads_colour_and_motion(cfg):
    grid = factor_grid(cfg)
    x = render(cfg, grid)
    prompts = [c.prompt for c in grid]
    assert prompt_following(x, prompts, cfg) == {"colour_ok": 1.0, "motion_ok": 1.0, "motion_still": 0.0,
                                                  "motion_reversed": 0.0}
    background = torch.from_numpy(data_background(cfg))[None] * 2 - 1  # [1, 3, F, H, W]
    shape = (x - background).abs().sum(1, keepdim=True) > 1e-6  # [N, 1, F, H, W]

    def frames_from(order):  # each frame shows the shape of frame order[f] over its own background
        return torch.where(shape[:, :, order], x[:, :, order], background)

    # standing still (every frame shows the first one's shape) or running backwards: right
    # colour, wrong motion
    still = frames_from([0] * cfg.frames)
    assert prompt_following(still, prompts, cfg) == {"colour_ok": 1.0, "motion_ok": 0.0, "motion_still": 1.0,
                                                      "motion_reversed": 0.0}
    backwards = frames_from(list(range(cfg.frames))[::-1])
    assert prompt_following(backwards, prompts, cfg) == {"colour_ok": 1.0, "motion_ok": 0.0, "motion_still": 0.0,
                                                          "motion_reversed": 1.0}
    # the same clips read against the prompts of another colour: motion right, colour wrong
    names = list(COLOURS)
    recoloured = [p.replace(f" {c.colour} ", f" {names[(names.index(c.colour) + 1) % len(names)]} ")
                  for p, c in zip(prompts, grid)]
    assert prompt_following(x, recoloured, cfg) == {"colour_ok": 0.0, "motion_ok": 1.0, "motion_still": 0.0,
                                                      "motion_reversed": 0.0}
    # a shape missing from one frame fails motion; an empty clip fails both
    gap = x.clone()
    gap[:, :, 2] = background[:, :, 2]  # frame 2 shows no shape
    assert prompt_following(gap, prompts, cfg)["motion_ok"] == 0.0
    assert prompt_following(gap, prompts, cfg)["motion_still"] == 0.0  # not a whole clip
    assert prompt_following(gap[:, :, list(range(cfg.frames))[::-1]], prompts, cfg)["motion_reversed"] == 0.0
    blank = background.expand_as(x)
    assert prompt_following(blank, prompts, cfg) == {"colour_ok": 0.0, "motion_ok": 0.0, "motion_still": 0.0,
                                                      "motion_reversed": 0.0}
    # half the clips static: half the score, half standing still
    mixed = torch.where((torch.arange(len(grid)) % 2 == 0).view(-1, 1, 1, 1, 1), x, still)
    assert prompt_following(mixed, prompts, cfg)["motion_ok"] == pytest.approx(0.5, abs=1 / len(grid))
    assert prompt_following(mixed, prompts, cfg)["motion_still"] == pytest.approx(0.5, abs=1 / len(grid))
    with pytest.raises(ValueError, match="one prompt each"):
        prompt_following(x[:3], prompts, cfg)
    with pytest.raises(ValueError, match="not a toy-data prompt"):
        prompt_following(x[:1], ["a purple cat"], cfg)


def test_nearest_neighbours_are_global_and_ties_go_to_the_lowest_index():
    data, clips = make_dataset(SMALL)
    d = to_unit(data)
    # a blank clip (background only) is exactly as far from every clip of one shape and colour;
    # it is matched to the first of them, so it covers one clip, the same one on every run
    blank = to_unit(torch.from_numpy(data_background(SMALL))[None] * 2 - 1)
    dist, idx = nearest(blank, d)
    full = torch.cdist(blank, d, compute_mode="donot_use_mm_for_euclid_dist")[0]
    ties = (full == full.min()).nonzero().flatten().tolist()  # 7 green crosses at the same distance
    assert len(ties) > 1 and int(idx) == ties[0] and float(dist) == float(full.min())
    assert coverage_fraction(blank.expand(5, -1), d) == 1 / d.shape[0]
    # a sample is matched to the nearest clip of any prompt: a clip of another prompt, not the
    # nearest clip of its own prompt
    other = next(i for i, c in enumerate(clips) if c.prompt != clips[0].prompt)
    assert int(nearest(d[other:other + 1], d)[1]) == other


def test_duplicate_data_is_refused():
    data, _ = make_dataset(SMALL)
    d = to_unit(torch.cat([data[:3], data[:1]]))
    with pytest.raises(ValueError, match="duplicate"):
        data_spacing(d)


def test_toy_family_folder_loads_through_the_adapter_registry(tmp_path):
    from videoblade.models import get_adapter
    from videoblade.models.toy import ToyAdapter, build_toy_model

    words = sorted({w for p in all_prompts() for w in p.split()})
    folder = build_toy_model(tmp_path / "toy", words, transformer=dict(num_layers=1, attention_head_dim=16,
                                                                      ffn_dim=32))
    adapter = get_adapter(folder)
    assert isinstance(adapter, ToyAdapter) and adapter.family == "toy"
    assert json.loads((folder / "transformer" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    g = adapter.geometry(folder)
    assert g.latent_shape == (3, 5, 16, 16) and g.token_grid == (5, 8, 8) and g.text_tokens == 0
    loaded = adapter.load(folder, dtype="fp32", components=("transformer", "vae", "text_encoder", "tokenizer"))
    assert loaded.tokenizer.tokenize("a red square moving left") == ["\u2581a", "\u2581red", "\u2581square",
                                                                      "\u2581moving", "\u2581left"]
    emb = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, ["a red square moving left", ""],
                                 max_length=adapter.text_max_length(folder))
    assert emb.shape == (2, 8, 32)
    assert emb[0, :6].abs().sum(-1).gt(0).all() and emb[0, 6:].abs().sum() == 0 and emb[1, 1:].abs().sum() == 0
    x = torch.rand(2, *g.latent_shape) * 2 - 1
    out = adapter.predict(loaded.transformer, x, torch.tensor([999, 10]), emb, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    frames = adapter.decode(loaded.vae, x)
    assert frames.dtype == torch.uint8 and frames.shape == (2, 5, 16, 16, 3)
    assert torch.equal(frames[0, 2, 3, 4], ((x[0, :, 2, 3, 4] / 2 + 0.5) * 255).round().to(torch.uint8))
    with pytest.raises(Exception, match="no diffusers pipeline"):
        adapter.pipeline(folder)


@pytest.mark.parametrize("compensation", [False, True])
def test_asa_gathered_cpu_path_matches_the_reference(compensation):
    # the demo runs ASA on CPU with cpu_backend="gathered": same outputs and gradients as the reference
    from videoblade.attention import AdaptiveSparseAttention
    from videoblade.config import ASAConfig

    torch.manual_seed(0)
    grid = (5, 8, 6)  # 240 tokens: the last block of 32 is partial
    q, k, v = (torch.randn(2, 2, 240, 16, requires_grad=True) for _ in range(3))
    outs, grads = [], []
    for backend in ("reference", "gathered"):
        asa = AdaptiveSparseAttention(ASAConfig(block_size=32, pool=8, samples_per_block=8, max_retain=0.3,
                                                compensation=compensation, cpu_backend=backend))
        out = asa(q, k, v, grid=grid)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), (q, k, v)))
        assert asa.density_stats()["mean"] < 0.6  # really sparse
    assert torch.allclose(outs[0], outs[1], atol=2e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=2e-5)


def test_ideal_denoiser_needs_few_steps_on_the_toy_data():
    """What benchmarks/demo_teacher.py reports about the data: the exact posterior-mean denoiser
    lands on training clips at 4 steps (few-step sampling alone loses nothing here) and blurs the
    prompt's clips together at 1 step (the first step's x0 is their average)."""
    from benchmarks.demo_teacher import ideal_rows

    rows = {r["steps"]: r for r in ideal_rows(steps_list=(4, 1))}
    assert rows[4]["precision"] < 0.01 and rows[4]["coverage"] > 0.8
    assert rows[1]["precision"] > 0.5 and rows[1]["coverage"] < 0.5


def test_frame_order_check_tells_a_frame_order_blind_model_from_one_that_reads_it():
    """benchmarks/demo_teacher.py's check on two stand-in models: one whose output mixes each
    frame with the mean over frames (blind to the order of frames), one that weights frames by
    their index."""
    from types import SimpleNamespace

    from benchmarks.demo_teacher import frame_order_check
    from videoblade.schedules import Schedule

    geometry = SimpleNamespace(latent_shape=(3, 5, 6, 6))
    emb = torch.zeros(48, 2, 4)
    ramp = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1)

    def blind(model, x, t, e, geo, schedule=None):
        return x + x.mean(2, keepdim=True)

    def ordered(model, x, t, e, geo, schedule=None):
        return x * (1 + ramp)

    sch, net = Schedule.flow(1000, 1.0), torch.nn.Linear(1, 1)
    rows = {name: frame_order_check(SimpleNamespace(predict=fn), net, sch, geometry, emb)
            for name, fn in (("blind", blind), ("ordered", ordered))}
    for level in (500, 800, 950):
        assert rows["blind"][f"mirror_time_rel_change_t{level}"] < 1e-6
        assert rows["ordered"][f"mirror_time_rel_change_t{level}"] > 0.1
        assert rows["ordered"][f"mirror_width_rel_change_t{level}"] < 1e-6  # it only weighs frames


def test_teacher_x0_loss_is_the_error_of_the_implied_x0():
    from videoblade.schedules import Schedule
    from videoblade.toy.teacher import TeacherConfig, teacher_loss

    sch = Schedule.flow(1000, 1.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 6, 6, generator=g), torch.randn(4, 3, 5, 6, 6, generator=g)
    t = torch.tensor([10, 300, 700, 990])
    x_t = sch.add_noise(x0, eps, t)
    target = sch.output_for(x_t, t, x0)
    out = target + 0.1 * torch.randn(target.shape, generator=g)
    x0_out, _ = sch.to_x0_eps(out, x_t, t)
    assert torch.allclose(teacher_loss(sch, out, target, t, "x0"), ((x0_out - x0) ** 2).mean(), rtol=1e-5)
    assert torch.allclose(teacher_loss(sch, out, target, t, "flow"), ((out - target) ** 2).mean())
    # the x0 reading weighs the noisy samples: the nearly clean one barely counts
    per = [float(teacher_loss(sch, out[i:i + 1], target[i:i + 1], t[i:i + 1], "x0")) for i in range(4)]
    assert per[0] < 1e-3 * per[3]
    with pytest.raises(ValueError, match="loss_weighting"):
        TeacherConfig(loss_weighting="snr")
    with pytest.raises(ValueError, match="flow schedule"):
        teacher_loss(Schedule.v_prediction(torch.linspace(0.999, 0.01, 1000)), out, target, t, "x0")


def test_eval_sampler_noise_is_independent_of_the_initial_noise():
    # the demo's evaluation shares one initial noise across methods; the eta sampler's own noise
    # must continue after it, not repeat it (seeded afresh, its first draw was the initial noise)
    import torch

    from videoblade.toy.pipeline import eval_generator

    noise = torch.randn((4, 3, 2, 6, 6), generator=torch.Generator().manual_seed(1234))
    g = eval_generator(1234, noise)
    nxt = torch.randn(noise.shape, generator=g)
    assert not torch.allclose(nxt, noise)
    assert abs(torch.corrcoef(torch.stack([nxt.flatten(), noise.flatten()]))[0, 1].item()) < 0.1
    with pytest.raises(RuntimeError, match="first draw"):
        eval_generator(1235, noise)


def test_cached_teacher_needs_its_weights(tmp_path):
    # a stamp without the weights beside it (a half-deleted run folder) is not a trained teacher
    from videoblade.toy.teacher import STAMP, teacher_is_trained

    (tmp_path / STAMP).write_text(json.dumps({"stamp": {"a": 1}}))
    assert not teacher_is_trained(tmp_path, {"a": 1})
    w = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    w.parent.mkdir()
    w.write_bytes(b"x")
    assert teacher_is_trained(tmp_path, {"a": 1}) and not teacher_is_trained(tmp_path, {"a": 2})

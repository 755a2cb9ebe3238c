"""TDM pure functions on small hand-checked tensors (SPEC section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from videoblade.distill import tdm
from videoblade.sampling import eta_step, randn
from videoblade.schedules import Schedule, stage_timesteps


def _vpred() -> Schedule:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return Schedule.v_prediction(torch.cumprod(1.0 - betas, 0))


SCHEDULES = {"flow": lambda: Schedule.flow(1000, 3.0), "vpred": _vpred}


def test_sample_stages_ranges_and_uniformity():
    g = torch.Generator().manual_seed(0)
    s = tdm.sample_stages(40000, 8, 1000, 980, g, "cpu")
    grid = stage_timesteps(8, 1000)
    assert set(s.stage.unique().tolist()) == set(range(1, 9))
    # t_g = i T/K - 1, t_mid = t_g - T/K + 1, index into the rollout grid
    assert torch.equal(s.t_g, s.stage * 125 - 1)
    assert torch.equal(s.t_mid, s.t_g - 125 + 1)
    assert all(grid[j] == tg for j, tg in zip(s.index.tolist()[:100], s.t_g.tolist()[:100]))
    assert bool((s.t >= s.t_mid).all()) and bool((s.t < 980).all())
    counts = torch.bincount(s.stage, minlength=9)[1:].float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01
    # t uniform on [t_mid, 980) for stage 1: mean (0 + 979) / 2
    t1 = s.t[s.stage == 1].double()
    assert abs(t1.mean().item() - 979 / 2) < 8
    assert t1.min().item() == 0 and t1.max().item() >= 975
    # t_mid above t_max collapses to t_mid
    s2 = tdm.sample_stages(100, 8, 1000, 500, g, "cpu")
    hi = s2.stage >= 5
    assert torch.equal(s2.t[hi], s2.t_mid[hi])


def test_sample_stages_deterministic_per_generator():
    a = tdm.sample_stages(16, 8, 1000, 980, torch.Generator().manual_seed(3), "cpu")
    b = tdm.sample_stages(16, 8, 1000, 980, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(a.stage, b.stage) and torch.equal(a.t, b.t)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_student_rollout_matches_manual_eta_sampler(kind):
    sched = SCHEDULES[kind]()
    target = torch.tensor([0.5, -1.0]).view(2, 1, 1)

    def predict(x, t):  # a network that always denoises to `target`
        return sched.output_for(x, t, target.expand_as(x))

    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(7)
    r = tdm.student_rollout(predict, sched, noise, k_step=4, eta=0.9, generator=g, depth=2)
    assert r.timesteps == [999, 749, 499]
    assert len(r.states) == 3 and len(r.outputs) == 3
    # manual: same generator stream, x_{k-1} = alpha x0 + sigma (eta eps + sqrt(1-eta^2) z)
    g2 = torch.Generator().manual_seed(7)
    x = noise.clone()
    for j, t in enumerate([999, 749, 499]):
        torch.testing.assert_close(r.states[j], x)
        tv = torch.full((2,), t)
        x0, eps = sched.to_x0_eps(predict(x, tv), x, tv)
        torch.testing.assert_close(x0, target.expand_as(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r.outputs[j], predict(x, tv))
        if j < 2:
            nxt = torch.full((2,), [999, 749, 499][j + 1])
            z = randn(x.shape, g2, "cpu")
            x = sched.alpha(nxt).view(2, 1, 1) * x0 + sched.sigma(nxt).view(2, 1, 1) * (
                0.9 * eps + math.sqrt(1 - 0.81) * z)
    with pytest.raises(ValueError):
        tdm.student_rollout(predict, sched, noise, 4, 0.9, g, depth=4)


def test_gather_stage_picks_per_sample():
    states = [torch.full((3, 2), float(j)) + torch.arange(3).view(3, 1) * 10 for j in range(4)]
    out = tdm.gather_stage(states, torch.tensor([2, 0, 3]))
    assert out[:, 0].tolist() == [2.0, 10.0, 23.0]
    with pytest.raises(ValueError):
        tdm.gather_stage(states[:2], torch.tensor([2, 0, 0]))


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("eta", [0.9, 0.0])
def test_landed_noisy_mean_and_variance_closed_form(kind, eta):
    sched = SCHEDULES[kind]()
    n = 400_000
    # one sample per stage setting: stage 3 of 8 -> t_mid = 250, t = 600; stage 8 -> t_mid 875, t 950
    s = tdm.StageSample(stage=torch.tensor([3, 8]), index=torch.tensor([5, 0]), t_g=torch.tensor([374, 999]),
                        t_mid=torch.tensor([250, 875]), t=torch.tensor([600, 950]))
    x0 = torch.tensor([0.7, -0.3]).view(2, 1).expand(2, n)
    eps = torch.tensor([1.5, 0.5]).view(2, 1).expand(2, n)
    x_t = tdm.landed_noisy(sched, x0, eps, s, eta, torch.Generator().manual_seed(0))
    a_m, s_m = sched.alpha(s.t_mid), sched.sigma(s.t_mid)
    a_t, s_t = sched.alpha(s.t), sched.sigma(s.t)
    ratio = a_t / a_m
    mean = a_t * x0[:, 0] + ratio * s_m * eta * eps[:, 0]
    var = s_t**2 - (ratio * s_m * eta) ** 2
    torch.testing.assert_close(x_t.mean(1), mean, atol=4 * var.max().sqrt().item() / math.sqrt(n), rtol=0)
    torch.testing.assert_close(x_t.var(1), var, rtol=0.01, atol=1e-4)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_landed_noisy_with_gaussian_eps_gives_marginal(kind):
    # if eps ~ N(0, 1) (a perfect student), x_t ~ alpha(t) x0 + sigma(t) N(0, 1) exactly
    sched = SCHEDULES[kind]()
    n = 300_000
    s = tdm.sample_stages(1, 8, 1000, 980, torch.Generator().manual_seed(5), "cpu")
    x0 = torch.full((1, n), 0.4)
    eps = torch.randn(1, n, generator=torch.Generator().manual_seed(9))
    x_t = tdm.landed_noisy(sched, x0, eps, s, 0.9, torch.Generator().manual_seed(1))
    assert abs(x_t.mean().item() - sched.alpha(s.t).item() * 0.4) < 0.01
    assert abs(x_t.std().item() - sched.sigma(s.t).item()) < 0.01


def test_landed_noisy_has_no_grad_path():
    sched = Schedule.flow(1000, 3.0)
    x0 = torch.randn(2, 5, requires_grad=True)
    s = tdm.sample_stages(2, 8, 1000, 980, torch.Generator().manual_seed(0), "cpu")
    assert not tdm.landed_noisy(sched, x0, x0 * 2, s, 0.9, None).requires_grad


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_fake_score_loss(kind):
    sched = SCHEDULES[kind]()
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    t = torch.tensor([100, 900])
    exact = sched.output_for(x_t, t, x0)
    loss, parts = tdm.fake_score_loss(sched, exact, x_t, t, x0)
    assert loss.item() < 1e-10
    if kind == "flow":  # hand formula v* = (x_t - x0) / sigma
        torch.testing.assert_close(exact, (x_t - x0) / sched.sigma(t).view(2, 1, 1))
    fake = exact + 0.5
    loss, _ = tdm.fake_score_loss(sched, fake, x_t, t, x0)
    assert abs(loss.item() - 0.25) < 1e-5
    teacher = exact - 0.25
    loss, parts = tdm.fake_score_loss(sched, fake, x_t, t, x0, teacher, lambda_reg=0.5)
    assert abs(parts["reg"].item() - 0.75**2) < 1e-5
    assert abs(loss.item() - (0.25 + 0.5 * 0.75**2)) < 1e-5
    with pytest.raises(ValueError):
        tdm.fake_score_loss(sched, fake, x_t, t, x0, None, lambda_reg=0.5)
    # the gradient reaches only the fake output
    f = fake.clone().requires_grad_(True)
    tdm.fake_score_loss(sched, f, x_t, t, x0)[0].backward()
    torch.testing.assert_close(f.grad, 2 * 0.5 * torch.ones_like(f) / f.numel())


def test_huber_constant_matches_spec():
    assert tdm.huber_constant(torch.zeros(3, 4, 64, 64)) == pytest.approx(1e-3)
    wan = torch.zeros(1, 16, 21, 60, 104)
    assert tdm.huber_constant(wan) == pytest.approx(1e-3 * math.sqrt(16 * 21 * 60 * 104) / 128)


def test_generator_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    real, fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    loss, stats = tdm.generator_loss(x0, real, fake, huber_c=1e-3)
    c = 1e-3 * math.sqrt(256) / math.sqrt(64 * 64 * 4)
    d = fake - real  # x0_s - target
    assert loss.item() == pytest.approx((torch.sqrt(d**2 + c * c) - c).mean().item(), rel=1e-5)
    loss.backward()
    torch.testing.assert_close(x0.grad, d / torch.sqrt(d**2 + c * c) / d.numel())
    # descent moves x0_s from the fake estimate towards the teacher's
    assert (x0.grad * (fake - real)).sum() > 0


def test_generator_gradient_proportional_to_fake_minus_real_in_quadratic_regime():
    # |x0_F - x0_R| << c: pseudo-Huber is quadratic, grad = (x0_F - x0_R) / (c N) exactly in direction
    x0 = torch.zeros(1, 4, 64, 64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    real = 1e-7 * torch.randn(1, 4, 64, 64, generator=g)
    fake = 1e-7 * torch.randn(1, 4, 64, 64, generator=g)
    tdm.generator_loss(x0, real, fake, huber_c=1e-3)[0].backward()
    direction = (fake - real).flatten()
    grad = x0.grad.flatten()
    cos = torch.nn.functional.cosine_similarity(grad.double(), direction.double(), dim=0)
    assert cos.item() > 0.99999
    torch.testing.assert_close(grad, direction / (1e-3 * direction.numel()), rtol=1e-3, atol=0)


def test_generator_loss_sample_weighting():
    x0 = torch.zeros(2, 3, 4, 4, requires_grad=True)
    real = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 2.0)])
    fake = torch.zeros(2, 3, 4, 4)
    plain, _ = tdm.generator_loss(x0, real, fake)
    weighted, _ = tdm.generator_loss(x0, real, fake, sample_weighting=True)
    c = tdm.huber_constant(x0)
    per = [math.sqrt(0.25 + c * c) - c, math.sqrt(4.0 + c * c) - c]
    assert plain.item() == pytest.approx(sum(per) / 2, rel=1e-5)
    assert weighted.item() == pytest.approx((per[0] / 0.5 + per[1] / 2.0) / 2, rel=1e-5)


def _cogvideox() -> Schedule:  # CogVideoX-5B's scheduler: zero terminal SNR, alpha(T - 1) = 0
    return Schedule.from_scheduler_config({
        "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "snr_shift_scale": 1.0})


@pytest.mark.parametrize("kind", ["flow", "cogvideox"])
def test_landing_is_exact_at_t_mid_including_the_pure_noise_end(kind):
    """With K = T (allowed: 1 <= k_step <= T) stage i has t_g = t_mid = i - 1, so the top stage lands
    at t_mid = T - 1 where alpha = 0 (flow sigma 1, CogVideoX zero terminal SNR), and t_mid >= t_max
    gives t = t_mid: x_t must be the landing point itself (finite), not 0/0."""
    sched = SCHEDULES["flow"]() if kind == "flow" else _cogvideox()
    K = T = 1000
    s = tdm.sample_stages(20000, K, T, 980, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(s.t_mid, s.t_g) and torch.equal(s.t_g, s.stage - 1)
    hi = s.t_mid >= 980
    assert torch.equal(s.t[hi], s.t_mid[hi]) and bool((s.t[~hi] < 980).all())
    top = int(torch.nonzero(s.stage == K)[0])
    mid = int(torch.nonzero(s.stage == 500)[0])
    rows = torch.tensor([top, mid])
    sub = tdm.StageSample(stage=s.stage[rows], index=s.index[rows], t_g=s.t_g[rows], t_mid=s.t_mid[rows],
                          t=s.t_mid[rows])  # t == t_mid for both rows
    assert sub.t_mid.tolist() == [999, 499] and sched.alpha(999).item() == 0.0
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    x_t = tdm.landed_noisy(sched, x0, eps, sub, 0.9, torch.Generator().manual_seed(1))
    g2 = torch.Generator().manual_seed(1)
    x_mid = eta_step(sched, x0, eps, sub.t_mid, 0.9, randn(x0.shape, g2, "cpu"))
    assert torch.isfinite(x_t).all()
    assert torch.equal(x_t, x_mid)


@pytest.mark.parametrize("k_step", [3, 7, 8, 50])
def test_stage_grid_when_k_does_not_divide_t(k_step):
    """t_g of stage i is the rollout grid's entry index = K - i (floor(i T/K) - 1, also when K does
    not divide T), t_mid = (i-1) T/K floored = t_g of stage i-1 plus one (0 for stage 1), and
    t ~ U{t_mid..979}, or t = t_mid when t_mid >= 980 (K = 50: the top stage has t_mid = 980)."""
    T = 1000
    grid = stage_timesteps(k_step, T)
    s = tdm.sample_stages(5000, k_step, T, 980, torch.Generator().manual_seed(2), "cpu")
    assert set(s.stage.tolist()) == set(range(1, k_step + 1))
    for i in range(1, k_step + 1):
        m = s.stage == i
        assert set(s.index[m].tolist()) == {k_step - i}
        assert set(s.t_g[m].tolist()) == {grid[k_step - i]} == {(i * T) // k_step - 1}
        t_mid = 0 if i == 1 else grid[k_step - i + 1] + 1
        assert set(s.t_mid[m].tolist()) == {t_mid}
        if t_mid >= 980:
            assert set(s.t[m].tolist()) == {t_mid}
        else:
            assert int(s.t[m].min()) >= t_mid and int(s.t[m].max()) <= 979

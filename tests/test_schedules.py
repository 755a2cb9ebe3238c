"""Schedule identities for both families (SPEC section 2)."""

import json

import pytest
import torch

from videoblade.schedules import Schedule, stage_timesteps

WAN_SCHEDULER = {  # Wan2.1-T2V-1.3B's scheduler/scheduler_config.json (the fields that matter)
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}
COG_SCHEDULER = {  # CogVideoX-5B's scheduler/scheduler_config.json
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


@pytest.fixture(params=["flow", "v_prediction"])
def schedule(request):
    cfg = WAN_SCHEDULER if request.param == "flow" else COG_SCHEDULER
    return Schedule.from_scheduler_config(cfg)


def test_kinds_and_endpoints():
    wan = Schedule.from_scheduler_config(WAN_SCHEDULER)
    cog = Schedule.from_scheduler_config(COG_SCHEDULER)
    assert wan.kind == "flow" and cog.kind == "v_prediction"
    # t = T-1 is pure noise for both (flow sigma 1; zero-terminal-SNR for CogVideoX)
    assert wan.sigma(999).item() == pytest.approx(1.0)
    assert cog.alpha(999).item() == pytest.approx(0.0, abs=1e-6)
    # shift 3 moves sigma up at mid-t: s' = 3 s / (1 + 2 s) with s = 0.5
    assert wan.sigma(499).item() == pytest.approx(0.75, abs=1e-6)
    # monotone: noise grows with t
    for s in (wan, cog):
        assert torch.all(s.sigmas[1:] >= s.sigmas[:-1])
        assert torch.all(s.alphas[1:] <= s.alphas[:-1])


def test_vpred_matches_diffusers_alphas_cumprod():
    import diffusers

    ref = diffusers.CogVideoXDDIMScheduler.from_config(COG_SCHEDULER).alphas_cumprod
    cog = Schedule.from_scheduler_config(COG_SCHEDULER)
    torch.testing.assert_close(cog.alphas**2, ref.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cog.alphas**2 + cog.sigmas**2, torch.ones(1000), atol=1e-6, rtol=0)


def test_flow_matches_diffusers_training_sigmas():
    import diffusers

    # diffusers' flow-matching training table: sigma_i = shift s / (1 + (shift - 1) s), s = (i + 1) / T,
    # and the transformer is fed sigma * T as its timestep
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    wan = Schedule.from_scheduler_config(WAN_SCHEDULER)
    torch.testing.assert_close(wan.sigmas.flip(0), ref.sigmas.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(wan.model_timestep(torch.arange(999, -1, -1)), ref.timesteps.float(), atol=1e-3, rtol=1e-6)


def test_x0_eps_round_trip(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 5, 6, generator=g)
    eps = torch.randn(4, 3, 2, 5, 6, generator=g)
    t = torch.tensor([0, 250, 700, 998])
    x_t = schedule.add_noise(x0, eps, t)
    out = schedule.output_for(x_t, t, x0)
    x0_hat, eps_hat = schedule.to_x0_eps(out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)
    if schedule.kind == "flow":  # the network target is the velocity eps - x0
        torch.testing.assert_close(out, eps - x0, atol=1e-4, rtol=1e-4)


def test_diffusion_variance_closed_form(schedule):
    # x_t = x_s a_t/a_s + std z must have the marginal of add_noise(x0, ., t) when x_s is the
    # marginal at s: Var = (a_t/a_s)^2 sigma_s^2 + std^2 = sigma_t^2 (for fixed x0).
    s, t = torch.tensor([100, 300]), torch.tensor([600, 900])
    std = schedule.diffusion_std(s, t)
    r = schedule.alpha(t) / schedule.alpha(s)
    torch.testing.assert_close(r**2 * schedule.sigma(s) ** 2 + std**2, schedule.sigma(t) ** 2, atol=1e-6, rtol=1e-5)
    # empirical check on many samples
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    x_s = schedule.add_noise(x0, torch.randn(n, 1, generator=g), s[0].expand(n))
    x_t = schedule.diffuse(x_s, s[0].expand(n), t[0].expand(n), torch.randn(n, 1, generator=g))
    assert x_t.mean().item() == pytest.approx(0.7 * schedule.alpha(t[0]).item(), abs=5e-3)
    assert x_t.std().item() == pytest.approx(schedule.sigma(t[0]).item(), rel=1e-2)


def test_stage_timesteps():
    assert stage_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert stage_timesteps(4) == [999, 749, 499, 249]
    assert stage_timesteps(1) == [999]
    ts = stage_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError):
        stage_timesteps(0)


def test_bad_timesteps_and_configs(tmp_path):
    wan = Schedule.from_scheduler_config(WAN_SCHEDULER)
    with pytest.raises(ValueError, match="out of range"):
        wan.sigma(1000)
    with pytest.raises(ValueError, match="integers"):
        wan.sigma(torch.tensor(3.5))
    with pytest.raises(ValueError, match="not supported"):
        Schedule.from_scheduler_config({"_class_name": "DDIMScheduler", "prediction_type": "epsilon"})
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        Schedule.from_model_folder(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN_SCHEDULER))
    assert Schedule.from_model_folder(tmp_path, shift=5.0).shift == 5.0


def test_device_tables_follow_a_replaced_table():
    """The per-device copy of a table is made once and redone when the table is replaced."""
    wan = Schedule.from_scheduler_config(WAN_SCHEDULER)
    t = torch.tensor([0, 500, 999])
    meta = torch.device("meta")
    assert wan._table_on(wan.sigmas, meta) is wan._table_on(wan.sigmas, meta)
    assert wan._table_on(wan.sigmas, torch.device("cpu")) is wan.sigmas
    before = wan.sigma(t)
    wan.sigmas = wan.sigmas * 2
    assert wan._table_on(wan.sigmas, meta).shape == wan.sigmas.shape
    torch.testing.assert_close(wan.sigma(t), 2 * before)


@pytest.mark.gpu
def test_sampler_makes_no_host_sync_on_the_gpu():
    """The eta sampler on CUDA with a CPU generator (reproducible seeds on any device) looks up its
    schedule and copies its noise without a host sync, so the GPU never waits on the host between
    steps; the samples equal the CPU run's. (Out-of-range timesteps on the device fail by a
    device-side assert, which would end this process's CUDA context: not triggered here.)"""
    from videoblade.sampling import rollout

    sched = Schedule.from_scheduler_config(WAN_SCHEDULER)

    def predict(x, t):
        return 0.5 * x + 1e-3 * sched.model_timestep(t).view(-1, 1, 1, 1, 1)

    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ref, _ = rollout(predict, sched, x, stage_timesteps(4), 0.9, torch.Generator().manual_seed(0))
    xc = x.cuda()
    rollout(predict, sched, xc, stage_timesteps(4), 0.9, torch.Generator().manual_seed(0))  # tables copied
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = rollout(predict, sched, xc, stage_timesteps(4), 0.9, torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_model_timestep_checks_integer_t_in_range(schedule):
    """Both kinds take integer t in [0, T) for the network's timestep input: an out-of-range or
    fractional t is an error for v-prediction too, not a silently truncated embedding input."""
    T = schedule.num_train_timesteps
    ok = schedule.model_timestep(torch.tensor([0, 500, T - 1]))
    if schedule.kind == "v_prediction":
        assert ok.dtype == torch.long and ok.tolist() == [0, 500, T - 1]
        assert schedule.model_timestep(torch.tensor([3.0, 998.0])).tolist() == [3, 998]
    for bad in (T, -1, torch.tensor([0, T])):
        with pytest.raises(ValueError, match="out of range"):
            schedule.model_timestep(bad)
    with pytest.raises(ValueError, match="integers"):
        schedule.model_timestep(torch.tensor([3.5]))


@pytest.mark.parametrize("t", [0, 500, 998, 999])
def test_diffuse_is_exact_when_t_equals_s(schedule, t):
    """q(x_t | x_s) at t == s is the identity, exactly, also at t = T - 1 where alpha = 0 (flow's
    sigma = 1 and CogVideoX's zero terminal SNR): a ratio alpha(t)/alpha(s) = 0/0 there would make
    x_t NaN (TDM lands at t_mid = T - 1 and diffuses to t = t_mid for the top stage when K = T)."""
    g = torch.Generator().manual_seed(2)
    x_s = torch.randn(3, 2, 4, generator=g)
    z = torch.randn(3, 2, 4, generator=g)
    tt = torch.full((3,), t)
    assert torch.equal(schedule.diffuse(x_s, tt, tt, z), x_s)
    assert torch.equal(schedule.diffuse(x_s, t, t, z), x_s)  # python-int timesteps too
    assert schedule.diffusion_std(tt, tt).tolist() == [0.0, 0.0, 0.0]
    # a mixed batch (one sample at the pure-noise end, one below) stays finite and exact per sample
    s2, t2 = torch.tensor([999, 300]), torch.tensor([999, 700])
    out = schedule.diffuse(x_s[:2], s2, t2, z[:2])
    assert torch.equal(out[0], x_s[0])
    r = schedule.alpha(700) / schedule.alpha(300)
    std = (schedule.sigma(700) ** 2 - (r * schedule.sigma(300)) ** 2).sqrt()
    torch.testing.assert_close(out[1], r * x_s[1] + std * z[1])

"""Typed configs: YAML load, dotted overrides, validation errors, resolved dump."""

from pathlib import Path

import pytest

from videoblade.config import ASAConfig, ConfigError, RunConfig, dump_config, load_config


def test_defaults_follow_the_spec():
    c = load_config()
    assert isinstance(c, RunConfig) and isinstance(c.asa, ASAConfig)
    assert (c.tdm.k_step, c.tdm.eta, c.tdm.cfg, c.tdm.lambda_reg) == (8, 0.9, 5.0, 0.0)
    assert (c.lora.rank, c.lora.lora_alpha) == (64, 64)
    assert (c.optim.learning_rate, c.optim.learning_rate_fake) == (1e-4, 5e-4)
    assert (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.max_grad_norm) == (0.0, 0.95, 1.0)
    assert (c.asa.block_size, c.asa.energy_threshold, c.asa.min_retain) == (128, 0.95, 0.05)
    assert (c.train.max_train_steps, c.train.train_batch_size, c.train.gradient_accumulation_steps) == (300, 5, 4)


def test_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  path: models/wan\n  frames: 33\ntdm:\n  cfg: 3.5\nasa:\n  pool: 16\n")
    c = load_config(y, ["tdm.cfg=4.0", "asa.dense_layers=[0,1]", "train.resume_from_checkpoint=null"])
    assert c.model.path == "models/wan" and c.model.frames == 33
    assert c.tdm.cfg == 4.0  # the override wins over the YAML
    assert c.asa.pool == 16 and c.asa.dense_layers == [0, 1]
    assert c.train.resume_from_checkpoint is None


def test_dump_round_trip(tmp_path):
    c = load_config(None, ["model.path=x", "asa.energy_threshold=0.9", "lora.rank=8"])
    path = dump_config(c, tmp_path / "run")
    assert path.name == "config.yaml" and path.is_file()
    assert load_config(path) == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("asa.pool=24", "asa.pool: must divide"),
        ("asa.block_size=100", "asa.block_size: must be a power of two"),
        ("asa.samples_per_block=24", "asa.samples_per_block: must be a power of two"),
        ("model.frames=80", "model.frames: must be of the form 4k\\+1 \\(e.g. 77 or 81\\)"),
        ("asa.min_retain=0.5", "min_retain <= max_retain"),
        ("tdm.eta=1.5", "tdm.eta"),
        ("sample.sampler=ddim", "sample.sampler"),
        ("model.dtype=fp8", "model.dtype"),
        ("asa.not_a_key=1", "not_a_key"),
        ("lora.rank=many", "could not be converted"),
        ("tdm.cfg", "key=value"),
    ],
)
def test_validation_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["asa.level_pools=[3]"], "distinct powers of two"),
        (["asa.level_pools=[2,4,8,16]", "asa.level_fractions=[0.1,0.1,0.1,0.1,0.1]"], "1 to 3 pooled levels"),
        (["asa.level_fractions=[0.1,0.2]"], "needs 4 entries"),
        (["asa.level_fractions=[0.5,0.3,0.2,0.1]"], "sum to at most 1"),
        (["asa.block_size=16", "asa.pool=4", "asa.samples_per_block=4", "asa.level_pools=[32]",
          "asa.level_fractions=[0.1,0.1]"], "dividing block_size=16"),
    ],
)
def test_level_settings_are_checked_in_levels_mode(overrides, message):
    with pytest.raises(ConfigError, match="asa.level_pools/level_fractions: .*" + message):
        load_config(None, ["asa.mode=levels", *overrides])
    load_config(None, overrides)  # other modes do not read them


def test_levels_mode_loads_with_defaults(tmp_path):
    cfg = load_config(None, ["asa.mode=levels"])
    assert cfg.asa.level_pools == [2, 4, 8] and cfg.asa.level_fractions == [0.05, 0.10, 0.15, 0.20]


def test_required_keys_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="model.path must be set"):
        load_config(None, [], require=("model.path",))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  mixed_precision: no\n")
    assert load_config(y).train.mixed_precision == "no"


@pytest.mark.parametrize("path,cfg_scale,lambda_reg,pool,family",
                         [("wanx/configs/tdm_asa.yaml", 5.0, 0.0, 32, "wan"),
                          ("cogvideox/configs/tdm_asa.yaml", 3.5, 0.5, 16, "cogvideox")])
def test_shipped_recipes_are_the_published_ones(path, cfg_scale, lambda_reg, pool, family):
    # issue 5: the YAML defaults reproduce the published recipes
    root = Path(__file__).resolve().parents[1]
    c = load_config(root / path)
    assert c.model.family == family
    assert (c.tdm.cfg, c.tdm.lambda_reg, c.tdm.k_step, c.tdm.eta) == (cfg_scale, lambda_reg, 8, 0.9)
    assert (c.train.max_train_steps, c.train.train_batch_size, c.train.gradient_accumulation_steps) == (300, 5, 4)
    assert (c.optim.learning_rate, c.optim.learning_rate_fake) == (1e-4, 5e-4)
    assert (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.max_grad_norm, c.optim.lr_warmup_steps) == (0.0, 0.95, 1.0, 5)
    assert c.optim.lr_scheduler == "cosine_with_restarts"
    assert (c.lora.rank, c.lora.lora_alpha) == (64, 64)
    assert (c.asa.enabled, c.asa.mode, c.asa.pool, c.asa.compensation, c.asa.reorder) == (True, "energy", pool, True, True)

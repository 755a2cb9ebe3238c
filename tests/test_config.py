"""Typed configs: YAML load, dotted overrides, validation errors, resolved dump."""

from pathlib import Path

import pytest

from videoblade.config import ASAConfig, ConfigError, RunConfig, dump_config, load_config


def test_defaults_follow_the_spec():
    c = load_config()
    assert isinstance(c, RunConfig) and isinstance(c.asa, ASAConfig)
    assert (c.tdm.k_step, c.tdm.eta) == (8, 0.9)
    # the per-family settings are left to the model (the trainer fills them in: see test_trainer_review)
    assert (c.tdm.cfg, c.tdm.lambda_reg, c.asa.pool, c.sample.fps) == (None, None, None, None)
    from videoblade.config import family_asa_pool
    from videoblade.models import CogVideoXAdapter, WanAdapter

    assert (WanAdapter.default_cfg, WanAdapter.default_lambda_reg, family_asa_pool("wan")) == (5.0, 0.0, 32)
    assert (CogVideoXAdapter.default_cfg, CogVideoXAdapter.default_lambda_reg, family_asa_pool("cogvideox")) == (
        3.5, 0.5, 16)
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


def test_min_retain_one_alone_is_the_keep_everything_setting():
    # SPEC's exactness rule sets min_retain = 1 and nothing else; max_retain keeps its default
    assert load_config(None, ["asa.min_retain=1"]).asa.min_retain == 1.0


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
        ("asa.min_retain=1.5", "min_retain <= max_retain"),
        ("tdm.eta=1.5", "tdm.eta"),
        ("sample.sampler=ddim", "sample.sampler"),
        ("model.dtype=fp8", "model.dtype"),
        ("asa.not_a_key=1", "not_a_key"),
        ("lora.rank=many", "could not be converted"),
        ("tdm.cfg", "key=value"),
        # values that would otherwise fail only after the weights load or mid-run
        ("optim.lr_scheduler=cosine_restarts", "optim.lr_scheduler: must be one of"),
        ("optim.lr_scheduler=piecewise_constant", "optim.lr_scheduler: must be one of"),
        ("optim.lr_num_cycles=0", "optim.lr_num_cycles"),
        ("optim.adam_epsilon=-1e-8", "optim.adam_epsilon"),
        ("optim.adam_weight_decay=-0.1", "adam_weight_decay: must be >= 0"),
        ("train.logging_steps=0", "train.logging_steps: must be >= 1"),
        ("train.validation_steps=-1", "train.validation_steps"),
        ("train.num_validation_videos=-1", "train.num_validation_videos"),
        ("lora.lora_dropout=1.5", "lora.lora_dropout"),
        ("tdm.huber_c=0", "tdm.huber_c"),
        ("sample.fps=0", "sample.fps"),
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


def test_shipped_ds_config_follows_the_run_config(monkeypatch):
    # under DeepSpeed the engine clips and accumulates (the trainer does not clip itself there): the shipped
    # ds_config.json must take optim.max_grad_norm / train.* from the run config, not fixed numbers of its own
    from videoblade.distill.trainer import _fill_ds_config

    monkeypatch.setenv("WORLD_SIZE", "8")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "wanx/configs/tdm_asa.yaml",
                      ["optim.max_grad_norm=0.5", "train.gradient_accumulation_steps=2", "train.train_batch_size=3"])
    ds = _fill_ds_config(str(root / "ds_config.json"), cfg)
    assert ds["gradient_clipping"] == 0.5
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (2, 3, 48)
    assert ds["bf16"]["enabled"] == "auto"  # accelerate fills it from train.mixed_precision
    assert _fill_ds_config(str(root / "ds_config.json"), load_config(root / "wanx/configs/tdm_asa.yaml"))[
        "gradient_clipping"] == 1.0  # the published recipe's clip


@pytest.mark.parametrize("spelling", ["None", "none", "null", "~"])
def test_none_spellings_clear_optional_paths(tmp_path, spelling):
    # `train.resume_from_checkpoint=None` (Python's spelling) must mean no resume, not a checkpoint folder
    # named "None" that the trainer rejects only after the weights load; likewise the other optional paths
    keys = ("train.resume_from_checkpoint", "train.deepspeed_config", "train.validation_prompts", "model.path")
    c = load_config(None, [f"{k}={spelling}" for k in keys])
    assert (c.train.resume_from_checkpoint, c.train.deepspeed_config, c.train.validation_prompts, c.model.path) == (
        None, None, None, None)
    y = tmp_path / "c.yaml"
    y.write_text(f"train:\n  resume_from_checkpoint: {spelling}\n")
    assert load_config(y).train.resume_from_checkpoint is None
    assert load_config(None, ["train.report_to=none"]).train.report_to == "none"  # a plain string stays one
    # optional numbers too (`sample.steps=None` failed: "None" could not be converted to an int)
    keys = ("sample.steps", "sample.eta", "model.height", "model.frames", "asa.dense_timestep_above")
    c = load_config(None, [f"{k}={spelling}" for k in keys])
    assert (c.sample.steps, c.sample.eta, c.model.height, c.model.frames, c.asa.dense_timestep_above) == (None,) * 5


def test_sample_defaults_follow_the_student():
    # validation videos sample like the student was trained (tdm.k_step / tdm.eta) unless set
    c = load_config(None, ["tdm.k_step=4", "tdm.eta=0.5"])
    assert (c.sample.steps, c.sample.eta, c.sample.guidance, c.sample.sampler, c.sample.flow_shift) == (
        None, None, 1.0, "tdm", None)


@pytest.mark.parametrize("overrides, message", [
    (["sample.flow_shift=5.0"], "sample.flow_shift: .*sample.sampler=unipc"),
    (["sample.sampler=unipc", "sample.eta=0.5"], "sample.eta: .*sample.sampler=tdm"),
    (["sample.sampler=unipc", "sample.flow_shift=0"], "sample.flow_shift: must be > 0"),
    (["sample.steps=0"], "sample.steps: must be >= 1"),
    (["sample.steps=1001"], "sample.steps: must be"),
    (["sample.eta=1.5"], "sample.eta"),
])
def test_sample_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("value, expected", [
    ("runs/exp #3", "runs/exp #3"),  # YAML cut the text at " #" (a comment)
    ("blurry, low quality: bad hands", "blurry, low quality: bad hands"),  # YAML read a mapping
    ("[watermark]", "[watermark]"),  # ... a list
    ("no", "no"),  # ... a boolean, stored as "False"
    ("'quoted text'", "quoted text"),  # one pair of enclosing quotes goes, as the shell leaves them
])
def test_text_overrides_are_taken_as_typed(tmp_path, value, expected):
    c = load_config(None, [f"tdm.negative_prompt={value}", f"train.output_dir={value}"])
    assert c.tdm.negative_prompt == expected and c.train.output_dir == expected
    assert load_config(dump_config(c, tmp_path)) == c  # and survive the resolved dump


def test_text_overrides_keep_null_and_interpolation(monkeypatch):
    monkeypatch.setenv("VIDEOBLADE_TEST_ROOT", "/data/models")
    c = load_config(None, ["train.prompt_store=null", "model.path=${oc.env:VIDEOBLADE_TEST_ROOT}/wan"])
    assert c.train.prompt_store is None and c.model.path == "/data/models/wan"
    # an empty value clears an optional text field, as in YAML: `model.path=` is still "not set"
    with pytest.raises(ConfigError, match="model.path must be set"):
        load_config(None, ["model.path="], require=("model.path",))
    # non-text fields are still parsed and checked as before
    c = load_config(None, ["asa.dense_layers=[0, 2]", "lora.rank=8", "asa.reorder=false"])
    assert c.asa.dense_layers == [0, 2] and c.lora.rank == 8 and c.asa.reorder is False

"""Tests of sidscale.config: presets, defaults, overrides, validation messages, round trip."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

import pytest
import yaml

from sidscale.config import (
    Config,
    ConfigError,
    NetConfig,
    accumulation_steps,
    add_config_args,
    config_from_args,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_presets,
    load_config,
    preset_path,
    resolve_deepspeed_config,
    validate,
)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*overrides: str, config: str = "toy") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------------------- presets, defaults


def test_presets_include_toy() -> None:
    assert "toy" in list_presets()
    assert preset_path("toy") == Path(__file__).resolve().parents[2] / "sidscale" / "configs" / "toy.yaml"


def test_toy_preset_values() -> None:
    cfg = load_config("toy")
    assert cfg.teacher.kind == "toy" and cfg.teacher.path == ""
    assert cfg.teacher.resolution == 16 and cfg.teacher.dtype == "fp32"
    assert (cfg.method.cfg_train_fake, cfg.method.cfg_eval_fake, cfg.method.cfg_eval_real) == (1.5, 1.5, 1.5)
    assert cfg.generator == NetConfig(lr=1e-4, betas=(0.0, 0.999), eps=None, weight_decay=0.0)
    assert cfg.fake == NetConfig(lr=1e-4, betas=(0.0, 0.999), eps=None, weight_decay=0.0)
    for net in (cfg.generator, cfg.fake):
        assert isinstance(net.betas, tuple)
    assert (cfg.train.global_batch, cfg.train.micro_batch, cfg.train.max_steps) == (32, 8, 200)
    assert cfg.train.precision == "bf16" and cfg.train.ema_halflife_kimg == 0.5
    assert (cfg.train.log_every, cfg.train.preview_every, cfg.train.ckpt_every) == (10, 50, 50)
    assert cfg.train.keep_last == 2
    assert cfg.data.shards == "toy" and cfg.data.num_workers == 1
    assert cfg.deepspeed.config == "ds_configs/zero2.json"
    assert cfg.preview.prompts == ["a red circle", "a blue square", "a green triangle", "a yellow ring"]
    assert cfg.eval.num_samples == 1000


def test_toy_preset_is_complete() -> None:
    # Every key is spelled out in the preset, so it documents the whole schema.
    raw = yaml.safe_load(preset_path("toy").read_text())
    assert set(raw) == set(config_to_dict(Config()))
    for section, values in config_to_dict(Config()).items():
        if isinstance(values, dict):
            assert set(raw[section]) == set(values), section


def test_defaults_are_the_method_page_recipe() -> None:
    cfg = Config()
    validate(cfg)
    assert cfg.resume is True
    teacher = cfg.teacher
    assert (teacher.kind, teacher.path, teacher.dtype, teacher.resolution) == ("toy", "", "bf16", 512)
    assert cfg.teacher.prediction_type == "auto" and cfg.teacher.cache_dir == "~/.cache/sidscale"
    assert dataclasses.asdict(cfg.schedule) == {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    assert dataclasses.asdict(cfg.method) == {
        "name": "sid_lsg", "cfg_train_fake": 1.5, "cfg_eval_fake": 1.5, "cfg_eval_real": 1.5, "alpha": 1.0,
        "t_init": 625, "t_min": 20, "t_max": 980, "prompt_dropout": 0.1,
        "fake_loss_scale": 1.0, "gen_loss_scale": 1.0,
        # K = 1 and SiD-LSG's normaliser: the one-step method; the sigma keys are SiD-DiT's (flow teachers)
        "generator_steps": 1, "gen_weighting": "sid_legacy", "sigma_init": 1.0,
        "sigma_logit_mean": math.log(2.0), "sigma_logit_std": 1.6,
        # the authors' defaults of SiD-DiT's options: fresh noise, a text-conditioned fake net, no real data;
        # the adversarial constants are SiD-DiT's (lsd 1, lsg_gan 1, 20 / 40 kimg, 50/50 mix, logits +-10)
        "noise_type": "fresh", "fake_text": True,
        "adversarial": {"enabled": False, "disc_scale": 1.0, "gen_scale": 1.0, "disc_warmup_kimg": 20.0,
                        "mix_after_kimg": 40.0, "mix_weight": 0.5, "logit_clamp": 10.0},
    }
    for net in (cfg.generator, cfg.fake):
        assert dataclasses.asdict(net) == {
            "lr": 1e-6, "betas": (0.0, 0.999), "eps": None, "weight_decay": 0.0, "grad_clip_value": None,
            "grad_checkpointing": False,
        }
    assert cfg.generator is not cfg.fake
    t = cfg.train
    assert (t.global_batch, t.micro_batch, t.max_steps, t.seed, t.precision) == (512, 1, 20000, 0, "bf16")
    assert (t.ema_halflife_kimg, t.ema_rampup_ratio) == (50.0, 0.05)
    assert (t.log_every, t.preview_every, t.ckpt_every) == (10, 500, 500)
    assert (t.keep_last, t.export_at_end) == (3, True)
    assert dataclasses.asdict(cfg.data) == {
        "shards": "", "real_shards": "", "num_workers": 2, "shuffle_buffer": 1000, "resampled": True
    }
    assert cfg.deepspeed.config == "ds_configs/zero2.json"
    assert len(cfg.preview.prompts) >= 2 and cfg.preview.seeds_per_prompt == 2
    assert (cfg.eval.num_samples, cfg.eval.teacher_steps) == (2000, 25)
    assert Config().preview.prompts is not cfg.preview.prompts  # no shared mutable default


# ---------------------------------------------------------------------------- overrides


def test_override_each_type() -> None:
    cfg = load_config("toy", [
        "train.max_steps=50",                 # int
        "method.alpha=1.2",                   # float
        "method.cfg_eval_real=2",             # int accepted for float
        "generator.lr=1e-6",                  # YAML 1.1 reads this as a string; coerced to float
        "resume=false",                       # bool
        "fake.betas=[0.9, 0.99]",             # tuple from a YAML list
        "preview.prompts=[a cat, a dog]",     # list[str]
        "data.shards=/data/p-{000000..000003}.tar",  # str taken raw (braces are not YAML here)
        "teacher.cache_dir=yes",              # raw str, not YAML's bool
    ])
    assert cfg.train.max_steps == 50
    assert cfg.method.alpha == 1.2
    assert cfg.method.cfg_eval_real == 2.0 and type(cfg.method.cfg_eval_real) is float
    assert cfg.generator.lr == 1e-6 and type(cfg.generator.lr) is float
    assert cfg.resume is False
    assert cfg.fake.betas == (0.9, 0.99) and cfg.generator.betas == (0.0, 0.999)
    assert cfg.preview.prompts == ["a cat", "a dog"]
    assert cfg.data.shards == "/data/p-{000000..000003}.tar"
    assert cfg.teacher.cache_dir == "yes"


def test_override_later_wins_and_quoted_empty_string() -> None:
    cfg = load_config("toy", ["train.max_steps=5", "train.max_steps=7", 'data.shards=""'])
    assert cfg.train.max_steps == 7
    assert cfg.data.shards == ""


def test_override_whole_section_merges() -> None:
    cfg = load_config("toy", ["method.t_min=30", "method={alpha: 1.2, t_init: 500}"])
    assert (cfg.method.alpha, cfg.method.t_init, cfg.method.t_min) == (1.2, 500, 30)


def test_override_needs_key_value() -> None:
    expected = "--set 'train.max_steps': expected KEY=VALUE, e.g. train.max_steps=100"
    assert load_error("train.max_steps") == expected


def test_override_into_a_value_is_rejected() -> None:
    assert "'method.alpha' is a value, not a section" in load_error("method.alpha.x=1")


# ---------------------------------------------------------------------------- unknown keys, types


def test_unknown_override_key_suggests_closest() -> None:
    msg = load_error("method.t_mni=30")
    assert msg.startswith("--set method.t_mni=30: unknown key 'method.t_mni'; did you mean 'method.t_min'?")
    assert "Keys under 'method': name, cfg_train_fake, cfg_eval_fake, cfg_eval_real, alpha, t_init" in msg


def test_unknown_top_level_key_lists_sections() -> None:
    msg = load_error("trian.max_steps=3")
    assert "unknown key 'trian'; did you mean 'train'?" in msg
    assert "Keys at the top level: resume, teacher, schedule, method, generator, fake, train, data" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=1.5", "train.max_steps = 1.5: expected an int, got float"),
        ("train.max_steps=true", "train.max_steps = True: expected an int, got bool"),
        ("resume=1", "resume = 1: expected a bool (true/false), got int"),
        ("resume=yes please", "resume = 'yes please': expected a bool (true/false), got str"),
        ("method.alpha=abc", "method.alpha = 'abc': expected a float, got str"),
        ("method.alpha=.inf", "method.alpha = inf: expected a finite float"),
        ("generator.betas=0.9", "generator.betas = 0.9: expected a list (tuple[float, float]), got float"),
        ("generator.betas=[0.9]", "generator.betas = [0.9]: expected 2 items, got 1"),
        ("generator.betas=[0.9, x]", "generator.betas[1] = 'x': expected a float, got str"),
        ("preview.prompts=[a, 3]", "preview.prompts[1] = 3: expected a string, got int"),
        ("method=3", "method = 3: expected a mapping of MethodConfig keys, got int"),
    ],
)
def test_wrong_types(override: str, expected: str) -> None:
    assert load_error(override) == f"--set {override}: {expected}"


# ---------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method.t_min=980", "method.t_min = 980: expected a value below method.t_max=980"),
        ("method.t_min=-1", "method.t_min = -1: expected a timestep in [0, 1000)"),
        ("method.t_max=1001", "method.t_max = 1001: expected an exclusive bound in (0, 1000]"),
        ("method.t_init=1000", "method.t_init = 1000: expected a timestep in [0, 1000)"),
        ("method.t_init=-5", "method.t_init = -5: expected a timestep in [0, 1000)"),
        ("method.cfg_eval_real=-2", "method.cfg_eval_real = -2.0: expected a value >= 0"),
        ("method.alpha=-1", "method.alpha = -1.0: expected a value >= 0"),
        ("method.fake_loss_scale=-1", "method.fake_loss_scale = -1.0: expected a value >= 0"),
        ("method.gen_loss_scale=-1", "method.gen_loss_scale = -1.0: expected a value >= 0"),
        ("method.prompt_dropout=1.0", "method.prompt_dropout = 1.0: expected a value in [0, 1)"),
        ("method.prompt_dropout=-0.1", "method.prompt_dropout = -0.1: expected a value in [0, 1)"),
        ("method.name=dmd", "method.name = 'dmd': expected one of sid_lsg"),
        ("generator.lr=-1e-4", "generator.lr = -0.0001: expected a value >= 0"),
        ("fake.lr=-1", "fake.lr = -1.0: expected a value >= 0"),
        ("fake.betas=[0.9, 1.0]", "fake.betas[1] = 1.0: expected a value in [0, 1)"),
        ("generator.betas=[-0.1, 0.9]", "generator.betas[0] = -0.1: expected a value in [0, 1)"),
        ("generator.eps=0", "generator.eps = 0.0: expected a positive value, or null (1e-8; 1e-6 when "
                            "train.precision = fp16, 1e-4 when pure_bf16)"),
        ("fake.grad_clip_value=-1", "fake.grad_clip_value = -1.0: expected a value >= 0 (0 = off), or null "
                                    "(1.0 when train.precision = fp16 or pure_bf16, else off)"),
        ("teacher.kind=sana", "teacher.kind = 'sana': expected one of toy, sd, sdxl, sd3, toy_flow, flux"),
        ("teacher.dtype=fp8", "teacher.dtype = 'fp8': expected one of fp32, bf16, fp16"),
        ("teacher.prediction_type=x0",
         "teacher.prediction_type = 'x0': expected one of auto, epsilon, v_prediction"),
        ("schedule.beta_schedule=cosine",
         "schedule.beta_schedule = 'cosine': expected one of scaled_linear, linear"),
        ("schedule.beta_end=0.0001",
         "schedule.beta_end = 0.0001: expected a value in (beta_start=0.00085, 1)"),
        ("train.precision=fp64", "train.precision = 'fp64': expected one of fp32, bf16, fp16, pure_bf16"),
        ("train.global_batch=36", "train.global_batch = 36: expected a multiple of train.micro_batch=8"),
        ("train.global_batch=0", "train.global_batch = 0: expected a positive value"),
        ("train.micro_batch=0", "train.micro_batch = 0: expected a positive value"),
        ("train.max_steps=0", "train.max_steps = 0: expected a positive value"),
        ("train.log_every=0", "train.log_every = 0: expected a positive value"),
        ("train.preview_every=-1", "train.preview_every = -1: expected a positive value"),
        ("train.ckpt_every=0", "train.ckpt_every = 0: expected a positive value"),
        ("train.keep_last=0", "train.keep_last = 0: expected a positive value"),
        ("train.seed=-1", "train.seed = -1: expected an int in [0, 2**32)"),
        ("preview.prompts=[]", "preview.prompts = []: expected at least one prompt"),
        ("eval.num_samples=1", "eval.num_samples = 1: expected 0 (no toy evaluation) or at least 2"),
    ],
)
def test_impossible_values(override: str, expected: str) -> None:
    msg = load_error(override)
    assert msg == f"{expected} (from {preset_path('toy')} with --set {override})"


def test_teacher_path_required_unless_toy() -> None:
    msg = load_error("teacher.kind=sd")
    assert msg.startswith("teacher.path = '': expected a local diffusers directory")
    assert "kind is 'sd'" in msg
    cfg = load_config("toy", ["teacher.kind=sd", "teacher.path=/models/sd15", "teacher.resolution=512"])
    assert cfg.teacher.path == "/models/sd15"
    assert "teacher.resolution = 500: expected a multiple of 8" in load_error(
        "teacher.kind=sd", "teacher.path=/m", "teacher.resolution=500"
    )


def test_t_max_may_equal_num_train_timesteps() -> None:
    # t_max is exclusive (t ~ UniformInt{t_min .. t_max-1}), so T itself is a valid bound.
    assert load_config("toy", ["method.t_max=1000"]).method.t_max == 1000


def test_validation_runs_after_all_overrides() -> None:
    # Moving both bounds past each other's old value must not trip the check half way.
    cfg = load_config("toy", ["method.t_min=985", "method.t_max=990"])
    assert (cfg.method.t_min, cfg.method.t_max) == (985, 990)


# ---------------------------------------------------------------------------- world size


def test_validate_with_world_size() -> None:
    cfg = load_config("toy", ["train.global_batch=32"])  # global 32, micro 8
    validate(cfg, world_size=1)
    validate(cfg, world_size=4)
    assert accumulation_steps(cfg, 1) == 4
    assert accumulation_steps(cfg, 2) == 2
    assert accumulation_steps(cfg, 4) == 1
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=3)
    msg = str(info.value)
    assert msg.startswith(
        "train.global_batch = 32 is not divisible by train.micro_batch (8) x world_size (3) = 24"
    )
    with pytest.raises(ConfigError, match=r"world_size \(8\) = 64"):
        accumulation_steps(cfg, 8)
    with pytest.raises(ConfigError, match="world_size = 0: expected a positive int"):
        validate(cfg, world_size=0)


def test_reference_recipe_batching() -> None:
    # The authors' run: 4 GPUs x micro-batch 1 x 128 accumulation rounds = 512.
    assert accumulation_steps(Config(), 4) == 128


# ---------------------------------------------------------------------------- files


def test_partial_yaml_file_takes_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "mine.yaml", "method:\n  alpha: 1.2\ntrain:\n  max_steps: 7\n")
    cfg = load_config(str(path))
    assert cfg.method.alpha == 1.2 and cfg.train.max_steps == 7
    expected = Config()
    expected.method.alpha, expected.train.max_steps = 1.2, 7
    assert cfg == expected


def test_empty_yaml_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(str(write_yaml(tmp_path / "empty.yaml", ""))) == Config()


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "lr.yaml", "generator:\n  lr: 3e-6\n")
    assert load_config(str(path)).generator.lr == 3e-6


def test_yaml_bad_key_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "train:\n  max_step: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(
        f"{path}: unknown key 'train.max_step'; did you mean 'train.max_steps'? "
        "Keys under 'train': global_batch, micro_batch, max_steps"
    )


def test_yaml_bad_type_and_bad_value_name_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "t.yaml", "train:\n  micro_batch: two\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: train.micro_batch = 'two': expected an int, got str"
    path = write_yaml(tmp_path / "v.yaml", "method:\n  t_min: 990\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"method.t_min = 990: expected a value below method.t_max=980 (from {path})"


def test_yaml_duplicate_key_and_non_mapping(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "dup.yaml", "train:\n  max_steps: 1\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'train' \(line 3\)"):
        load_config(str(path))
    path = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_config(str(path))
    path = write_yaml(tmp_path / "broken.yaml", "train: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config(str(path))


def test_unknown_preset_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tyo")
    assert str(info.value).startswith("unknown preset 'tyo'; did you mean 'toy'? Presets: ")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert str(info.value) == f"config file not found: {missing}"


# ---------------------------------------------------------------------------- round trip, dump


def test_dump_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config("toy", ["generator.lr=3e-5", "fake.betas=[0.5, 0.9]", "preview.prompts=[a, 'b: c']",
                              "data.shards=x{0..3}.tar", "resume=false", "method.cfg_eval_real=4.5"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    again = load_config(str(out))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    raw = yaml.safe_load(out.read_text())
    assert raw["fake"]["betas"] == [0.5, 0.9]  # tuples dumped as plain lists
    assert out.stat().st_mode & 0o777 == 0o644
    assert os.listdir(out.parent) == ["config.yaml"]  # no temp file left behind


def test_dump_replaces_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "config.yaml"
    dump_config(Config(), out)
    dump_config(load_config("toy"), out)
    assert load_config(str(out)) == load_config("toy")
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_dict_round_trip_and_strictness() -> None:
    cfg = load_config("toy")
    d = config_to_dict(cfg)
    assert isinstance(d["generator"]["betas"], list)
    assert config_from_dict(d) == cfg
    d["train"]["max_stpes"] = 3
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source="ckpt/client_state")
    assert str(info.value).startswith(
        "ckpt/client_state: unknown key 'train.max_stpes'; did you mean 'train.max_steps'?"
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict({"method": {"t_init": 2000}})
    assert str(info.value) == "method.t_init = 2000: expected a timestep in [0, 1000) (from <dict>)"


# ---------------------------------------------------------------------------- argparse, paths


def test_argparse_helpers() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args([])
    assert args.config == "toy" and args.set is None
    assert config_from_args(args) == load_config("toy")
    args = parser.parse_args(["--set", "train.max_steps=9", "--set", "method.alpha=1.2"])
    cfg = config_from_args(args)
    assert (cfg.train.max_steps, cfg.method.alpha) == (9, 1.2)
    # A fresh parse must not inherit the previous parse's overrides.
    assert parser.parse_args([]).set is None


def test_resolve_deepspeed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text("{}")
    cfg = load_config("toy", ["deepspeed.config=ds.json"])
    assert resolve_deepspeed_config(cfg) == tmp_path / "ds.json"
    cfg = load_config("toy", ["deepspeed.config=missing/zero9.json"])
    with pytest.raises(ConfigError) as info:
        resolve_deepspeed_config(cfg)
    assert str(info.value).startswith("deepspeed.config = 'missing/zero9.json': file not found (tried ")
    assert str(tmp_path / "missing/zero9.json") in str(info.value)

"""Typed run configuration: the schema, loading (YAML presets with ``extends:``, ``--set``), checks.

    cfg = load_config("toy", ["train.max_steps=50", "generator.betas=[0.0, 0.99]"])
    validate(cfg, world_size=8)          # the trainer adds the world-size check
    dump_config(cfg, run_dir / "config.yaml")

``schema`` holds the dataclasses (field names are an interface: other modules read them directly),
``loading`` turns presets, files and overrides into a ``Config``, ``checks`` refuses impossible
values. The names below are the package's API; import them from ``sidscale.config``.
"""

from sidscale.config.checks import (
    ATTENTION_MODES,
    accumulation_steps,
    validate,
)
from sidscale.config.loading import (
    add_config_args,
    apply_override,
    config_from_args,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_presets,
    load_config,
    preset_path,
    read_config_tree,
    resolve_deepspeed_config,
)
from sidscale.config.schema import (
    Config,
    DataConfig,
    DeepSpeedSection,
    DistConfig,
    DistilledGuidanceConfig,
    EvalConfig,
    MethodConfig,
    NetConfig,
    PreviewConfig,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
)
from sidscale.errors import ConfigError  # the config layer's error (other layers raise it too)

__all__ = [
    "ATTENTION_MODES",
    "Config", "ConfigError", "DataConfig", "DeepSpeedSection", "DistConfig", "DistilledGuidanceConfig", "EvalConfig",
    "MethodConfig", "NetConfig", "PreviewConfig", "ScheduleConfig", "TeacherConfig", "TrainConfig",
    "accumulation_steps", "add_config_args", "apply_override", "config_from_args",
    "config_from_dict", "config_to_dict", "dump_config", "list_presets", "load_config",
    "preset_path", "read_config_tree", "resolve_deepspeed_config", "validate",
]

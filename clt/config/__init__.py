"""Experiment configs: load a `get_config()` file, apply `key=value` overrides, validate into frozen dataclasses.

schema.py holds the field groups (each checked next to its fields) and `ConfigError`; load.py reads files,
presets and overrides. A phase's schedule is `clt.schedule.Schedule`, checked through the registry of kinds.
Import from here: `from clt.config import Config, ConfigError, load`.
"""

from clt.config.load import apply_overrides, build, from_dict, load, load_raw, parse_value, preset_names
from clt.config.schema import (
    ARCH_FIELDS,
    REPO_ROOT,
    BudgetConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DebugConfig,
    LogConfig,
    MeshConfig,
    Mixture,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    PhaseConfig,
    ReplayBufferConfig,
    ReplayConfig,
    UpsampleConfig,
    WandbConfig,
    check_init_from,
    check_schedule,
    config_fields,
    did_you_mean,
    normalise_mixture,
    parse_count,
)

__all__ = [
    "ARCH_FIELDS", "REPO_ROOT", "BudgetConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DebugConfig",
    "LogConfig", "MeshConfig", "Mixture", "ModelConfig", "MonitorConfig", "OptimConfig", "PhaseConfig",
    "ReplayBufferConfig", "ReplayConfig", "UpsampleConfig", "WandbConfig", "apply_overrides", "build", "check_init_from",
    "check_schedule", "config_fields", "did_you_mean", "from_dict", "load", "load_raw", "normalise_mixture",
    "parse_count", "parse_value", "preset_names",
]

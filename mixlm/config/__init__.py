"""Typed experiment configuration: the schema (mixlm.config.schema), YAML files that compose and
`section.key=value` overrides (mixlm.config.load), and the ranges and rules a config must satisfy
(mixlm.config.validate). What depends on other files (random mixtures, the prepared data's vocabulary) is
resolved by mixlm.run_config, which every entry point calls."""

from mixlm.config.load import (
    config_diff,
    config_from_dict,
    is_experiment_file,
    load_config,
    load_config_and_origin,
    load_model_config,
    load_yaml,
    parse_override,
    read_yaml_file,
    save_config,
)
from mixlm.config.schema import (
    ATTENTION_IMPLS,
    INT32_MAX,
    INT64_MAX,
    REMAT_POLICIES,
    SECTION_TYPES,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoggingConfig,
    MeshConfig,
    MixingConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    closest_keys,
)
from mixlm.config.validate import validate, validate_for_mesh
from mixlm.errors import ConfigError

__all__ = [
    "ATTENTION_IMPLS", "INT32_MAX", "INT64_MAX", "REMAT_POLICIES", "SECTION_TYPES", "CheckpointConfig",
    "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "LoggingConfig", "MeshConfig", "MixingConfig",
    "ModelConfig",
    "OptimizerConfig", "ScheduleConfig", "TrainConfig", "closest_keys", "config_diff", "config_from_dict",
    "is_experiment_file", "load_config", "load_config_and_origin", "load_model_config", "load_yaml",
    "parse_override", "read_yaml_file", "save_config", "validate", "validate_for_mesh",
]

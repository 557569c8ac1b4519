"""Pipeline configuration: strict pydantic models loaded from YAML."""

from deepspec.config.loader import CONFIG_ENV, ConfigError, apply_override, load_config, validate_config
from deepspec.config.schema import (
    CacheConfig,
    DataConfig,
    DraftConfig,
    EvalConfig,
    PipelineConfig,
    RegenConfig,
    SourceConfig,
    StorageConfig,
    TargetConfig,
    ToyTargetConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_ENV",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DraftConfig",
    "EvalConfig",
    "PipelineConfig",
    "RegenConfig",
    "SourceConfig",
    "StorageConfig",
    "TargetConfig",
    "ToyTargetConfig",
    "TrainConfig",
    "apply_override",
    "load_config",
    "validate_config",
]

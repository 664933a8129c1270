"""Typed recipes: the schema (`schema`), compression stages (`compress`), the generate recipe
(`generate`) and reading YAML with overrides (`loading`)."""

from kdistill.config.loading import (
    apply_overrides,
    data_source,
    dump_config,
    load_config,
    parse_override,
    read_tree,
    validation_error,
)
from kdistill.config.schema import (
    DEFAULT_TEACHER,
    PRETRAINED_ARCHS,
    CacheConfig,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LoggingConfig,
    ModelSpec,
    OptimizerConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TeacherTrainConfig,
    TrainConfig,
    TrainSettings,
    TransferConfig,
)
from kdistill.data.transfer import TransferSetConfig

__all__ = [
    "DEFAULT_TEACHER",
    "PRETRAINED_ARCHS",
    "CacheConfig",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LoggingConfig",
    "ModelSpec",
    "OptimizerConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TeacherTrainConfig",
    "TrainConfig",
    "TrainSettings",
    "TransferConfig",
    "TransferSetConfig",
    "apply_overrides",
    "data_source",
    "dump_config",
    "load_config",
    "parse_override",
    "read_tree",
    "validation_error",
]

"""Typed configuration: defaults -> YAML file -> ``key=value`` command-line overrides.

Part of kava's core (like ``kava.io`` and ``kava.names``, which alone it imports): ``fields``
(help text, :class:`ConfigError`, output folders, what a resume may change), ``limits`` (sanity
bounds checked before any work), ``schema`` (one dataclass a section, :class:`KavaConfig`) and
``files`` (YAML files with ``base:`` chains, overrides, conversion to each field's type). The
resolved configuration is saved as YAML beside every run.
"""

from .fields import OUTPUT_ROOT_ENV, RESUME_MAY_CHANGE, RESUME_STEP_COUNT, ConfigError, under_output_root
from .files import (
    MAX_BASE_DEPTH,
    MAX_YAML_BYTES,
    config_from_dict,
    deep_merge,
    help_lines,
    load_config,
    parse_overrides,
    read_yaml,
)
from .limits import LimitsConfig, check_limits, physical_memory_bytes, tiny_footprint_bytes
from .schema import (
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    KavaConfig,
    LatentConfig,
    LossConfig,
    ModelConfig,
    TeacherModelConfig,
    TeachersConfig,
    TinyModelConfig,
    TrainConfig,
)

__all__ = [
    "MAX_BASE_DEPTH",
    "MAX_YAML_BYTES",
    "OUTPUT_ROOT_ENV",
    "RESUME_MAY_CHANGE",
    "RESUME_STEP_COUNT",
    "ConfigError",
    "CurriculumConfig",
    "DataConfig",
    "EvalConfig",
    "KavaConfig",
    "LatentConfig",
    "LimitsConfig",
    "LossConfig",
    "ModelConfig",
    "TeacherModelConfig",
    "TeachersConfig",
    "TinyModelConfig",
    "TrainConfig",
    "check_limits",
    "config_from_dict",
    "deep_merge",
    "help_lines",
    "load_config",
    "parse_overrides",
    "physical_memory_bytes",
    "read_yaml",
    "tiny_footprint_bytes",
    "under_output_root",
]

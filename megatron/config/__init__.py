"""Typed configuration: schema, YAML loading with overrides, validation and derived values."""
from .schema import (Config, ModelConfig, ParallelConfig, TrainConfig, OptimizerConfig, DataConfig,
                     ObjectiveConfig, ReferenceConfig, CheckpointConfig, LoggingConfig, LauncherConfig, Derived)
from .load import (ConfigError, load_config, dump_config, load_dumped_config, config_to_dict,
                   config_from_dict, parse_override, read_yaml, add_set_argument)
from .derive import derive_and_validate, pad_vocab

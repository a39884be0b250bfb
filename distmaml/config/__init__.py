"""Typed configuration: the schema (one dataclass per section), loading (YAML, dotted overrides) and checks.

    config = load_config("configs/sine_maml.yaml", ["inner.steps=5", "run.dir=runs/k5"])

Nothing here knows torch.
"""

from distmaml.config.loading import (config_file, describe, flatten, from_dict, from_flat, load_config,
                                     parse_override, source_of, sourced, to_dict)
from distmaml.config.schema import (Config, DataConfig, DistConfig, DistillConfig, EngineConfig, EvalConfig,
                                    FiniteDifferenceConfig, HypercleanConfig, ImplicitConfig, InnerConfig,
                                    LoggingConfig, MamlConfig, ModelConfig, NeumannConfig, ProblemConfig, RunConfig,
                                    TaskConfig, TrainConfig, TrainingRunConfig, WeightDecayConfig)
from distmaml.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "DistConfig", "DistillConfig", "EngineConfig", "EvalConfig",
           "FiniteDifferenceConfig", "HypercleanConfig", "ImplicitConfig", "InnerConfig", "LoggingConfig", "MamlConfig",
           "ModelConfig", "NeumannConfig", "ProblemConfig", "RunConfig", "TaskConfig", "TrainConfig",
           "TrainingRunConfig", "WeightDecayConfig", "config_file", "describe", "flatten", "from_dict", "from_flat",
           "load_config", "parse_override", "source_of", "sourced", "to_dict"]

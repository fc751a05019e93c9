"""Training: config schema and checks, optax, orbax checkpoints, the loop."""

from flax_resnet.train.config import default_config
from flax_resnet.train.config_check import ConfigError, validate_config
from flax_resnet.train.loop import NonFiniteLossError, RunResult, train_and_evaluate

__all__ = ['default_config', 'ConfigError', 'validate_config',
           'NonFiniteLossError', 'RunResult', 'train_and_evaluate']

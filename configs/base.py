"""Base config: all fields and their defaults (see flax_resnet/train/config.py)."""

from flax_resnet.train.config import default_config


def get_config():
  return default_config()

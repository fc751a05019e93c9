"""Config validation: every mistake is reported with its field before compiling."""

from __future__ import annotations

import ml_collections

from flax_resnet import references
from flax_resnet.spec import ResNetSpec
from flax_resnet.train.config import default_config
from flax_resnet.zoo import get_spec

PRECISIONS = {'float32': 'float32', 'bfloat16': 'bfloat16',
              'float16': 'float16'}
CHOICES = {
    'optimizer': ('sgd', 'adamw', 'lars'),
    'schedule': ('cosine', 'piecewise', 'constant'),
    'lr_scaling': ('linear', 'none'),
    'weight_decay_mask': ('kernels', 'all'),
    'warmup_mode': ('linear', 'constant'),
    'precision': tuple(PRECISIONS),
    'augment': ('imagenet', 'cifar', 'none'),
    'progress_bar': ('auto', 'on', 'off'),
}


class ConfigError(ValueError):
  """A config field is wrong; the message names it and the fix."""


def _fail(field: str, message: str):
  raise ConfigError(f'config.{field}: {message}')


def _check_known_keys(config: ml_collections.ConfigDict):
  known = set(default_config().keys())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    _fail(unknown[0], f'unknown field(s) {unknown}; configs are locked to '
          f'the schema in flax_resnet/train/config.py. Did you misspell one of '
          f'{sorted(known)}?')


def _positive(config, field, kind=int, allow_zero=False):
  value = config[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    ok = ok and float(value).is_integer()
  if not ok or value < 0 or (value == 0 and not allow_zero):
    need = 'a non-negative' if allow_zero else 'a positive'
    _fail(field, f'must be {need} {kind.__name__}; got {value!r}.')


def model_spec(config: ml_collections.ConfigDict) -> ResNetSpec:
  """The ResNetSpec this config trains (preset + overrides + precision)."""
  overrides = {k: v for k, v in config.model_overrides.items()
               if v is not None}
  for field in ('num_classes', 'dtype'):
    if field in overrides:
      _fail(f'model_overrides.{field}',
            f'set config.{"num_classes" if field == "num_classes" else "precision"}'
            ' instead; the training config owns this field.')
  overrides['num_classes'] = config.num_classes
  overrides['dtype'] = PRECISIONS.get(config.precision, 'float32')
  try:
    return get_spec(config.model, **overrides)
  except ValueError as e:
    field = 'model' if 'preset' in str(e) else 'model_overrides'
    _fail(field, str(e))


def reference_name(config: ml_collections.ConfigDict, spec: ResNetSpec):
  if config.reference == 'default':
    return spec.reference
  return config.reference


def validate_config(config: ml_collections.ConfigDict, *, device_count: int = 1,
                    process_count: int = 1) -> ResNetSpec:
  """Checks every field; returns the model spec. Raises ConfigError."""
  _check_known_keys(config)
  for field, valid in CHOICES.items():
    if config[field] not in valid:
      _fail(field, f'{config[field]!r} is not valid; choose one of '
            f'{", ".join(repr(v) for v in valid)}.')
  for field in ('batch_size', 'eval_batch_size', 'num_classes', 'image_size',
                'checkpoint_every_steps', 'keep_checkpoints', 'log_every_steps',
                'base_batch_size', 'synthetic_num_examples'):
    _positive(config, field)
  _positive(config, 'worker_count', allow_zero=True)
  _positive(config, 'prefetch_batches', allow_zero=True)
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % device_count:
      _fail(field, f'{config[field]} is not divisible by the {device_count} '
            f'devices; use a multiple of {device_count}, e.g. '
            f'{max(device_count, config[field] // device_count * device_count)}.')
    if config[field] % process_count:
      _fail(field, f'{config[field]} is not divisible by the {process_count} '
            'processes; each process loads batch_size / process_count.')
  if config.num_train_steps <= 0 and not config.num_epochs > 0:
    _fail('num_epochs', f'must be > 0 (got {config.num_epochs}) unless '
          'num_train_steps > 0.')
  if not config.learning_rate > 0:
    _fail('learning_rate', f'must be > 0; got {config.learning_rate}.')
  if not 0 <= config.momentum < 1:
    _fail('momentum', f'must be in [0, 1); got {config.momentum}.')
  if config.weight_decay < 0:
    _fail('weight_decay', f'must be >= 0; got {config.weight_decay}.')
  if not 0 <= config.label_smoothing < 1:
    _fail('label_smoothing', f'must be in [0, 1); got {config.label_smoothing}.')
  if config.grad_clip_norm < 0:
    _fail('grad_clip_norm', 'must be >= 0 (0 disables clipping).')
  if not 0 < config.eval_crop_ratio <= 1:
    _fail('eval_crop_ratio', f'must be in (0, 1]; got {config.eval_crop_ratio}.')
  if config.schedule == 'piecewise':
    if bool(config.boundaries_steps) == bool(config.boundaries_epochs):
      _fail('boundaries_steps', "schedule='piecewise' needs exactly one of "
            'boundaries_steps or boundaries_epochs.')
    field = 'boundaries_steps' if config.boundaries_steps else 'boundaries_epochs'
    bounds = list(config[field])
    if any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
      _fail(field, f'{tuple(bounds)} must be positive and strictly '
            'increasing, e.g. (32000, 48000).')
  if not 0 < config.decay_factor <= 1:
    _fail('decay_factor', f'must be in (0, 1]; got {config.decay_factor}.')
  if len(config.mean_rgb) != 3 or len(config.std_rgb) != 3 or any(
      s <= 0 for s in config.std_rgb):
    _fail('mean_rgb', 'mean_rgb and std_rgb need 3 values each, std > 0.')
  spec = model_spec(config)
  ref = reference_name(config, spec)
  if ref is not None and ref not in references.NAMES:
    _fail('reference', f'{ref!r} is not a known reference; choose one of '
          f'{", ".join(references.NAMES)}, \'default\', or None.')
  return spec

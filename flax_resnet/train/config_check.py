"""Config validation: every mistake is reported with its field before compiling."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Optional

import ml_collections
import numpy as np

from flax_resnet import references
from flax_resnet.spec import ResNetSpec
from flax_resnet.train import config as config_lib
from flax_resnet.train.config import default_config
from flax_resnet.zoo import get_spec

PRECISIONS = {'float32': 'float32', 'bfloat16': 'bfloat16',
              'float16': 'float16'}
# Kept for callers that list the choices; the schema in config.py owns them.
CHOICES = {f.name: f.choices for f in config_lib.FIELDS if f.choices}
# Float fields become float32 in the computation (schedules, optimizer,
# normalisation): beyond these magnitudes they turn into inf or 0 there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


class ConfigError(ValueError):
  """A config field is wrong; the message names it and the fix."""


def _fail(field: str, message: str):
  raise ConfigError(f'config.{field}: {message}')


def _check_known_keys(config: ml_collections.ConfigDict):
  known = set(default_config().keys())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    _fail(unknown[0], f'unknown field(s) {unknown}; configs are locked to '
          f'the schema in flax_resnet/train/config.py. {suggest(unknown[0])}'
          f'Did you misspell one of {sorted(known)}?')


def suggest(name: str) -> str:
  """'Did you mean "batch_size"? ' for a misspelt field, or ''."""
  known = [f.name for f in config_lib.FIELDS] + [
      f'model_overrides.{k}' for k in config_lib._SPEC_OVERRIDES]  # pylint: disable=protected-access
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  return f'Did you mean "{close[0]}"? ' if close else ''


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_range(field: config_lib.Field, value) -> bool:
  low, high, brackets = field.range
  if low is not None and (value < low if brackets[0] == '[' else value <= low):
    return False
  if high is not None and (value > high if brackets[1] == ']'
                           else value >= high):
    return False
  return True


def _number_problem(field: config_lib.Field, value, integer: bool):
  """Why `value` is not a valid number for `field`, or None."""
  if isinstance(value, str):
    text = value.strip().lower()
    if any(word in text for word in ('nan', 'inf')):
      return (f'{value!r} is text, not a number: NaN and infinity are not '
              'allowed (on the command line, nan/inf also stop a tuple from '
              'parsing).')
    return f'{value!r} is text, not a number.'
  if not _is_number(value):
    return f'{value!r} is a {type(value).__name__}, not a number.'
  if not math.isfinite(value):
    return f'{value!r} is not finite; give a finite number.'
  if integer and not float(value).is_integer():
    return f'{value!r} is not an integer.'
  if field.range is not None and not _in_range(field, value):
    return f'{value!r} is out of range: it must be {field.describe_range()}.'
  if not integer and abs(value) > FLOAT32_MAX:
    return (f'{value!r} overflows float32, which the run computes in '
            f'(largest {FLOAT32_MAX:.4g}).')
  if not integer and 0 < abs(value) < FLOAT32_TINY:
    return (f'{value!r} is below the smallest normal float32 '
            f'({FLOAT32_TINY:.4g}), which XLA flushes to 0; give 0 or a '
            'larger value.')
  return None


def _check_field(config, field: config_lib.Field):
  value = config[field.name]
  if value is None:
    if not field.nullable:
      _fail(field.name, f'is None; it must be set ({field.meaning}).')
    return
  if field.name == 'reference' and isinstance(value, str) and (
      value.lower() == 'none'):
    return
  if field.kind == config_lib.STR:
    if field.choices and (not isinstance(value, str) or
                          value not in field.choices):
      _fail(field.name, f'{value!r} is not valid; choose one of '
            f'{", ".join(repr(v) for v in field.choices)}.')
    if not isinstance(value, str):
      _fail(field.name, f'{value!r} must be a string ({field.meaning}).')
    return
  if field.kind == config_lib.BOOL:
    if not isinstance(value, bool):
      _fail(field.name, f'{value!r} must be True or False.')
    return
  if field.kind in (config_lib.INT, config_lib.FLOAT):
    if _is_number(value) and value in field.special:
      return
    problem = _number_problem(field, value, field.kind == config_lib.INT)
    if problem:
      special = ''.join(f' ({v} means {w})' for v, w in field.special.items())
      _fail(field.name, f'{problem} Give {field.kind} '
            f'{field.describe_range()}{special}: {field.meaning}.')
    return
  # NUMBERS: a tuple of numbers.
  if isinstance(value, str) or not isinstance(value, (tuple, list)):
    _fail(field.name, f'{value!r} must be a tuple of numbers, e.g. '
          f'{tuple(field.default) or (32000, 48000)}.')
  items = list(value)
  if field.length is not None and len(items) != field.length:
    hint = ''
    if len(items) == 1 and isinstance(items[0], str):
      hint = (' The command line could not parse the tuple (nan/inf are not '
              'Python literals, and are not allowed here).')
    _fail(field.name, f'{tuple(items)!r} has {len(items)} value(s); give '
          f'{field.length}, one per channel.{hint}')
  for i, item in enumerate(items):
    problem = _number_problem(field, item, field.integers)
    if problem:
      _fail(field.name, f'item {i}: {problem} ({field.meaning})')


def check_schema(config: ml_collections.ConfigDict):
  """Type, range and finiteness of every field (config.FIELDS)."""
  _check_known_keys(config)
  for field in config_lib.FIELDS:
    _check_field(config, field)


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
  """The reference to check against, or None ('none' in any case skips)."""
  ref = config.reference
  if ref == 'default':
    return spec.reference
  if isinstance(ref, str) and ref.lower() == 'none':
    return None
  return ref


def init_from(config) -> Optional[str]:
  """config.init_from, or None for no initial weights.

  'None' in any case means None too: absl hands --config.init_from=None over
  as that string, and no weights file or tag is called so.
  """
  value = config.init_from
  if value is None or value.strip().lower() == 'none':
    return None
  return value


def validate_config(config: ml_collections.ConfigDict, *, device_count: int = 1,
                    process_count: int = 1) -> ResNetSpec:
  """Checks every field, then the rules between fields; returns the spec.

  Raises ConfigError naming the field and the fix. Nothing here compiles.
  """
  check_schema(config)
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % device_count:
      _fail(field, f'{config[field]} is not divisible by the {device_count} '
            f'devices; use a multiple of {device_count}, e.g. '
            f'{max(device_count, config[field] // device_count * device_count)}.')
    if config[field] % process_count:
      _fail(field, f'{config[field]} is not divisible by the {process_count} '
            'processes; each process loads batch_size / process_count.')
  if (config.num_train_steps == config_lib.FROM_EPOCHS and
      not config.num_epochs > 0):
    _fail('num_epochs', f'must be > 0 (got {config.num_epochs}) unless '
          'num_train_steps > 0.')
  peak = config.learning_rate * (
      config.batch_size / config.base_batch_size
      if config.lr_scaling == 'linear' else 1)
  if peak > FLOAT32_MAX:
    _fail('learning_rate', f'{config.learning_rate} x batch_size '
          f'{config.batch_size} / base_batch_size {config.base_batch_size} '
          f'(lr_scaling=linear) = {peak:.4g} overflows float32; lower '
          'learning_rate or set lr_scaling=none.')
  pixel_bound = max(max(abs(m), abs(255 - m)) / s for m, s in zip(
      config.mean_rgb, config.std_rgb))
  if pixel_bound > FLOAT32_MAX:
    _fail('std_rgb', f'{tuple(config.std_rgb)} with mean_rgb '
          f'{tuple(config.mean_rgb)}: normalised pixels (0..255 - mean) / std '
          'overflow float32; use values on the 0..255 scale, e.g. the '
          'defaults.')
  if config.warmup_init_lr > peak:
    _fail('warmup_init_lr', f'{config.warmup_init_lr} is above the peak '
          f'learning rate {peak:.4g} it warms up to; use a value in '
          f'[0, {peak:.4g}].')
  if config.schedule == 'piecewise':
    if bool(config.boundaries_steps) == bool(config.boundaries_epochs):
      _fail('boundaries_steps', "schedule='piecewise' needs exactly one of "
            'boundaries_steps or boundaries_epochs.')
    field = 'boundaries_steps' if config.boundaries_steps else 'boundaries_epochs'
    bounds = list(config[field])
    if any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
      _fail(field, f'{tuple(bounds)} must be positive and strictly '
            'increasing, e.g. (32000, 48000).')
  else:
    for field in ('boundaries_steps', 'boundaries_epochs'):
      if config[field]:
        _fail(field, f'{tuple(config[field])} would be ignored: boundaries '
              f"apply only to schedule='piecewise' (schedule is "
              f"{config.schedule!r}). Set schedule='piecewise' or remove them.")
  if isinstance(config.init_from, str) and not config.init_from.strip():
    _fail('init_from', f'{config.init_from!r} is empty (an unset shell '
          'variable?); give the weights to start from (a torchvision '
          '.pth/.safetensors file, a training workdir, a URL or a registry '
          'tag), or leave the field out to start from random weights.')
  if config.init_from_skip_head and init_from(config) is None:
    _fail('init_from_skip_head', 'is True but config.init_from is not set, so '
          'it would be ignored; set init_from to the weights to load.')
  if not config.init_from_check_preprocessing and init_from(config) is None:
    _fail('init_from_check_preprocessing', 'is False but config.init_from is '
          'not set, so it would be ignored; set init_from to the weights to '
          'load, or leave the field out.')
  spec = model_spec(config)
  ref = reference_name(config, spec)
  if ref is not None and ref not in references.NAMES:
    _fail('reference', f'{ref!r} is not a known reference; choose one of '
          f'{", ".join(references.NAMES)}, \'default\', or None.')
  return spec

"""The training config schema: every field a run can set, its default, meaning and rule.

configs/base.py returns `default_config()`; every other config starts from it.
The result is locked, so a misspelt override (`--config.batch_sise=...`) fails
instead of being silently ignored. Only `model_overrides` stays open: its keys
are ResNetSpec fields, checked against the spec before anything compiles.

`FIELDS` is the one schema: `default_config()` is built from it,
`config_check.validate_config` checks every field against it (type, range,
finiteness) before the cross-field rules, and `python train.py --help` prints
it (`schema_help()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections
from ml_collections.config_dict import placeholder

# ResNetSpec fields a run may override (num_classes and dtype come from
# config.num_classes and config.precision; reference from config.reference).
_SPEC_OVERRIDES = {
    'block': str, 'depths': tuple, 'widths': tuple, 'strides': tuple,
    'groups': int, 'width_per_group': int, 'stem': str, 'stem_width': int,
    'shortcut': str, 'stride_in': str, 'preact': bool, 'zero_pad': str,
    'zero_init_last_bn': bool, 'bn_momentum': float, 'bn_eps': float,
    'padding': str, 'param_dtype': str,
}

# Named values of the "unset: derive it" fields. They keep the historical -1
# so that every existing config and command line still means the same thing;
# any other negative number is refused with a message that names these.
EVERY_EPOCH = -1  # eval_every_steps: evaluate once per epoch
FROM_EPOCHS = -1  # num_train_steps: train num_epochs epochs
FROM_WARMUP_EPOCHS = -1  # warmup_steps: warm up for warmup_epochs epochs

INT, FLOAT, STR, BOOL, NUMBERS = 'int', 'float', 'str', 'bool', 'numbers'

# Upper bounds of fields whose derived quantities would otherwise overflow.
# optax counts steps in int32, so no step count (num_train_steps, warmup and
# schedule boundaries, also when derived from epochs) may exceed it; an epoch
# is at least one step, so neither may an epoch count.
MAX_STEPS = 2**31 - 1
# PIL refuses images past 2 x Image.MAX_IMAGE_PIXELS (179 M pixels, 13377^2)
# as decompression bombs, and one float32 image of 8192^2 is already 805 MB:
# far past any ResNet input (224 to 600 px).
MAX_IMAGE_SIZE = 8192


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, what it means, and what it accepts.

  range: (low, high, brackets) with brackets one of '[]', '[)', '(]', '()';
    None bounds are open-ended. Numbers must also be finite.
  special: values outside `range` that carry a meaning, e.g. {-1: '...'}.
  """
  name: str
  default: Any
  kind: str
  meaning: str
  choices: tuple = ()
  range: Optional[tuple] = None
  nullable: bool = False
  special: dict = dataclasses.field(default_factory=dict)
  length: Optional[int] = None  # for NUMBERS: exact tuple length
  integers: bool = False  # for NUMBERS: every item an integer

  def describe_range(self) -> str:
    if self.range is None:
      return ''
    low, high, brackets = self.range
    if high is None:
      return f'>= {low}' if brackets[0] == '[' else f'> {low}'
    if low is None:
      return f'<= {high}' if brackets[1] == ']' else f'< {high}'
    return f'in {brackets[0]}{low}, {high}{brackets[1]}'


_RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_AT_LEAST_1 = (1, None, '[]')
_AT_LEAST_0 = (0, None, '[]')
_POSITIVE = (0, None, '()')
_UNIT = (0, 1, '[)')
_STEP_COUNT = (0, MAX_STEPS, '[]')

FIELDS: tuple[Field, ...] = (
    # Model.
    Field('model', 'resnet50', STR,
          'a preset of flax_resnet.list_models()'),
    Field('reference', 'default', STR,
          "layout reference checked before training: 'default' (the preset's "
          "own), a name in flax_resnet.references.NAMES, or None (any case) "
          'to skip the check', nullable=True),
    Field('reference_model', None, STR,
          'entry of the reference table to compare with (default: model)',
          nullable=True),
    # Data.
    Field('dataset', 'imagenet2012', STR,
          "any TFDS image-classification dataset, 'folder:ROOT' (your "
          "images, ROOT/train/CLASS/*.jpg), 'sklearn_digits' or 'synthetic'"),
    Field('data_dir', None, STR, 'TFDS data folder (None: TFDS default)',
          nullable=True),
    Field('train_split', 'train', STR, 'TFDS split to train on'),
    Field('eval_split', 'validation', STR, 'TFDS split to evaluate on'),
    Field('num_classes', 1000, INT, 'classifier outputs; must match the '
          'dataset', range=_AT_LEAST_1),
    Field('image_size', 224, INT, 'training crop height and width',
          range=(1, MAX_IMAGE_SIZE, '[]')),
    Field('augment', 'imagenet', STR,
          "'imagenet' (random-resized crop + flip), 'cifar' (pad 4 + crop + "
          "flip), 'none' (resize only)", choices=('imagenet', 'cifar', 'none')),
    Field('eval_crop_ratio', 0.875, FLOAT, 'center-crop fraction at eval',
          range=(0, 1, '(]')),
    Field('mean_rgb', _RGB_MEAN, NUMBERS, 'per-channel mean subtracted '
          '(0..255 scale)', length=3),
    Field('std_rgb', _RGB_STD, NUMBERS, 'per-channel std divided by '
          '(0..255 scale), each > 0', length=3, range=_POSITIVE),
    Field('channel_order', 'RGB', STR, "channel order the model sees: 'BGR' "
          "reverses the decoded RGB image (Keras ResNet50 'caffe' weights); "
          'mean_rgb and std_rgb stay in R, G, B order',
          choices=('RGB', 'BGR')),
    Field('worker_count', None, INT, 'grain worker processes (0: in-process; '
          'None: chosen from the CPUs and the split size)', range=_AT_LEAST_0,
          nullable=True),
    Field('prefetch_batches', 2, INT, 'batches kept on the devices ahead',
          range=_AT_LEAST_0),
    Field('synthetic_num_examples', 1024, INT, "size of dataset='synthetic'",
          range=_AT_LEAST_1),
    # Optimisation.
    Field('batch_size', 256, INT, 'global batch, across all devices and '
          'hosts', range=_AT_LEAST_1),
    Field('eval_batch_size', 256, INT, 'global eval batch',
          range=_AT_LEAST_1),
    Field('num_epochs', 90.0, FLOAT, 'epochs to train (unless '
          'num_train_steps is set; then ignored)', range=_STEP_COUNT),
    Field('num_train_steps', FROM_EPOCHS, INT, 'steps to train',
          range=(1, MAX_STEPS, '[]'),
          special={FROM_EPOCHS: 'FROM_EPOCHS: num_epochs decides'}),
    Field('optimizer', 'sgd', STR, 'the optax optimizer',
          choices=('sgd', 'adamw', 'lars')),
    Field('momentum', 0.9, FLOAT, 'SGD/LARS momentum', range=_UNIT),
    Field('nesterov', True, BOOL, 'Nesterov momentum (SGD/LARS)'),
    Field('learning_rate', 0.1, FLOAT, 'peak learning rate at '
          'base_batch_size', range=_POSITIVE),
    Field('lr_scaling', 'linear', STR, "'linear': lr * batch_size / "
          "base_batch_size (Goyal et al.); 'none'",
          choices=('linear', 'none')),
    Field('base_batch_size', 256, INT, 'batch size learning_rate refers to',
          range=_AT_LEAST_1),
    Field('schedule', 'cosine', STR, 'decay after warmup',
          choices=('cosine', 'piecewise', 'constant')),
    Field('warmup_epochs', 5.0, FLOAT, 'warmup length in epochs (unless '
          'warmup_steps is set)', range=_STEP_COUNT),
    Field('warmup_steps', FROM_WARMUP_EPOCHS, INT, 'warmup length in steps',
          range=_STEP_COUNT,
          special={FROM_WARMUP_EPOCHS: 'FROM_WARMUP_EPOCHS: warmup_epochs '
                   'decides'}),
    Field('warmup_init_lr', 0.0, FLOAT, 'learning rate at step 0 of the '
          'warmup (at most the peak)', range=_AT_LEAST_0),
    Field('warmup_mode', 'linear', STR, "'linear' ramp, or 'constant' at "
          'warmup_init_lr', choices=('linear', 'constant')),
    Field('boundaries_steps', (), NUMBERS, "schedule='piecewise': steps "
          'where lr is multiplied by decay_factor', range=(0, MAX_STEPS, '(]'),
          integers=True),
    Field('boundaries_epochs', (), NUMBERS, "schedule='piecewise': the same "
          'in epochs', range=(0, MAX_STEPS, '(]')),
    Field('decay_factor', 0.1, FLOAT, 'piecewise decay factor',
          range=(0, 1, '(]')),
    Field('weight_decay', 1e-4, FLOAT, 'L2 / decoupled weight decay (0: off)',
          range=_AT_LEAST_0),
    Field('weight_decay_mask', 'kernels', STR, "'kernels' (conv/dense "
          "kernels) or 'all'", choices=('kernels', 'all')),
    Field('label_smoothing', 0.0, FLOAT, 'label smoothing', range=_UNIT),
    Field('grad_clip_norm', 0.0, FLOAT, 'global-norm gradient clipping '
          '(0: off)', range=_AT_LEAST_0),
    Field('adam_b1', 0.9, FLOAT, 'AdamW beta1', range=_UNIT),
    Field('adam_b2', 0.999, FLOAT, 'AdamW beta2', range=_UNIT),
    Field('lars_trust_coefficient', 0.001, FLOAT, 'LARS trust coefficient',
          range=_POSITIVE),
    Field('precision', 'float32', STR, "'float32', 'bfloat16' (f32 params + "
          "BN stats), 'float16' (with dynamic loss scaling)",
          choices=('float32', 'bfloat16', 'float16')),
    # Checkpoints (orbax) and resumption.
    Field('checkpoint_every_steps', 1000, INT, 'save every N steps',
          range=_AT_LEAST_1),
    Field('keep_checkpoints', 3, INT, 'newest checkpoints kept',
          range=_AT_LEAST_1),
    Field('keep_best', True, BOOL, 'also keep the best checkpoint by eval '
          'top-1'),
    Field('init_from', None, STR, 'start from these weights: a torchvision '
          ".pth/.safetensors or a training workdir; None (any case) for none, "
          "'' is refused", nullable=True),
    Field('init_from_skip_head', False, BOOL, 'init_from: load all but the '
          'classifier'),
    Field('init_from_check_preprocessing', True, BOOL, 'init_from: refuse '
          'published weights (a registry tag) or a workdir whose input '
          'normalisation (mean_rgb, std_rgb, channel_order) differs from this '
          "config's; False keeps yours"),
    # Evaluation and logging.
    Field('eval_every_steps', EVERY_EPOCH, INT, 'evaluate every N steps',
          range=_AT_LEAST_1,
          special={EVERY_EPOCH: 'EVERY_EPOCH: once per epoch'}),
    Field('log_every_steps', 100, INT, 'log train metrics every N steps',
          range=_AT_LEAST_1),
    Field('seed', 0, INT, 'seed of init, data order and augmentation',
          range=(0, 2**32, '[)')),
    Field('compilation_cache_dir', '~/.cache/flax_resnet/jax', STR,
          "persistent XLA compilation cache ('': off)"),
    Field('progress_bar', 'auto', STR, "'auto' (a terminal), 'on', 'off'",
          choices=('auto', 'on', 'off')),
    Field('halt_on_nonfinite', True, BOOL, 'stop on NaN/Inf loss (the last '
          'good checkpoint stays)'),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for field in FIELDS:
    if field.nullable and field.default is None:
      c[field.name] = ml_collections.FieldReference(
          None, field_type={STR: str, INT: int, FLOAT: float}[field.kind])
    else:
      c[field.name] = field.default
  # Every ResNetSpec field can be overridden, on the command line too
  # (--config.model_overrides.shortcut=B); None keeps the preset's value.
  c.model_overrides = ml_collections.ConfigDict(
      {name: placeholder(kind) for name, kind in _SPEC_OVERRIDES.items()})
  c.lock()
  c.model_overrides.unlock()
  return c


def _rule(field: Field) -> str:
  parts = []
  if field.choices:
    parts.append('one of ' + ', '.join(repr(c) for c in field.choices))
  elif field.kind == NUMBERS:
    what = 'integers' if field.integers else 'numbers'
    count = f'{field.length} ' if field.length else ''
    parts.append(f'tuple of {count}{what} {field.describe_range()}'.strip())
  elif field.kind in (INT, FLOAT):
    parts.append(f'{field.kind} {field.describe_range()}'.strip())
  else:
    parts.append(field.kind)
  for value, words in field.special.items():
    parts.append(f'or {value} ({words})')
  if field.nullable:
    parts.append('or None')
  return ' '.join(parts)


def schema_help(config: Optional[ml_collections.ConfigDict] = None,
                source: str = '') -> str:
  """Every field: name, value, rule and meaning (for train.py --help).

  The value is `config`'s (loaded from the file `source`, with the command
  line's overrides: what a run would use), else the schema default.
  """
  lines = [f'Config fields as a run with {source} sets them '
           '(change one with --config.FIELD=VALUE):' if config is not None
           else 'Config fields and their defaults (--config.FIELD=VALUE):']
  for field in FIELDS:
    value = field.default if config is None else config[field.name]
    lines.append(f'  {field.name} = {value!r}')
    lines.append(f'      {field.meaning}; {_rule(field)}.')
  overrides = {} if config is None else config.model_overrides
  lines.extend(f'  model_overrides.{name} = {value!r}'
               for name, value in overrides.items() if value is not None)
  lines.append('  model_overrides.FIELD = None')
  lines.append('      any ResNetSpec field (' + ', '.join(_SPEC_OVERRIDES) +
               '); None keeps the preset\'s value.')
  return '\n'.join(lines)

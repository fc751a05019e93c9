"""Hostile config values: every field is checked against one schema, first.

`flax_resnet.train.config.FIELDS` is the schema; these tests throw values at
it the way a hostile user would (NaN, infinities, bools for numbers, strings,
out-of-range, nonsense combinations) and check that each is refused with a
ConfigError that names the field, before anything compiles. Hypothesis
generates the values; the table below holds the cases issue 12 found.
"""

import math
import pathlib
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from flax_resnet.train import config as config_lib
from flax_resnet.train import config_check

REPO = pathlib.Path(__file__).resolve().parent.parent
FAST = settings(max_examples=40, deadline=None)


class AttrDict(dict):
  """A config as a plain mapping with attribute access, for validate_config."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def fault_config(**fields):
  sys.path.insert(0, str(REPO / 'tests'))
  try:
    import fault_config as module  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  # Values of any type, exactly as given: ConfigDict would cast some
  # (True -> 1.0 for a float field), hiding what the schema must catch.
  config = AttrDict(module.get_config().to_dict())
  config['model_overrides'] = AttrDict(config['model_overrides'])
  for key, value in fields.items():
    config[key] = value
  return config


def refused(fields, field_name):
  """The ConfigError message for `fields`; it must name `field_name`."""
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_config(fault_config(**fields))
  message = str(e.value)
  assert message.startswith(f'config.{field_name}:'), message
  assert '\n' not in message.split(':', 1)[0]
  return message


# --------------------------------------------- the cases issue 12 reported

ISSUE_CASES = {
    # name: (fields, field blamed, words the message must hold)
    'weight_decay_nan': ({'weight_decay': float('nan')}, 'weight_decay',
                         ['not finite']),
    'grad_clip_norm_nan': ({'grad_clip_norm': float('nan')}, 'grad_clip_norm',
                           ['not finite']),
    'warmup_init_lr_negative': ({'warmup_init_lr': -5.0}, 'warmup_init_lr',
                                ['>= 0']),
    'warmup_init_lr_above_peak': ({'warmup_init_lr': 5.0}, 'warmup_init_lr',
                                  ['above the peak learning rate']),
    'adam_b2_above_1': ({'adam_b2': 1.5}, 'adam_b2', ['in [0, 1)']),
    'lars_trust_coefficient_negative': ({'lars_trust_coefficient': -1.0},
                                        'lars_trust_coefficient', ['> 0']),
    'std_rgb_infinite': ({'std_rgb': (float('inf'), 1.0, 1.0)}, 'std_rgb',
                         ['item 0', 'not finite']),
    'eval_every_steps_minus_7': ({'eval_every_steps': -7}, 'eval_every_steps',
                                 ['-1 means EVERY_EPOCH']),
    'num_train_steps_zero': ({'num_train_steps': 0}, 'num_train_steps',
                             ['-1 means FROM_EPOCHS']),
    'tuple_with_nan_as_one_string': ({'std_rgb': ('(nan,1,2)',)}, 'std_rgb',
                                     ['could not parse the tuple']),
    'mean_rgb_string_blames_mean_rgb': ({'mean_rgb': ('(1,nan,2)',)},
                                        'mean_rgb', ['could not parse']),
    'warmup_steps_minus_2': ({'warmup_steps': -2}, 'warmup_steps',
                             ['FROM_WARMUP_EPOCHS']),
    'boundaries_without_piecewise': ({'boundaries_steps': (10, 20)},
                                     'boundaries_steps', ['would be ignored']),
    'skip_head_without_init_from': ({'init_from_skip_head': True},
                                    'init_from_skip_head', ['ignored']),
    'learning_rate_inf': ({'learning_rate': float('inf')}, 'learning_rate',
                          ['not finite']),
    'momentum_bool': ({'momentum': True}, 'momentum', ['bool, not a number']),
    'batch_size_float': ({'batch_size': 32.5}, 'batch_size',
                         ['not an integer']),
    'batch_size_string': ({'batch_size': '32'}, 'batch_size', ['text']),
    'nesterov_string': ({'nesterov': 'False'}, 'nesterov', ['True or False']),
    'seed_2_to_32': ({'seed': 2**32}, 'seed', ['in [0, 4294967296)']),
    'num_classes_none': ({'num_classes': None}, 'num_classes', ['is None']),
    'optimizer_case': ({'optimizer': 'SGD'}, 'optimizer', ["'sgd'"]),
    'precision_none': ({'precision': None}, 'precision', ['is None']),
    'boundaries_epochs_nan': ({'schedule': 'piecewise',
                               'boundaries_epochs': (float('nan'),)},
                              'boundaries_epochs', ['item 0', 'not finite']),
    'boundaries_steps_fraction': ({'schedule': 'piecewise',
                                   'boundaries_steps': (10.5,)},
                                  'boundaries_steps', ['not an integer']),
    'mean_rgb_two_values': ({'mean_rgb': (1.0, 2.0)}, 'mean_rgb',
                            ['give 3']),
    'std_rgb_zero': ({'std_rgb': (0.0, 1.0, 1.0)}, 'std_rgb', ['> 0']),
    'eval_crop_ratio_zero': ({'eval_crop_ratio': 0.0}, 'eval_crop_ratio',
                             ['in (0, 1]']),
    'label_smoothing_nan': ({'label_smoothing': float('nan')},
                            'label_smoothing', ['not finite']),
    'decay_factor_minus_inf': ({'decay_factor': -float('inf')},
                               'decay_factor', ['not finite']),
    'num_epochs_nan': ({'num_epochs': float('nan')}, 'num_epochs',
                       ['not finite']),
    'num_epochs_zero_from_epochs': ({'num_train_steps': -1, 'num_epochs': 0.0},
                                    'num_epochs', ['must be > 0']),
    'keep_best_int': ({'keep_best': 1}, 'keep_best', ['True or False']),
    # Issue 20: an empty init_from was silently ignored (an unset variable).
    'init_from_empty': ({'init_from': ''}, 'init_from', ['is empty']),
    'init_from_blank': ({'init_from': '  '}, 'init_from', ['is empty']),
    'skip_head_with_init_from_none_string': (
        {'init_from': 'None', 'init_from_skip_head': True},
        'init_from_skip_head', ['ignored']),
    # Issue 20: values whose derived quantities overflow.
    'image_size_100000': ({'image_size': 100000}, 'image_size',
                          ['in [1, 8192]']),
    'num_epochs_1e308': ({'num_train_steps': -1, 'num_epochs': 1e308},
                         'num_epochs', ['in [0, 2147483647]']),
    'warmup_epochs_1e308': ({'warmup_steps': -1, 'warmup_epochs': 1e308},
                            'warmup_epochs', ['in [0, 2147483647]']),
    'num_train_steps_past_int32': ({'num_train_steps': 2**31},
                                   'num_train_steps', ['2147483647']),
    'learning_rate_past_float32': ({'learning_rate': 1e39}, 'learning_rate',
                                   ['overflows float32']),
    'weight_decay_below_float32': ({'weight_decay': 1e-40}, 'weight_decay',
                                   ['flushes to 0']),
    'scaled_learning_rate_past_float32': (
        {'learning_rate': 1e38, 'lr_scaling': 'linear', 'batch_size': 64,
         'base_batch_size': 1}, 'learning_rate', ['overflows float32']),
    'normalised_pixels_past_float32': (
        {'std_rgb': (1e-37, 1.0, 1.0), 'mean_rgb': (1e37, 0.0, 0.0)},
        'std_rgb', ['normalised pixels']),
    'reference_number': ({'reference': 3}, 'reference', ['string']),
}


@pytest.mark.parametrize('name', sorted(ISSUE_CASES))
def test_hostile_value_is_refused_naming_its_field(name):
  fields, field_name, words = ISSUE_CASES[name]
  message = refused(fields, field_name)
  for word in words:
    assert word in message, message


# ----------------------------------------- properties over the whole schema

NUMERIC = [f for f in config_lib.FIELDS
           if f.kind in (config_lib.INT, config_lib.FLOAT)]
BAD_NUMBERS = st.sampled_from([float('nan'), float('inf'), -float('inf'),
                               True, False, 'nan', '1', [], {}])


@pytest.mark.parametrize('field', NUMERIC, ids=[f.name for f in NUMERIC])
@FAST
@given(value=BAD_NUMBERS)
def test_no_numeric_field_accepts_non_numbers_or_non_finite(field, value):
  refused({field.name: value}, field.name)


def _outside(field):
  """Numbers outside the field's range (not its special values)."""
  low, high, brackets = field.range
  values = []
  if low is not None:
    values.append(st.floats(max_value=low, allow_nan=False,
                            allow_infinity=False,
                            exclude_max=brackets[0] == '['))
  if high is not None:
    values.append(st.floats(min_value=high, allow_nan=False,
                            allow_infinity=False,
                            exclude_min=brackets[1] == ']'))
  numbers = st.one_of(values)
  if field.kind == config_lib.INT:
    numbers = numbers.map(math.floor if low is not None else math.ceil).filter(
        lambda v, f=field: not config_check._in_range(f, v))  # pylint: disable=protected-access
  return numbers.filter(lambda v, f=field: v not in f.special)


RANGED = [f for f in NUMERIC if f.range is not None]


@pytest.mark.parametrize('field', RANGED, ids=[f.name for f in RANGED])
@FAST
@given(data=st.data())
def test_out_of_range_numbers_are_refused_with_the_range(field, data):
  value = data.draw(_outside(field))
  message = refused({field.name: value}, field.name)
  assert field.describe_range() in message, message


FLOATS = [f for f in config_lib.FIELDS if f.kind == config_lib.FLOAT or (
    f.kind == config_lib.NUMBERS and not f.integers)]
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize('field', FLOATS, ids=[f.name for f in FLOATS])
@FAST
@given(magnitude=st.one_of(
    st.floats(min_value=FLOAT32_MAX, exclude_min=True, allow_infinity=False),
    st.floats(min_value=0, max_value=FLOAT32_TINY, exclude_min=True,
              exclude_max=True)))
def test_no_float_field_takes_a_value_float32_turns_into_inf_or_0(field,
                                                                  magnitude):
  """The run computes in float32: 1e39 becomes inf there, 1e-40 becomes 0."""
  if field.kind == config_lib.NUMBERS:
    value = (magnitude,) * (field.length or 1)
    extra = {'schedule': 'piecewise'} if field.name.startswith(
        'boundaries') else {}
  else:
    value, extra = magnitude, {}
  refused({field.name: value, **extra}, field.name)


def _inside(field):
  low, high, brackets = field.range
  if field.kind == config_lib.INT:
    return st.integers(
        min_value=None if low is None else low + (brackets[0] == '('),
        max_value=None if high is None else high - (brackets[1] == ')'))
  # Floats the run computes with in float32: normal float32 values or 0.
  if high is not None and float(np.float32(high)) > high:
    high = float(np.nextafter(np.float32(high), np.float32(0)))
  return st.floats(min_value=low, max_value=high, allow_nan=False,
                   allow_infinity=False, width=32, allow_subnormal=False,
                   exclude_min=low is not None and brackets[0] == '(',
                   exclude_max=high is not None and brackets[1] == ')')


# Fields whose in-range values other rules may still refuse.
CROSS = {'batch_size', 'warmup_init_lr', 'learning_rate', 'base_batch_size',
         'num_epochs', 'eval_batch_size'}


@pytest.mark.parametrize('field', [f for f in RANGED if f.name not in CROSS],
                         ids=[f.name for f in RANGED if f.name not in CROSS])
@FAST
@given(data=st.data())
def test_every_in_range_value_passes_the_schema(field, data):
  value = data.draw(_inside(field))
  config_check.validate_config(fault_config(**{field.name: value}))


STRINGS = [f for f in config_lib.FIELDS if f.choices]


@pytest.mark.parametrize('field', STRINGS, ids=[f.name for f in STRINGS])
@FAST
@given(value=st.one_of(st.text(max_size=12), st.integers(), st.none()))
def test_choice_fields_take_only_their_choices(field, value):
  if value in field.choices:
    config_check.validate_config(fault_config(**{field.name: value}))
    return
  message = refused({field.name: value}, field.name)
  assert repr(field.choices[0]) in message or 'is None' in message


def test_the_schema_covers_every_config_field_and_builds_the_defaults():
  config = config_lib.default_config()
  names = [f.name for f in config_lib.FIELDS]
  assert len(names) == len(set(names))
  assert set(config.keys()) == set(names) | {'model_overrides'}
  for field in config_lib.FIELDS:
    assert config[field.name] == field.default, field.name
    assert field.meaning, field.name


def test_the_defaults_and_every_shipped_config_pass_the_schema():
  config_check.check_schema(config_lib.default_config())
  for path in sorted((REPO / 'configs').glob('[!_]*.py')):
    sys.path.insert(0, str(REPO))
    try:
      module = __import__(f'configs.{path.stem}', fromlist=['get_config'])
    finally:
      sys.path.pop(0)
    config_check.validate_config(module.get_config())


@pytest.mark.parametrize('text', ['None', 'none', 'NONE', 'nOnE'])
def test_reference_none_in_any_case_skips_the_check(text):
  config = fault_config(reference=text)
  spec = config_check.validate_config(config)
  assert config_check.reference_name(config, spec) is None


@pytest.mark.parametrize('name, want', [
    ('batch_sise', 'batch_size'), ('learning_rte', 'learning_rate'),
    ('optimiser', 'optimizer'), ('model_overrides.depth', 'model_overrides.depths'),
    ('gradclipnorm', 'grad_clip_norm')])
def test_misspelt_field_suggests_the_right_one(name, want):
  assert config_check.suggest(name) == f'Did you mean "{want}"? '


@pytest.mark.parametrize('text', ['None', 'none', 'NONE'])
def test_init_from_none_in_any_case_means_no_weights(text):
  """absl gives --config.init_from=None as the string 'None'."""
  config = fault_config(init_from=text)
  config_check.validate_config(config)
  assert config_check.init_from(config) is None
  assert config_check.init_from(fault_config(init_from='w.pth')) == 'w.pth'


@pytest.mark.parametrize('value', [-1, 1, 5])
def test_minus_one_is_the_named_default_and_positive_steps_pass(value):
  for name in ('eval_every_steps', 'num_train_steps', 'warmup_steps'):
    config_check.validate_config(fault_config(**{name: value}))
  assert config_lib.EVERY_EPOCH == config_lib.FROM_EPOCHS == -1


# ------------------------------------------------------------------- the CLI

CLI_CASES = {
    # name: (arguments, strings the output must contain)
    'misspelt_key_one_line': (
        ['--config.batch_sise=3'],
        ["error: --config.batch_sise=3: config has no field 'batch_sise'. "
         'Did you mean "batch_size"?']),
    'misspelt_spec_override': (
        ['--config.model_overrides.depthz=(1,1,1)'],
        ['Did you mean "model_overrides.depths"?']),
    'process_flags_without_distributed': (
        ['--num_processes=2', '--process_id=0',
         '--coordinator_address=localhost:1234'],
        ['error: --coordinator_address, --num_processes, --process_id only '
         'apply with --distributed']),
    'distributed_alone': (
        ['--distributed'],
        ['error: --distributed: jax.distributed.initialize() failed',
         '--coordinator_address=HOST:PORT']),
    'empty_workdir': (['--workdir='], ['error: --workdir is empty']),
    'missing_config_file': (  # the later --config wins
        ['--config', 'configs/resnet_50.py'],
        ['error: --config configs/resnet_50.py: could not load it',
         'No such file or directory', 'configs/quickstart.py']),
    'nan_tuple': (
        ['--config.std_rgb=(nan,1,2)'],
        ['error: config.std_rgb:', 'could not parse the tuple']),
    'eval_every_minus_7': (
        ['--config.eval_every_steps=-7'],
        ['error: config.eval_every_steps: -7 is out of range',
         '-1 means EVERY_EPOCH']),
    'batch_size_beyond_memory': (  # issue 20: hung at the pipeline start
        ['--config.batch_size=1000000000'],
        ['error: config.batch_size=1000000000: the input pipeline holds',
         'memory available; use batch_size <= ']),
    'image_size_100000': (  # issue 20: a PIL MemoryError traceback
        ['--config.image_size=100000'],
        ['error: config.image_size: 100000 is out of range']),
    'num_epochs_1e308': (  # issue 20: an OverflowError traceback
        ['--config.num_train_steps=-1', '--config.num_epochs=1e308'],
        ['error: config.num_epochs: 1e+308 is out of range']),
    'init_from_empty': (  # issue 20: trained from scratch without a word
        ['--config.init_from='],
        ["error: config.init_from: '' is empty (an unset shell variable?)"]),
    'process_id_out_of_range': (
        ['--distributed', '--num_processes=2', '--process_id=2',
         '--coordinator_address=localhost:1234'],
        ['error: --process_id=2 must be in [0, 2)']),
}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  procs = {}
  for name, (args, _) in CLI_CASES.items():
    workdir = [] if any(a.startswith('--workdir') for a in args) else [
        '--workdir', str(root / name)]
    procs[name] = subprocess.Popen(
        [sys.executable, 'train.py', '--config', 'tests/fault_config.py',
         *args, *workdir], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
  return {name: (p.wait(300), p.stdout.read(), root / name)
          for name, p in procs.items()}


@pytest.mark.parametrize('name', sorted(CLI_CASES))
def test_cli_mistakes_get_one_error_line_and_no_traceback(name, cli_runs):
  rc, out, workdir = cli_runs[name]
  assert rc == 1, out[-3000:]
  for needle in CLI_CASES[name][1]:
    assert needle in out, out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  assert not (workdir / 'checkpoints').exists()


def test_help_lists_every_config_field_with_default_and_meaning():
  out = subprocess.run([sys.executable, 'train.py', '--help'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  text = out.stdout + out.stderr
  # With no --config a run trains the quickstart: --help shows its values.
  import configs.quickstart  # pylint: disable=g-import-not-at-top
  quickstart = configs.quickstart.get_config()
  for field in config_lib.FIELDS:
    assert f'  {field.name} = {quickstart[field.name]!r}' in text, field.name
  assert 'EVERY_EPOCH: once per epoch' in text
  assert 'model_overrides.FIELD' in text

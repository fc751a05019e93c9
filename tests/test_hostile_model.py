"""Hostile specs, model inputs and layout flags: a named error, never nonsense.

ResNetSpec.validate() is the gate for every variant; hypothesis throws field
values at it. The model checks its input (layout, channels, empty shapes, a
degenerate train-mode BatchNorm) and the residual shapes of every block. The
layout CLI reads its stride column from the conv, and checks --size.
"""

import math
import subprocess
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import pytest

from flax_resnet import layout as layout_lib
from flax_resnet import layout_report
from flax_resnet.spec import ResNetSpec
from flax_resnet.zoo import create_model
from flax_resnet.zoo import get_spec

FAST = settings(max_examples=30, deadline=None)


def spec_error(**fields) -> str:
  with pytest.raises(ValueError) as e:
    ResNetSpec(**fields).validate()
  return str(e.value)


# -------------------------------------------------------------- spec fields

SPEC_CASES = {
    # name: (fields, words the message must hold)
    'bool_depths': ({'depths': (True, True, True), 'widths': (1, 2, 3)},
                    ['depths=(True, True, True)', 'positive integers']),
    'bool_widths': ({'widths': (64, True, 256, 512)}, ['widths=']),
    'bool_strides': ({'strides': (1, True, 2, 2)}, ['strides=']),
    'bool_groups': ({'groups': True}, ['groups=True']),
    'float_depth': ({'depths': (3, 4.0, 6, 3)}, ['depths=']),
    'string_depths': ({'depths': '3463'}, ['depths=']),
    'empty_depths': ({'depths': (), 'widths': ()}, ['depths=()']),
    'bn_eps_inf': ({'bn_eps': float('inf')}, ['bn_eps=inf',
                                              'finite number']),
    'bn_eps_nan': ({'bn_eps': float('nan')}, ['bn_eps=nan']),
    'bn_eps_string': ({'bn_eps': '1e-5'}, ["bn_eps='1e-5'"]),
    'bn_eps_bool': ({'bn_eps': True}, ['bn_eps=True']),
    'bn_momentum_nan': ({'bn_momentum': float('nan')}, ['bn_momentum=nan']),
    'bn_momentum_minus_inf': ({'bn_momentum': -float('inf')},
                              ['bn_momentum=-inf']),
    'preact_string': ({'preact': 'False'}, ["preact='False'",
                                             'True or False']),
    'zero_init_int': ({'zero_init_last_bn': 1}, ['zero_init_last_bn=1']),
    'bottleneck_width_rounds_to_zero': (
        {'widths': (16, 32, 64, 128), 'width_per_group': 1},
        ['bottleneck width', '= 0', 'width_per_group to at least 4']),
    'zero_pad_after_shrinking': (
        {'block': 'basic', 'depths': (1, 1, 1), 'widths': (16, 8, 4),
         'stem': 'cifar', 'stem_width': 16, 'shortcut': 'A',
         'zero_pad': 'after'},
        ["shortcut='A' cannot shrink channels (16 -> 8"]),
    'zero_pad_both_shrinking': (
        {'block': 'basic', 'depths': (1, 1), 'widths': (16, 8),
         'stem': 'cifar', 'stem_width': 16, 'shortcut': 'A'},
        ["shortcut='A' cannot shrink"]),
}


@pytest.mark.parametrize('name', sorted(SPEC_CASES))
def test_hostile_spec_field_is_named(name):
  fields, words = SPEC_CASES[name]
  message = spec_error(**fields)
  for word in words:
    assert word in message, message


@FAST
@given(depths=st.lists(st.one_of(st.booleans(), st.integers(max_value=0),
                                 st.floats(), st.text(max_size=2)),
                       min_size=1, max_size=4))
def test_depths_that_are_not_positive_ints_are_refused(depths):
  message = spec_error(depths=tuple(depths), widths=(64,) * len(depths))
  assert 'depths=' in message


@FAST
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True)
                       .filter(lambda v: not (math.isfinite(v) and v > 0)),
                       st.booleans(), st.text(max_size=4), st.none()))
def test_bn_eps_must_be_a_positive_finite_number(value):
  assert 'bn_eps=' in spec_error(bn_eps=value)


@FAST
@given(width=st.integers(1, 2048), per_group=st.integers(1, 256),
       groups=st.integers(1, 64))
def test_bottleneck_widths_are_valid_or_refused_never_a_crash(width, per_group,
                                                              groups):
  spec = ResNetSpec(depths=(1,), widths=(width,), groups=groups,
                    width_per_group=per_group)
  if int(width * per_group / 64) == 0:
    assert 'bottleneck width' in spec_error(**{
        'depths': (1,), 'widths': (width,), 'groups': groups,
        'width_per_group': per_group})
  else:
    assert spec.validate().bottleneck_width(0) >= groups


@FAST
@given(widths=st.lists(st.integers(1, 64), min_size=1, max_size=3),
       zero_pad=st.sampled_from(['both', 'after']))
def test_option_a_valid_or_refused_and_builds_when_valid(widths, zero_pad):
  fields = dict(block='basic', depths=(1,) * len(widths), widths=tuple(widths),
                stem='cifar', stem_width=8, shortcut='A', zero_pad=zero_pad,
                num_classes=3)
  previous = [8] + widths[:-1]
  if any(w < p for w, p in zip(widths, previous)):
    assert "cannot shrink channels" in spec_error(**fields)
    return
  spec = ResNetSpec(**fields).validate()
  shapes = jax.eval_shape(lambda: create_model('resnet20', **fields).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
  assert shapes['params']['fc']['kernel'].shape == (widths[-1], 3)
  assert spec.zero_pad == zero_pad


# ------------------------------------------------------------- model input


@pytest.fixture(scope='module')
def resnet18():
  model = create_model('resnet18', num_classes=4)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables


INPUT_CASES = {
    # name: (shape, apply (vs init), train, words)
    'nchw_to_init': ((2, 3, 224, 224), False, False,
                     ['look like NCHW', '224 input channels',
                      'x.transpose(0, 2, 3, 1)']),
    'nchw_one_channel': ((2, 1, 28, 28), False, False, ['look like NCHW']),
    'rgba_to_rgb_net': ((1, 32, 32, 4), True, False,
                        ['4 channels', 'built for 3', 'x[..., :3]']),
    'grey_to_rgb_net': ((1, 32, 32, 1), True, False, ['1 channels',
                                                      'built for 3']),
    'zero_by_zero': ((1, 0, 0, 3), False, False, ['(1, 0, 0, 3)',
                                                  'at least 1']),
    'zero_height': ((1, 0, 32, 3), True, False, ['at least 1']),
    'batch_zero': ((0, 32, 32, 3), True, False, ['(0, 32, 32, 3)']),
    'batch_zero_train': ((0, 32, 32, 3), True, True, ['at least 1']),
    'train_batch_1_at_32': ((1, 32, 32, 3), True, True,
                            ['Expected more than 1 value per channel',
                             '(1, 1, 1, 512)']),
    'train_batch_1_at_1': ((1, 1, 1, 3), True, True,
                           ['more than 1 value per channel']),
    'rank_3': ((32, 32, 3), True, False, ['rank-4 NHWC']),
}


@pytest.mark.parametrize('name', sorted(INPUT_CASES))
def test_bad_model_input_is_named(name, resnet18):
  model, variables = resnet18
  shape, apply, train, words = INPUT_CASES[name]
  x = jnp.zeros(shape)
  with pytest.raises(ValueError) as e:
    if apply:
      model.apply(variables, x, train=train, mutable=['batch_stats'])
    else:
      model.init(jax.random.PRNGKey(0), x)
  for word in words:
    assert word in str(e.value), str(e.value)


@pytest.mark.parametrize('shape, train', [
    ((2, 32, 32, 3), True),  # two values per channel at the 1x1 map
    ((1, 64, 64, 3), True),  # a 2x2 last map
    ((1, 32, 32, 3), False),  # eval uses running statistics
    ((1, 1, 1, 3), False),
    ((3, 3, 3, 3), False),  # tiny, but NHWC: 3 channels
])
def test_legitimate_small_inputs_still_work(shape, train, resnet18):
  model, variables = resnet18
  out = model.apply(variables, jnp.ones(shape), train=train,
                    mutable=['batch_stats'])[0]
  assert out.shape == (shape[0], 4)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_train_mode_batch_of_two_at_a_1x1_map_is_informative():
  # The check stops at one value per channel (BN then outputs its bias for
  # every input); two values already give input-dependent logits.
  model = create_model('resnet18', num_classes=4)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  out = model.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  assert not bool(jnp.allclose(out[0], out[1]))  # batch 2 is informative


@pytest.mark.parametrize('size, block', [
    (9, 'stage2_block0'), (12, 'stage2_block0'), (24, 'stage2_block0'),
    (32, 'stage3_block0'), (64, 'stage3_block0'), (96, 'stage2_block0')])
def test_resnet_d_stride_3_where_paths_disagree_names_the_block(size, block):
  model = create_model('resnet50', shortcut='D', strides=(1, 3, 3, 3),
                       num_classes=3)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, size, size, 3))))
  message = str(e.value)
  assert message.startswith(f'{block}: the main path gives'), message
  assert 'the shortcut (avgpool_conv, stride 3)' in message
  assert "shortcut='B'" in message


@pytest.mark.parametrize('size', [3, 6, 224])
def test_resnet_d_stride_3_where_paths_agree_builds(size):
  model = create_model('resnet50', shortcut='D', strides=(1, 3, 3, 3),
                       num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, size, size, 3))))
  assert shapes['params']['fc']['kernel'].shape == (2048, 3)


def test_resnet_d_stride_2_is_unaffected():
  model = create_model('resnet50', shortcut='D', num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 33, 33, 3))))
  assert shapes['params']['fc']['kernel'].shape == (2048, 3)


@FAST
@given(size=st.integers(1, 40), stride=st.integers(1, 4))
def test_any_stride_and_size_builds_or_names_the_block(size, stride):
  model = create_model('resnet18', shortcut='D', strides=(1, stride, 2, 2),
                       num_classes=2)
  try:
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, size, size, 3))))
  except ValueError as e:
    assert 'stage2_block0' in str(e) and stride > 2, str(e)


# --------------------------------------------------------------- layout CLI


def test_stride_column_comes_from_the_conv_at_any_size():
  for size in (1, 2, 3, 224):
    layout = layout_lib.layout_of('resnet50', size)
    table = layout_report.format_table(layout)
    strided = [b for b in layout.blocks if b.stride_conv]
    assert [b.stride for b in strided] == [2, 2, 2]
    for row in table.splitlines():
      if 'conv2 3x3' in row:
        assert 'conv2 3x3 s2' in row, row
        assert '1x1 conv s2 + BN' in row, row


def test_zero_pad_shortcut_stride_comes_from_the_module_at_size_1():
  layout = layout_lib.layout_of('resnet20', 1)
  assert [b.shortcut_stride for b in layout.blocks
          if b.shortcut == 'zero-pad'] == [2, 2]


def run_layout(*args):
  return subprocess.run([sys.executable, '-m', 'flax_resnet.layout', *args],
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('size', ['0', '-32', 'abc', '1.5'])
def test_layout_size_must_be_a_positive_integer(size):
  out = run_layout('resnet50', '--size', size)
  assert out.returncode == 2
  assert 'error: argument --size:' in out.stderr, out.stderr
  assert 'Traceback' not in out.stderr


@pytest.mark.parametrize('text', ['None', 'NONE', 'none'])
def test_layout_reference_none_in_any_case(text):
  out = run_layout('resnet20', '--reference', text)
  assert out.returncode == 0, out.stderr
  assert 'reference: none (no check)' in out.stdout


def test_layout_of_bad_override_is_one_error_line():
  out = run_layout('resnet50', 'widths=(16,32,64,128)', 'width_per_group=1')
  assert out.returncode == 2
  assert out.stderr.startswith('error: widths[0]=16'), out.stderr
  assert 'Traceback' not in out.stderr


def test_presets_still_validate():
  for name in ('resnet18', 'resnet50', 'resnet20', 'resnext50_32x4d'):
    assert get_spec(name).validate() == get_spec(name)

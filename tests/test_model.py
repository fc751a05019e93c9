"""Model zoo: parameter counts, shortcut options, stride placement, API, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from flax_resnet import layers
from flax_resnet import layout as layout_lib
from flax_resnet.model import ResidualBlock

# Published counts (REFERENCE.md): torchvision weights meta, paper Table 6.
PUBLISHED_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'resnext50_32x4d': 25_028_904,
    'wide_resnet50_2': 68_883_240,
    'resnet20': 269_722,
    'resnet32': 464_154,
    'resnet44': 658_586,
    'resnet56': 853_018,
    'resnet110': 1_727_962,
    'resnet1202': 19_421_274,
}


def param_count(model, size):
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
  model = flax_resnet.create_model(name)
  size = 32 if model.spec.stem == 'cifar' else 224
  assert param_count(model, size) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize('name,count', [('resnet20', 272_474),
                                        ('resnet56', 855_770)])
def test_cifar_option_b_counts(name, count):
  assert param_count(flax_resnet.create_model(name, shortcut='B'), 32) == count


def test_list_models_covers_the_required_presets():
  names = set(flax_resnet.list_models())
  required = {
      'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
      'resnet200', 'resnext50_32x4d', 'resnext101_32x8d', 'wide_resnet50_2',
      'wide_resnet101_2', 'resnet50d', 'resnet50_v1', 'resnet50_v2',
      'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
      'resnet1202'}
  assert required <= names
  assert flax_resnet.list_models() == sorted(names)


def cifar_layout(**overrides):
  return layout_lib.layout_of('resnet20', **overrides)


def test_option_a_shortcuts_have_no_parameters():
  layout = cifar_layout(shortcut='A')
  changing = [b for b in layout.blocks if b.in_channels != b.out_channels]
  assert len(changing) == 2
  for b in changing:
    assert b.shortcut == 'zero-pad' and b.shortcut_stride == 2
  variables = jax.eval_shape(lambda: flax_resnet.create_model('resnet20').init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  shortcut_params = [
      jax.tree_util.keystr(p) for p, _ in
      jax.tree_util.tree_flatten_with_path(variables['params'])[0]
      if 'shortcut' in jax.tree_util.keystr(p)]
  assert shortcut_params == []


def test_option_a_subsamples_and_zero_pads_channels():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  out = layers.Shortcut('A', 8, 2, conv=None, norm=None).apply({}, x)
  chex.assert_shape(out, (2, 4, 4, 8))
  np.testing.assert_array_equal(out[..., 2:6], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(out[..., :2], 0)
  np.testing.assert_array_equal(out[..., 6:], 0)
  after = layers.Shortcut('A', 8, 2, None, None, zero_pad='after').apply({}, x)
  np.testing.assert_array_equal(after[..., :4], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(after[..., 4:], 0)


def test_option_b_projects_only_where_the_shape_changes():
  layout = layout_lib.layout_of('resnet50')
  for b in layout.blocks:
    changes = b.in_channels != b.out_channels or b.in_size != b.out_size
    assert (b.shortcut == 'projection') == changes, b


def test_option_c_projects_in_every_block():
  layout = layout_lib.layout_of('resnet18', shortcut='C')
  assert all(b.shortcut == 'projection' for b in layout.blocks)
  assert layout.total_params > layout_lib.layout_of('resnet18').total_params


def test_option_d_avg_pools_before_a_stride_one_projection():
  layout = layout_lib.layout_of('resnet50d')
  first = {b.stage: b for b in layout.blocks if b.index == 0}
  for stage in (2, 3, 4):
    assert first[stage].shortcut == 'avgpool+projection'
    assert first[stage].shortcut_stride == 2
  # Stage 1 keeps its size, so there is nothing to pool: a plain 1x1.
  assert first[1].shortcut == 'projection' and first[1].shortcut_stride == 1
  assert layout.stem.startswith('conv3x3/2 -> BN -> conv3x3/1 -> BN -> '
                                'conv3x3/1')


def test_avg_pool_is_ceil_mode_without_padding_in_count():
  x = jnp.arange(1 * 3 * 3 * 1, dtype=jnp.float32).reshape(1, 3, 3, 1)
  out = layers.AvgPool(2, 2).apply({}, x)
  chex.assert_shape(out, (1, 2, 2, 1))
  # torch AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) on 0..8.
  np.testing.assert_allclose(out[0, :, :, 0], [[2.0, 3.5], [6.5, 8.0]])


@pytest.mark.parametrize('name,stride_in,expected', [
    ('resnet50', '3x3', ('conv2', '3x3')),  # v1.5: torchvision, NVIDIA
    ('resnet50_v1', '1x1', ('conv1', '1x1')),  # v1: Caffe, Keras, Gluon V1
])
def test_stride_placement(name, stride_in, expected):
  layout = layout_lib.layout_of(name)
  assert flax_resnet.get_spec(name).stride_in == stride_in
  strided = [b for b in layout.blocks if b.in_size != b.out_size]
  assert [(b.stage, b.index) for b in strided] == [(2, 0), (3, 0), (4, 0)]
  for b in strided:
    assert (b.stride_conv, b.stride_at) == expected
  for b in layout.blocks:
    if b not in strided:
      assert b.stride_at == 'none'


def test_resnet50_stage1_projection_is_stride_one_and_resnet18_has_none():
  r50 = {(b.stage, b.index): b for b in layout_lib.layout_of('resnet50').blocks}
  assert r50[1, 0].shortcut == 'projection'
  assert (r50[1, 0].shortcut_stride, r50[1, 0].in_channels,
          r50[1, 0].out_channels) == (1, 64, 256)
  r18 = layout_lib.layout_of('resnet18').blocks
  projections = [b for b in r18 if b.shortcut == 'projection']
  assert [(b.stage, b.shortcut_stride) for b in projections] == [
      (2, 2), (3, 2), (4, 2)]


def _call_order(model, size):
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      order.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, size, size, 3))))
  return order


def test_preactivation_orders_bn_before_conv():
  order = _call_order(flax_resnet.create_model('resnet18_v2'), 64)
  block = [p[1] for p in order if len(p) == 2 and p[0] == 'stage2_block0']
  # Shortcut projection is fed the pre-activated input, so it runs after bn1.
  assert block == ['bn1', 'shortcut', 'conv1', 'bn2', 'conv2']
  assert ('final_bn',) in order
  post = _call_order(flax_resnet.create_model('resnet18'), 64)
  block = [p[1] for p in post if len(p) == 2 and p[0] == 'stage2_block0']
  assert block == ['shortcut', 'conv1', 'bn1', 'conv2', 'bn2']
  assert ('final_bn',) not in post


def test_preact_block_output_is_not_rectified_but_post_act_is():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  conv = layers.make_conv('torch', jnp.float32, jnp.float32)
  norm = layers.make_norm(False, 0.9, 1e-5, jnp.float32, jnp.float32)
  outs = {}
  for preact in (False, True):
    block = ResidualBlock('basic', 16, 16, 1, 1, '3x3', preact, None, 'both',
                          False, conv, norm)
    variables = block.init(jax.random.key(1), x)
    outs[preact] = block.apply(variables, x)
  assert float(outs[False].min()) >= 0.0
  assert float(outs[True].min()) < 0.0


@pytest.fixture(scope='module')
def resnet20_setup():
  model = flax_resnet.create_model('resnet20', num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
  return model, variables, x


def test_params_and_batch_stats_are_separate_collections(resnet20_setup):
  _, variables, _ = resnet20_setup
  assert set(variables) == {'params', 'batch_stats'}
  flat = jax.tree_util.tree_flatten_with_path(variables['params'])[0]
  assert not any('mean' in jax.tree_util.keystr(p) for p, _ in flat)


def test_train_flag_controls_batch_stats(resnet20_setup):
  model, variables, x = resnet20_setup
  logits = model.apply(variables, x, train=False)
  chex.assert_shape(logits, (4, 10))
  chex.assert_tree_all_finite(logits)
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables['batch_stats'], updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  with pytest.raises(Exception):  # batch_stats are immutable unless asked
    model.apply(variables, x, train=True)


def test_bn_defaults_match_torch():
  spec = flax_resnet.get_spec('resnet50')
  assert spec.bn_momentum == 0.9 and spec.bn_eps == 1e-5
  assert not spec.zero_init_last_bn


def test_zero_init_last_bn():
  model = flax_resnet.create_model('resnet20', zero_init_last_bn=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for name, block in variables['params'].items():
    if name.startswith('stage'):
      np.testing.assert_array_equal(block['bn2']['scale'], 0.0)
      np.testing.assert_array_equal(block['bn1']['scale'], 1.0)


def test_jit_and_grad(resnet20_setup):
  model, variables, x = resnet20_setup
  labels = jnp.arange(4) % 10

  @jax.jit
  def loss_and_grad(params):
    def loss_fn(p):
      logits, _ = model.apply({'params': p,
                               'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grad(variables['params'])
  chex.assert_trees_all_equal_shapes(grads, variables['params'])
  chex.assert_tree_all_finite(grads)
  assert float(optax_global_norm(grads)) > 0
  assert np.isfinite(float(loss))


def optax_global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_bfloat16_compute_keeps_float32_params():
  model = flax_resnet.create_model('resnet20', dtype='bfloat16')
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_dtypes(
      variables['params'], jax.tree.map(lambda p: p.astype(jnp.float32),
                                        variables['params']))
  logits, state = model.apply(variables, x, train=True,
                              mutable=['batch_stats', 'intermediates'])
  assert state['intermediates']['stage2'][0].dtype == jnp.bfloat16
  assert state['batch_stats']['stem']['bn1']['mean'].dtype == jnp.float32
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50d', 'resnet50_v1',
                                  'resnet18_v2'])
def test_odd_input_sizes_give_torch_output_sizes(name):
  model = flax_resnet.create_model(name, num_classes=3)
  x = jax.ShapeDtypeStruct((1, 97, 97, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, x)
  chex.assert_shape(logits, (1, 3))
  # torch: floor((n + 2p - k) / s) + 1 at every strided layer, ceil_mode
  # avg-pool for D: 97 -> 49 (stem conv) -> 25 (max-pool) -> 13 -> 7 -> 4.
  sizes = [state['intermediates'][f'stage{i}'][0].shape[1] for i in (1, 2, 3, 4)]
  assert sizes == [25, 13, 7, 4]


# ---------------------------------------------------------------- error paths


@pytest.mark.parametrize('overrides,field', [
    ({'shortcut': 'E'}, 'shortcut'),
    ({'stride_in': '2x2'}, 'stride_in'),
    ({'block': 'dense'}, 'block'),
    ({'stem': 'fancy'}, 'stem'),
    ({'padding': 'valid'}, 'padding'),
    ({'dtype': 'int8'}, 'dtype'),
    ({'num_classes': 0}, 'num_classes'),
    ({'depths': (2, 2)}, 'widths'),
    ({'strides': (1, 2)}, 'strides'),
    ({'bn_momentum': 1.5}, 'bn_momentum'),
    ({'zero_init_last_bn': True, 'preact': True}, 'zero_init_last_bn'),
    ({'shortcut': 'D', 'preact': True}, 'shortcut'),
    ({'not_a_field': 1}, 'not_a_field'),
])
def test_bad_overrides_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    flax_resnet.create_model('resnet50', **overrides)


def test_invalid_choice_lists_valid_choices():
  with pytest.raises(ValueError, match="'A', 'B', 'C', 'D'"):
    flax_resnet.create_model('resnet18', shortcut='E')


def test_basic_block_rejects_bottleneck_only_options():
  with pytest.raises(ValueError, match='stride_in'):
    flax_resnet.create_model('resnet18', stride_in='1x1')
  with pytest.raises(ValueError, match='groups'):
    flax_resnet.create_model('resnet18', groups=32)


def test_unknown_model_suggests_close_names():
  with pytest.raises(ValueError, match='resnet50'):
    flax_resnet.create_model('resnet5O')


def test_bad_input_shapes_and_dtypes(resnet20_setup):
  model, variables, _ = resnet20_setup
  with pytest.raises(ValueError, match='rank-4 NHWC'):
    model.apply(variables, jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match='dtype'):
    model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))


@pytest.mark.parametrize('name,gmacs', [
    ('resnet18', 1.814), ('resnet34', 3.664), ('resnet50', 4.089),
    ('resnet101', 7.801), ('resnet152', 11.514), ('resnet20', 0.0406)])
def test_forward_macs_match_torchvision_ops(name, gmacs):
  from flax_resnet import cost
  # torchvision's weights meta `_ops` (GFLOPS) rounds to 3 decimals.
  assert round(cost.model_cost(name)['macs'] / 1e9, 4 if gmacs < 1 else 3) == (
      gmacs)


# ------------------------------------- exact Gluon / Keras nets (spec fields)

# Trainable counts the libraries report for their own nets (Gluon
# collect_params() with grad_req != 'null', Keras trainable_weights); the
# reference tables hold the same figures, extracted from the libraries.
LIBRARY_TRAINABLE = {
    'gluon_resnet18_v1': 11_689_512,
    'gluon_resnet50_v1': 25_575_912,
    'gluon_resnet18_v2': 11_687_848,
    'gluon_resnet50_v2': 25_549_480,
    'keras_resnet50': 25_583_592,
    'keras_resnet50_v2': 25_568_360,
}


@pytest.mark.parametrize('name', sorted(LIBRARY_TRAINABLE))
def test_exact_presets_have_the_librarys_trainable_count(name):
  assert param_count(flax_resnet.create_model(name), 224) == \
      LIBRARY_TRAINABLE[name]


def test_existing_presets_are_unchanged_by_the_new_fields():
  for name in ('resnet50', 'resnet50_v1', 'resnet50_v2', 'resnet18'):
    spec = flax_resnet.get_spec(name)
    assert (spec.conv_bias, spec.input_norm, spec.stem_norm,
            spec.stride_block, spec.pool_shortcut, spec.pool_padding) == (
                (), False, None, 'first', False, '-inf'), name


def test_conv_bias_puts_a_bias_exactly_where_named():
  variables = jax.eval_shape(lambda: flax_resnet.create_model(
      'gluon_resnet50_v1').init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  block = variables['params']['stage1_block0']
  assert 'bias' in block['conv1'] and 'bias' in block['conv3']
  assert 'bias' not in block['conv2'] and 'bias' not in block['shortcut'][
      'conv']
  assert 'bias' not in variables['params']['stem']['conv1']


def test_input_norm_has_statistics_but_no_parameters():
  variables = jax.eval_shape(lambda: flax_resnet.create_model(
      'gluon_resnet18_v2').init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert 'input_bn' not in variables['params']['stem']
  assert set(variables['batch_stats']['stem']['input_bn']) == {'mean', 'var'}
  assert 'bn1' in variables['params']['stem']  # Gluon V2's stem BN


def test_stride_in_last_block_with_pool_shortcut():
  derived = layout_lib.layout_of('keras_resnet50_v2')
  strided = [(b.stage, b.index) for b in derived.blocks
             if b.stride_at != 'none']
  assert strided == [(1, 2), (2, 3), (3, 5)]
  assert [b.shortcut for b in derived.blocks if b.stride_at != 'none'] == [
      'subsample'] * 3
  assert [b.out_size[0] for b in derived.blocks if b.index == 0] == [
      56, 28, 14, 7]
  assert derived.blocks[-1].out_size == (7, 7)


def test_subsample_shortcut_takes_every_other_pixel_of_the_raw_input():
  x = jax.random.normal(jax.random.key(1), (1, 9, 9, 4))
  shortcut = layers.Shortcut('subsample', 4, 2, None, None)
  np.testing.assert_array_equal(shortcut.apply({}, x), x[:, ::2, ::2, :])


def _keras_v1_stem(x, kernel, bias):
  """Keras ResNet50's stem as written there: ZeroPadding2D(3), a VALID
  7x7/2 conv, ZeroPadding2D(1), then a VALID 3x3/2 max-pool (BN omitted;
  a ReLU stands where BN + ReLU are)."""
  x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  x = jax.lax.conv_general_dilated(
      x, kernel, (2, 2), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  x = jax.nn.relu(x)
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), 'VALID')


@pytest.mark.parametrize('size', [224, 97, 30])
def test_keras_v1_stem_padding_equals_symmetric_padding(size):
  # The Keras stem pads explicitly and convolves VALID; ours pads the conv
  # symmetrically and the pool with -inf. Proven equal numerically, at even
  # and odd sizes (after the ReLU, zero padding equals -inf padding).
  rng = jax.random.key(2)
  x = jax.random.normal(rng, (2, size, size, 3))
  kernel = jax.random.normal(jax.random.key(3), (7, 7, 3, 8)) * 0.1
  bias = jax.random.normal(jax.random.key(4), (8,))
  conv = layers.make_conv('torch', jnp.float32, jnp.float32)

  class Stem(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = conv(8, 7, 2, use_bias=True, name='conv')(x)
      return layers.MaxPool(3, 2, 'torch', 'zeros')(nn.relu(x))

  ours = Stem().apply({'params': {'conv': {'kernel': kernel, 'bias': bias}}},
                      x)
  ours_inf = layers.MaxPool(3, 2).apply({}, nn.relu(
      conv(8, 7, 2, use_bias=True, name='c').apply(
          {'params': {'kernel': kernel, 'bias': bias}}, x)))
  keras = _keras_v1_stem(x, kernel, bias)
  np.testing.assert_allclose(ours, keras, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ours, ours_inf)


def test_zero_padded_max_pool_differs_only_without_a_relu():
  x = -jnp.abs(jax.random.normal(jax.random.key(5), (1, 8, 8, 2))) - 1.0
  zeros = layers.MaxPool(3, 2, 'torch', 'zeros').apply({}, x)
  neg_inf = layers.MaxPool(3, 2).apply({}, x)
  assert float(zeros[0, 0, 0, 0]) == 0.0  # the padded zero wins the border
  assert float(neg_inf[0, 0, 0, 0]) < 0.0
  np.testing.assert_array_equal(zeros[:, 1:, 1:], neg_inf[:, 1:, 1:])
  relu = nn.relu(x)
  np.testing.assert_array_equal(
      layers.MaxPool(3, 2, 'torch', 'zeros').apply({}, relu),
      layers.MaxPool(3, 2).apply({}, relu))


@pytest.mark.parametrize('overrides,field', [
    (dict(conv_bias=('conv4',)), 'conv_bias'),
    (dict(conv_bias='stem'), 'conv_bias'),
    (dict(block='basic', depths=(2, 2, 2, 2), conv_bias=('conv3',)),
     'conv3'),
    (dict(stride_block='middle'), 'stride_block'),
    (dict(pool_padding='reflect'), 'pool_padding'),
    (dict(input_norm=1), 'input_norm'),
    (dict(stem_norm='yes'), 'stem_norm'),
    (dict(pool_shortcut=True, shortcut='A'), 'pool_shortcut'),
])
def test_bad_exactness_fields_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    flax_resnet.get_spec('resnet50', **overrides)


def test_zero_padded_pool_without_a_pool_is_refused():
  with pytest.raises(ValueError, match="'cifar' stem has no max-pool"):
    flax_resnet.get_spec('resnet20', pool_padding='zeros')


@pytest.mark.slow
def test_readme_model_zoo_table_is_what_cost_prints():
  """Every figure in README's model-zoo table is reproduced from the code."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from flax_resnet import cost  # pylint: disable=g-import-not-at-top
  readme = (pathlib.Path(__file__).resolve().parent.parent /
            'README.md').read_text()
  assert cost.markdown_table(flax_resnet.list_models()) in readme

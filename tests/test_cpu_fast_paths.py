"""The XLA:CPU fast paths of flax_resnet.cpu compute exactly what XLA's own ops do."""

import functools

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import layers
from flax_resnet.cpu import onednn
from flax_resnet.cpu import xla_conv
from flax_resnet.train import steps

NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_pair(stride, kernel, padding):
  stock = functools.partial(lax.conv_general_dilated, window_strides=stride,
                            padding=padding, dimension_numbers=NHWC)
  ours = functools.partial(xla_conv.conv_general_dilated, window_strides=stride,
                           padding=padding, dimension_numbers=NHWC)
  return stock, ours


def grads(conv, x, kernel):
  loss = lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize('shape,stride', [
    ((2, 8, 8, 4), (1, 1)),
    ((2, 8, 8, 4), (2, 2)),
    ((3, 7, 9, 5), (2, 2)),  # odd sizes: the last row/column is skipped
    ((2, 9, 6, 3), (3, 2)),
])
def test_pointwise_conv_matches_xla(shape, stride):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, shape[-1], 6)), jnp.float32)
  stock, ours = conv_pair(stride, 1, ((0, 0), (0, 0)))
  # The forward pass is the very same op.
  np.testing.assert_array_equal(ours(x, kernel), stock(x, kernel))
  x_grad, kernel_grad = grads(ours, x, kernel)
  ref_x_grad, ref_kernel_grad = grads(stock, x, kernel)
  chex.assert_trees_all_close((x_grad, kernel_grad),
                              (ref_x_grad, ref_kernel_grad),
                              rtol=1e-5, atol=1e-5)
  # Rows and columns the strided conv never reads get exactly zero gradient.
  unused = np.ones(shape[1:3], bool)
  unused[::stride[0], ::stride[1]] = False
  assert np.all(np.asarray(x_grad)[:, unused] == 0)


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((2, 8, 8, 4), 3, (2, 2), ((1, 1), (1, 1))),  # torch padding
    ((2, 8, 8, 4), 3, (2, 2), 'SAME'),  # TF pads (0, 1)
    ((2, 9, 7, 3), 3, (2, 2), ((1, 1), (1, 1))),  # odd sizes
    ((1, 15, 15, 3), 7, (2, 2), ((3, 3), (3, 3))),  # the ImageNet stem
    ((2, 10, 9, 3), 2, (2, 3), ((0, 1), (1, 0))),  # kernel < stride on w
    ((2, 12, 12, 2), 3, (3, 3), ((1, 1), (1, 1))),
])
def test_strided_conv_matches_xla(shape, kernel, stride, padding):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 5)),
                        jnp.float32)
  stock, ours = conv_pair(stride, kernel, padding)
  np.testing.assert_array_equal(ours(x, weights), stock(x, weights))
  chex.assert_trees_all_close(grads(ours, x, weights),
                              grads(stock, x, weights), rtol=1e-5, atol=1e-5)


def test_unstrided_kxk_convs_are_plain_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  stock, ours = conv_pair((1, 1), 3, ((1, 1), (1, 1)))
  np.testing.assert_array_equal(ours(x, kernel), stock(x, kernel))
  for got, want in zip(grads(ours, x, kernel), grads(stock, x, kernel)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('shape,mode', [
    ((2, 12, 12, 3), 'torch'),
    ((2, 11, 13, 3), 'torch'),
    ((2, 12, 12, 3), 'same'),
    ((1, 9, 9, 2), 'same'),
])
def test_max_pool_gradient_goes_to_the_first_maximum(shape, mode):
  rng = np.random.default_rng(2)
  # Post-ReLU values rounded to halves: most windows hold ties.
  x = jnp.round(2 * jnp.maximum(
      jnp.asarray(rng.normal(size=shape), jnp.float32), 0)) / 2
  pads = 'SAME' if mode == 'same' else layers.torch_padding(3)
  stock = lambda x: nn.max_pool(x, (3, 3), (2, 2), pads)
  ours = lambda x: layers.MaxPool(3, 2, mode).apply({}, x)
  np.testing.assert_array_equal(ours(x), stock(x))
  grad = jnp.asarray(rng.normal(size=stock(x).shape), jnp.float32)
  got = jax.jit(lambda x: jax.vjp(ours, x)[1](grad)[0])(x)
  want = jax.jit(lambda x: jax.vjp(stock, x)[1](grad)[0])(x)
  # Same routing; only the order of adding overlapping windows may differ.
  chex.assert_trees_all_close(got, want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got != 0, want != 0)


def test_compiler_options_only_where_xla_runs_the_cpu_convs():
  assert steps.compiler_options('gpu') is None
  options = steps.compiler_options('cpu')
  if onednn.available() and jax.device_count() == 1:
    assert options is None  # no XLA convolutions left to steer
    return
  assert options == steps.CPU_COMPILER_OPTIONS
  options['extra'] = 'x'  # a copy: callers cannot change the constant
  assert 'extra' not in steps.CPU_COMPILER_OPTIONS


def test_compiler_options_are_accepted_by_this_jaxlib():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 20)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 20, 24)), jnp.float32)
  stock, _ = conv_pair((1, 1), 3, ((1, 1), (1, 1)))
  wgrad = lambda x, kernel: jax.grad(
      lambda k: jnp.sum(stock(x, k) ** 2))(kernel)
  tuned = jax.jit(wgrad, compiler_options=steps.CPU_COMPILER_OPTIONS)
  chex.assert_trees_all_close(tuned(x, kernel), jax.jit(wgrad)(x, kernel),
                              rtol=1e-4, atol=1e-3)


def _awkward_values(shape, first):
  rng = np.random.default_rng(4)
  x = rng.normal(size=shape).astype(np.float32)
  x.reshape(-1)[:5] = [first, -0.0, np.inf, -np.inf, np.nan]
  return jnp.asarray(x)


@pytest.fixture(params=['extension', 'conditional'])
def barrier_kind(request, monkeypatch):
  """The extension's aliasing call, and the conditional used without it."""
  if request.param == 'extension':
    if not onednn.available():
      pytest.skip(f'extension unavailable: {onednn.unavailable_reason()}')
  else:
    monkeypatch.setattr(onednn, 'available', lambda: False)
  return request.param


@pytest.mark.parametrize('first', [1.5, np.nan, np.inf])
def test_fusion_barrier_returns_its_input_bit_for_bit(first, barrier_kind):
  # A non-finite first element takes the other branch of the conditional.
  del barrier_kind
  x = _awkward_values((3, 4, 5, 6), first)
  for fn in (layers.fusion_barrier, jax.jit(layers.fusion_barrier)):
    got = np.asarray(fn(x))
    np.testing.assert_array_equal(got.view(np.uint32),
                                  np.asarray(x).view(np.uint32))


def test_fusion_barrier_passes_gradients_unchanged():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  grad = jax.jit(jax.grad(
      lambda x: jnp.sum(layers.fusion_barrier(jnp.sin(x)) * weights)))(x)
  np.testing.assert_array_equal(grad, jnp.cos(x) * weights)


def test_fusion_barrier_survives_xla_cpu_and_vanishes_elsewhere(barrier_kind):
  fn = jax.jit(lambda x: jnp.transpose(
      layers.fusion_barrier(jnp.maximum(x * 2.0 + 1.0, 0.0)), (3, 1, 2, 0)))
  x = jnp.ones((2, 4, 4, 3), jnp.float32)
  # Optimized CPU HLO: the barrier is still there, so the activation is
  # materialised instead of being recomputed inside the transpose.
  survivor = {'extension': f'custom_call_target="{onednn.MATERIALIZE_TARGET}"',
              'conditional': 'conditional('}[barrier_kind]
  assert survivor in fn.lower(x).compile().as_text()
  # Lowered for a GPU, only the identity branch is emitted.
  gpu = fn.trace(x).lower(lowering_platforms=('cuda',)).as_text()
  cpu = fn.trace(x).lower(lowering_platforms=('cpu',)).as_text()
  ops = {'extension': [onednn.MATERIALIZE_TARGET],
         'conditional': ['stablehlo.is_finite', 'stablehlo.sort']}
  for op in ops[barrier_kind]:
    assert op in cpu
    assert op not in gpu


def test_extension_barrier_copies_nothing():
  if not onednn.available():
    pytest.skip(f'extension unavailable: {onednn.unavailable_reason()}')
  fn = jax.jit(lambda x: layers.fusion_barrier(x * 2.0) + 1.0)
  hlo = fn.lower(jnp.ones((4, 8, 8, 3))).compile().as_text()
  assert 'output_to_operand_aliasing' in hlo
  # The producer writes straight into the buffer the call hands on: no copy
  # of its own between them (a copy fused into the producer costs nothing).
  entry = hlo[hlo.index('\nENTRY'):]
  assert ' copy(' not in entry


def test_model_with_and_without_barriers_agree():
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import conftest  # pylint: disable=g-import-not-at-top
  model, x, variables = conftest.small_resnet20_batch()

  def loss(params):
    logits, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  with_barriers = jax.jit(jax.value_and_grad(loss))(variables['params'])
  with mock.patch.object(layers, 'fusion_barrier', lambda x: x):
    without = jax.jit(jax.value_and_grad(loss))(variables['params'])
  # Same math; only which fusion evaluates each elementwise op differs.
  chex.assert_trees_all_close(with_barriers, without, rtol=1e-5, atol=1e-6)

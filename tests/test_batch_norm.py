"""layers.BatchNorm is flax.linen.BatchNorm, with the gradient of flax_resnet.cpu.batch_norm."""

import functools
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from flax_resnet import layers

CASES = {
    'default': dict(),
    'no_scale_no_bias': dict(use_scale=False, use_bias=False),
    'zero_scale': dict(scale_init=nn.initializers.zeros),
    'bf16': dict(dtype=jnp.bfloat16),
    'bf16_params': dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
}


def _pair(case, train):
  kwargs = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                **CASES[case])
  return layers.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)


def _inputs(shape, dtype=jnp.float32, seed=0, offset=0.5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 2.0 + offset
  return jnp.asarray(x, dtype)


def _randomized(variables, seed):
  """Non-trivial params and running statistics, same tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype),
      variables)


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('train', [True, False])
def test_outputs_and_statistics_are_flax_batch_norms_bit_for_bit(case, train):
  ours, flax = _pair(case, train)
  dtype = CASES[case].get('dtype', jnp.float32)
  x = _inputs((4, 5, 3, 6), dtype)
  variables = ours.init(jax.random.PRNGKey(0), x)
  flax_variables = flax.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, flax_variables)
  chex.assert_trees_all_equal(variables, flax_variables)
  variables = _randomized(variables, 1)
  apply = lambda m: jax.jit(functools.partial(m.apply, mutable=['batch_stats']))
  y, updates = apply(ours)(variables, x)
  y_flax, updates_flax = apply(flax)(variables, x)
  assert y.dtype == y_flax.dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(y_flax, np.float32))
  chex.assert_trees_all_equal(updates, updates_flax)


def _loss(module, variables, x, weights):
  """Uses y and, through the updated running averages, mean and var."""
  y, updates = module.apply(variables, x, mutable=['batch_stats'])
  stats = updates['batch_stats']
  return (jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights)
          + jnp.sum(stats['mean'] * 3.0) + jnp.sum(jnp.sqrt(stats['var'])))


def _grads(module, variables, x, weights):
  loss = lambda params, x: _loss(
      module, {'params': params, 'batch_stats': variables['batch_stats']}, x,
      weights)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)


@pytest.mark.parametrize('shape,offset', [
    ((8, 6, 6, 5), 0.5),
    ((3, 7, 5, 3), -2.0),   # odd sizes, a mean of 1 standard deviation
    ((64, 4, 4, 16), 0.0),
    ((2, 1, 1, 7), 1.0),     # two values per channel
])
def test_gradient_is_as_accurate_as_autodiffs(shape, offset):
  """Both gradients against float64 autodiff: ours within 4x autodiff's error.

  Ours reduces sum(dy * x) - mean * sum(dy) instead of sum(dy * (x - mean))
  (see batch_norm.py); this checks that costs no accuracy that matters.
  """
  ours, flax = _pair('default', train=True)
  x = _inputs(shape, offset=offset)
  variables = _randomized(ours.init(jax.random.PRNGKey(0), x), 2)
  weights = _inputs(shape, seed=3)
  got = _grads(ours, variables, x, weights)
  autodiff = _grads(flax, variables, x, weights)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    exact = _grads(flax, to64(variables), to64(x), to64(weights))
    exact = jax.tree.map(np.asarray, exact)
  for ours_leaf, autodiff_leaf, exact_leaf in zip(
      jax.tree.leaves(got), jax.tree.leaves(autodiff), jax.tree.leaves(exact)):
    scale = np.max(np.abs(exact_leaf))
    ours_error = np.max(np.abs(np.asarray(ours_leaf) - exact_leaf)) / scale
    autodiff_error = np.max(np.abs(np.asarray(autodiff_leaf) - exact_leaf)
                            ) / scale
    assert ours_error <= 4 * autodiff_error + 2e-7, (ours_error,
                                                      autodiff_error)


def test_bf16_gradient_matches_autodiff():
  ours, flax = _pair('bf16', train=True)
  x = _inputs((8, 4, 4, 8), jnp.bfloat16)
  variables = _randomized(ours.init(jax.random.PRNGKey(0), x), 4)
  weights = _inputs(x.shape, seed=5)
  got = _grads(ours, variables, x, weights)
  want = _grads(flax, variables, x, weights)
  assert got[1].dtype == jnp.bfloat16
  # Both compute in float32 and round dx to bfloat16 (8 bits): one ulp.
  chex.assert_trees_all_close(
      jax.tree.map(lambda a: a.astype(jnp.float32), got),
      jax.tree.map(lambda a: a.astype(jnp.float32), want),
      rtol=2 ** -7, atol=1e-2)


def test_model_trains_the_same_with_flax_batch_norm():
  """Same variables tree, same loss and batch statistics, same gradients."""
  model, x, variables = conftest.small_resnet20_batch()

  def step(params):
    def loss(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x,
          train=True, mutable=['batch_stats'])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), updates
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, updates), grads = jax.jit(step)(variables['params'])
  flax_norm = lambda train, momentum, eps, dtype, param_dtype: (
      functools.partial(nn.BatchNorm, use_running_average=not train,
                        momentum=momentum, epsilon=eps, dtype=dtype,
                        param_dtype=param_dtype))
  with mock.patch.object(layers, 'make_norm', flax_norm):
    flax_variables = model.init(jax.random.PRNGKey(0), x)
    (flax_loss, flax_updates), flax_grads = jax.jit(step)(
        variables['params'])
  chex.assert_trees_all_equal(variables, flax_variables)
  np.testing.assert_array_equal(loss, flax_loss)
  chex.assert_trees_all_equal(updates, flax_updates)
  chex.assert_trees_all_close(grads, flax_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kwargs,call', [
    (dict(axis=1), {}),
    (dict(use_fast_variance=False), {}),
    (dict(), dict(mask=np.arange(4 * 5 * 3).reshape(4, 5, 3, 1) % 3 > 0)),
])
def test_configurations_it_does_not_write_out_are_flax_code(kwargs, call):
  ours = layers.BatchNorm(use_running_average=False, **kwargs)
  flax = nn.BatchNorm(use_running_average=False, **kwargs)
  x = _inputs((4, 5, 3, 6))
  variables = _randomized(flax.init(jax.random.PRNGKey(0), x, **call), 7)
  grad = lambda m: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(m.apply(
      variables, x, mutable=['batch_stats'], **call)[0]))))(x)
  np.testing.assert_array_equal(grad(ours), grad(flax))


def test_is_a_flax_batch_norm():
  # Code that finds the model's norms by type (layout, converters) sees them.
  assert isinstance(layers.make_norm(True, 0.9, 1e-5, None, jnp.float32)(),
                    nn.BatchNorm)

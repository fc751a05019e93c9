"""flax_resnet.nnx: the NNX face computes what the Linen module computes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_resnet
from flax_resnet import convert
from flax_resnet import nnx as resnet_nnx
from flax_resnet.train import steps


def linen_init(name, size, seed=0, **overrides):
  """(Linen model, variables) with random values of the right shapes.

  Filled from numpy rather than `model.init`, whose compiled initialisers
  cost seconds per net on CPU; BatchNorm variances are kept positive, and
  the running statistics are far from init so eval mode really uses them.
  """
  model = flax_resnet.create_model(name, **overrides)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.normal(scale=0.1, size=leaf.shape).astype(leaf.dtype)
    if path[-1].key == 'var':
      value = np.abs(value) + 0.5
    return jnp.asarray(value)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('name,size,overrides', [
    ('resnet20', 32, {}),                      # cifar stem, option A
    ('resnet18', 64, {}),                      # basic, option B
    ('resnet50d', 64, {'depths': (1, 1, 1, 1)}),  # deep stem, option D
    ('resnet18_v2', 64, {}),                   # pre-activation
    ('resnext50_32x4d', 64, {'depths': (1, 1, 1, 1)}),  # groups
])
def test_eval_logits_are_exactly_the_linen_logits(name, size, overrides):
  linen, variables = linen_init(name, size, **overrides)
  model = resnet_nnx.create_model(name, rngs=nnx.Rngs(0), variables=variables,
                                  **overrides)
  x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
  want = jax.jit(functools.partial(linen.apply, train=False))(variables, x)
  got = nnx.jit(lambda m, x: m(x, train=False))(model, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert_trees_equal(model.linen_variables(), variables)


def test_fresh_init_has_linen_shapes_and_follows_the_seed():
  _, variables = linen_init('resnet20', 32, depths=(1, 1, 1))
  make = lambda seed: resnet_nnx.create_model(
      'resnet20', rngs=nnx.Rngs(params=seed), depths=(1, 1, 1))
  model = make(5)
  fresh = model.linen_variables()
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, variables)
  assert_trees_equal(make(5).linen_variables(), fresh)
  assert not np.array_equal(make(6).linen_variables()['params']['fc'][
      'kernel'], fresh['params']['fc']['kernel'])
  # Linen's params are nnx.Params, its batch_stats nnx.BatchStats.
  assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == len(
      jax.tree.leaves(variables['params']))
  assert len(jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == len(
      jax.tree.leaves(variables['batch_stats']))


def test_train_mode_updates_batch_stats_like_linen():
  linen, variables = linen_init('resnet20', 32)
  model = resnet_nnx.create_model('resnet20', rngs=nnx.Rngs(0),
                                  variables=variables)
  x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
  want, updates = jax.jit(functools.partial(
      linen.apply, train=True, mutable=['batch_stats']))(variables, x)
  got = nnx.jit(lambda m, x: m(x, train=True))(model, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  after = model.linen_variables()
  assert_trees_equal(after['batch_stats'], updates['batch_stats'])
  assert not np.array_equal(after['batch_stats']['stem']['bn1']['mean'],
                            variables['batch_stats']['stem']['bn1']['mean'])
  assert_trees_equal(after['params'], variables['params'])


def test_variables_from_load_weights(tmp_path):
  _, variables = linen_init('resnet18', 64, seed=9)
  path = tmp_path / 'resnet18.safetensors'
  convert.save_safetensors(variables, 'resnet18', path)
  loaded = convert.load_weights(str(path), 'resnet18', num_classes=1000)
  model = resnet_nnx.create_model('resnet18', rngs=nnx.Rngs(0),
                                  variables=loaded)
  x = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
  want = flax_resnet.create_model('resnet18').apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(want))

  _, fine_tune = flax_resnet.load_pretrained('resnet18', path, num_classes=4)
  head = resnet_nnx.create_model('resnet18', rngs=nnx.Rngs(0),
                                 variables=fine_tune, num_classes=4)
  assert head(x).shape == (2, 4)


def test_nnx_optimizer_steps_equal_the_linen_train_step():
  """A few SGD-momentum steps, NNX style (nnx.Optimizer + nnx.jit), against
  flax_resnet.train.steps.train_step on the same batches."""
  num_classes, lr = 10, 0.05
  linen, variables = linen_init('resnet20', 32, depths=(1, 1, 1))
  tx = optax.sgd(lr, momentum=0.9, nesterov=True)
  state = steps.TrainState.create(
      apply_fn=linen.apply, params=variables['params'],
      batch_stats=variables['batch_stats'], tx=tx, rng=jax.random.key(0))
  linen_step = jax.jit(functools.partial(
      steps.train_step, num_classes=num_classes, label_smoothing=0.0,
      learning_rate_fn=lambda step: lr))

  model = resnet_nnx.create_model('resnet20', rngs=nnx.Rngs(0),
                                  variables=variables, depths=(1, 1, 1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    def loss_fn(model):
      logits = model(batch['image'], train=True)
      return jnp.mean(steps.cross_entropy(logits, batch['label'],
                                          num_classes))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  for _ in range(4):
    batch = {'image': jnp.asarray(rng.normal(size=(16, 32, 32, 3)),
                                  jnp.float32),
             'label': jnp.asarray(rng.integers(0, num_classes, 16))}
    state, metrics = linen_step(state, batch)
    loss = nnx_step(model, optimizer, batch)
    np.testing.assert_allclose(float(loss), float(metrics['loss']),
                               rtol=1e-6)
  after = model.linen_variables()
  for got, want in ((after['params'], state.params),
                    (after['batch_stats'], state.batch_stats)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)
  # And training moved the weights.
  assert not np.allclose(after['params']['fc']['kernel'],
                         variables['params']['fc']['kernel'])

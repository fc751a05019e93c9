"""Pure train/eval steps, optimizers, schedules, data parallelism, config checks."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_resnet
from flax_resnet.train import config_check
from flax_resnet.train import optim
from flax_resnet.train import steps
from flax_resnet.train.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**fields):
  c = default_config()
  c.model = 'resnet20'
  # One block per stage keeps XLA:CPU compile time (the cost here) small.
  c.model_overrides.depths = (1, 1, 1)
  c.reference = None
  c.num_classes = 10
  c.image_size = 16
  c.batch_size = 16
  c.eval_batch_size = 16
  c.learning_rate = 0.1
  c.lr_scaling = 'none'
  c.warmup_steps = 0
  c.schedule = 'constant'
  for k, v in fields.items():
    c[k] = v
  return c


def make_state(config, seed=0):
  spec = config_check.validate_config(config)
  schedule = optim.create_schedule(config, steps_per_epoch=10, total_steps=100)
  tx = optim.create_optimizer(config, schedule)
  state = steps.create_train_state(
      flax_resnet.ResNet(spec), tx, jax.random.PRNGKey(seed),
      (config.image_size, config.image_size, 3),
      float16=config.precision == 'float16')
  step = jax.jit(functools.partial(
      steps.train_step, num_classes=config.num_classes,
      label_smoothing=config.label_smoothing, learning_rate_fn=schedule))
  return state, step


def fixed_batch(n=16, size=16, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(n, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, classes, size=(n,)).astype(np.int32)}


def eval_loss(state, batch, num_classes=10):
  logits = state.apply_fn({'params': state.params,
                           'batch_stats': state.batch_stats},
                          batch['image'], train=True, mutable=['batch_stats'])[0]
  return float(jnp.mean(steps.cross_entropy(logits, batch['label'],
                                            num_classes)))


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw', 'lars'])
def test_one_step_on_a_fixed_batch_lowers_the_loss(optimizer):
  lr = {'sgd': 0.05, 'adamw': 1e-3, 'lars': 0.5}[optimizer]
  config = small_config(optimizer=optimizer, learning_rate=lr)
  state, step = make_state(config)
  batch = fixed_batch()
  before = eval_loss(state, batch)
  new_state, metrics = step(state, batch)
  after = eval_loss(new_state, batch)
  assert after < before, (before, after)
  assert int(new_state.step) == 1
  assert np.isfinite(float(metrics['loss']))
  np.testing.assert_allclose(float(metrics['lr']), lr, rtol=1e-6)


def test_train_step_updates_batch_stats_and_not_in_eval():
  config = small_config()
  state, step = make_state(config)
  batch = fixed_batch()
  new_state, _ = step(state, batch)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                       state.batch_stats, new_state.batch_stats))
  assert all(moved)
  out = steps.eval_step(new_state, dict(batch, mask=np.ones(16, bool)),
                        num_classes=10)
  assert float(out['count']) == 16


def test_eval_step_ignores_padding():
  config = small_config()
  state, _ = make_state(config)
  batch = fixed_batch()
  mask = np.arange(16) < 5
  full = steps.eval_step(state, dict(batch, mask=np.ones(16, bool)),
                         num_classes=10)
  part = steps.eval_step(state, dict(batch, mask=mask), num_classes=10)
  first5 = steps.eval_step(
      state, {'image': batch['image'][:5], 'label': batch['label'][:5],
              'mask': np.ones(5, bool)}, num_classes=10)
  assert float(part['count']) == 5 and float(full['count']) == 16
  # BN in eval mode is per-example, so the 5 real rows score the same alone.
  np.testing.assert_allclose(float(part['loss_sum']),
                             float(first5['loss_sum']), rtol=1e-5)
  assert float(part['top1_sum']) == float(first5['top1_sum'])


def test_top_k_and_label_smoothing():
  logits = jnp.array([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 1.0, 2.0]])
  labels = jnp.array([2, 1])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 1), [0, 0])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 2), [1, 0])
  np.testing.assert_array_equal(steps.top_k_correct(logits, labels, 5), [1, 1])
  plain = steps.cross_entropy(logits, labels, 4)
  smooth = steps.cross_entropy(logits, labels, 4, label_smoothing=0.1)
  targets = 0.9 * jax.nn.one_hot(labels, 4) + 0.1 / 4
  expected = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  np.testing.assert_allclose(smooth, expected, rtol=1e-6)
  assert not np.allclose(plain, smooth)


def test_weight_decay_mask_is_kernels_only():
  params = {'conv1': {'kernel': 1}, 'bn1': {'scale': 1, 'bias': 1},
            'fc': {'kernel': 1, 'bias': 1}}
  mask = optim.decay_mask(params, 'kernels')
  assert mask == {'conv1': {'kernel': True},
                  'bn1': {'scale': False, 'bias': False},
                  'fc': {'kernel': True, 'bias': False}}
  assert all(jax.tree.leaves(optim.decay_mask(params, 'all')))


def test_decay_only_touches_kernels_in_an_update():
  config = small_config(weight_decay=0.5, momentum=0.0, nesterov=False)
  tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
  params = {'conv': {'kernel': jnp.ones(3)}, 'bn': {'scale': jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['conv']['kernel'], -0.5)
  np.testing.assert_allclose(updates['bn']['scale'], 0.0)


def test_cosine_with_warmup_and_linear_scaling():
  c = small_config(schedule='cosine', warmup_epochs=5.0, warmup_steps=-1,
                   learning_rate=0.1, lr_scaling='linear', batch_size=512,
                   base_batch_size=256)
  sched = optim.create_schedule(c, steps_per_epoch=100, total_steps=9000)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(250)), 0.1, rtol=1e-6)  # half-way
  np.testing.assert_allclose(float(sched(500)), 0.2, rtol=1e-6)  # peak
  np.testing.assert_allclose(float(sched(500 + 4250)), 0.1, rtol=1e-5)
  assert float(sched(9000)) < 1e-6


def test_piecewise_paper_schedule_and_resnet110_warmup():
  import configs.cifar10_resnet110 as r110
  import configs.cifar10_resnet20 as r20
  c = r20.get_config()
  sched = optim.create_schedule(c, steps_per_epoch=390, total_steps=64000)
  for step, lr in [(0, 0.1), (31999, 0.1), (32000, 0.01), (47999, 0.01),
                   (48000, 0.001), (63999, 0.001)]:
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6)
  c = r110.get_config()
  sched = optim.create_schedule(c, steps_per_epoch=390, total_steps=64000)
  for step, lr in [(0, 0.01), (399, 0.01), (400, 0.1), (32000, 0.01),
                   (48000, 0.001)]:
    np.testing.assert_allclose(float(sched(step)), lr, rtol=1e-6)


def test_float16_dynamic_loss_scaling_skips_overflowing_steps():
  config = small_config(precision='float16')
  state, step = make_state(config)
  assert state.dynamic_scale is not None
  batch = fixed_batch()
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  chex.assert_tree_all_finite(new_state.params)
  # An input that overflows fp16 makes the grads non-finite: the update is
  # skipped and the loss scale halves.
  huge = dict(batch, image=batch['image'] * 1e6)
  skipped, _ = step(new_state, huge)
  chex.assert_trees_all_equal(skipped.params, new_state.params)
  assert float(skipped.dynamic_scale.scale) < float(
      new_state.dynamic_scale.scale)


def test_bfloat16_training_step():
  config = small_config(precision='bfloat16')
  state, step = make_state(config)
  new_state, metrics = step(state, fixed_batch())
  assert np.isfinite(float(metrics['loss']))
  assert jax.tree.leaves(new_state.params)[0].dtype == jnp.float32
  assert jax.tree.leaves(new_state.batch_stats)[0].dtype == jnp.float32


_EIGHT_DEVICES = textwrap.dedent('''
    import functools, json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_train_steps import small_config, make_state, fixed_batch
    from flax_resnet.train import parallel
    assert jax.device_count() == 8, jax.devices()
    losses = {{}}
    for n in (1, 8):
      mesh = parallel.create_mesh(jax.devices()[:n])
      config = small_config(learning_rate=0.02)
      state, _ = make_state(config)
      from flax_resnet.train import optim, steps
      schedule = optim.create_schedule(config, 10, 100)
      step = jax.jit(functools.partial(
          steps.train_step, num_classes=10, label_smoothing=0.0,
          learning_rate_fn=schedule),
          in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
          out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
      state = jax.device_put(state, parallel.replicated(mesh))
      out = []
      for i in range(4):
        batch = parallel.global_batch(fixed_batch(), mesh)
        assert len(batch['image'].sharding.device_set) == n
        state, m = step(state, batch)
        out.append(float(m['loss']))
      losses[n] = out
    print(json.dumps(losses))
''')


def test_eight_simulated_devices_match_one_device():
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  script = _EIGHT_DEVICES.format(repo=REPO, tests=os.path.join(REPO, 'tests'))
  out = subprocess.run([sys.executable, '-c', script], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  import json
  losses = json.loads(out.stdout.strip().splitlines()[-1])
  one, eight = np.array(losses['1']), np.array(losses['8'])
  print('1 device:', one, '\n8 devices:', eight,
        '\nmax abs diff:', np.abs(one - eight).max())
  # Same global batch, BN statistics over the global batch: same numbers up
  # to float reassociation in the cross-device reductions.
  np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5)
  assert one[-1] < one[0]


# --------------------------------------------------------------- config errors


@pytest.mark.parametrize('fields,field', [
    ({'model': 'resnet5O'}, 'model'),
    ({'model_overrides': {'shortcut': 'E'}}, 'shortcut'),
    ({'model_overrides': {'stride_in': 'middle'}}, 'stride_in'),
    ({'model_overrides': {'no_such_field': 1}}, 'no_such_field'),
    ({'model_overrides': {'num_classes': 3}}, 'num_classes'),
    ({'batch_size': 0}, 'batch_size'),
    ({'batch_size': -8}, 'batch_size'),
    ({'eval_batch_size': 0}, 'eval_batch_size'),
    ({'optimizer': 'rmsprop'}, 'optimizer'),
    ({'schedule': 'step'}, 'schedule'),
    ({'precision': 'fp8'}, 'precision'),
    ({'augment': 'mixup'}, 'augment'),
    ({'learning_rate': 0.0}, 'learning_rate'),
    ({'momentum': 1.0}, 'momentum'),
    ({'label_smoothing': 1.0}, 'label_smoothing'),
    ({'weight_decay': -1e-4}, 'weight_decay'),
    ({'schedule': 'piecewise', 'boundaries_steps': (48000, 32000)},
     'boundaries_steps'),
    ({'schedule': 'piecewise', 'boundaries_epochs': (0, 10)},
     'boundaries_epochs'),
    ({'schedule': 'piecewise'}, 'boundaries_steps'),
    ({'num_epochs': 0.0}, 'num_epochs'),
    ({'reference': 'caffe'}, 'reference'),
    ({'eval_crop_ratio': 1.5}, 'eval_crop_ratio'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints'),
    ({'checkpoint_every_steps': 0}, 'checkpoint_every_steps'),
])
def test_config_errors_name_the_field(fields, field):
  config = small_config()
  for k, v in fields.items():
    if k == 'model_overrides':
      for kk, vv in v.items():
        config.model_overrides[kk] = vv
    else:
      config[k] = v
  with pytest.raises(config_check.ConfigError, match=field):
    config_check.validate_config(config)


def test_batch_not_divisible_by_devices():
  with pytest.raises(config_check.ConfigError, match='batch_size.*8 devices'):
    config_check.validate_config(small_config(batch_size=12), device_count=8)
  with pytest.raises(config_check.ConfigError, match='processes'):
    config_check.validate_config(small_config(batch_size=12), process_count=8)


def test_configs_are_locked_against_unknown_keys():
  config = small_config()
  with pytest.raises(AttributeError, match='batch_sise'):
    config.batch_sise = 3


@pytest.mark.parametrize('name', sorted(
    n[:-3] for n in os.listdir(os.path.join(REPO, 'configs'))
    if n.endswith('.py') and not n.startswith('_')))
def test_every_shipped_config_validates(name):
  import importlib
  module = importlib.import_module(f'configs.{name}')
  spec = config_check.validate_config(module.get_config())
  assert spec.num_classes == module.get_config().num_classes


def test_the_steps_import_without_the_data_packages():
  """`flax_resnet.train` loads its names on first use, so the jitted steps
  need only jax, flax and optax (a GPU image without grain or TFDS runs
  benchmarks/device_check.py's speed and conv parts)."""
  probe = textwrap.dedent("""
      import sys
      from flax_resnet.train import steps
      heavy = {'grain', 'tensorflow_datasets', 'orbax', 'ml_collections',
               'flax_resnet.data'}
      print(sorted(heavy & set(sys.modules)))
      from flax_resnet.train import train_and_evaluate, default_config
      import flax_resnet.train as train
      print(train.loop.__name__, 'grain' in sys.modules)
  """)
  out = subprocess.run([sys.executable, '-c', probe], check=True,
                       capture_output=True, text=True, cwd=REPO,
                       timeout=300).stdout.splitlines()
  assert out == ['[]', 'flax_resnet.train.loop True']

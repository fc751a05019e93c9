"""End-to-end training runs: metrics, checkpoints, exact resume, NaN, refusals."""

import json
import os
import tempfile

import jax
import numpy as np
import pytest

from flax_resnet import layout as layout_lib
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import loop
from flax_resnet.train.config import default_config


def digits_config(**fields):
  """A tiny, fast run on the real offline digits (8x8, one block a stage)."""
  c = default_config()
  c.model = 'resnet20'
  c.model_overrides.depths = (1, 1, 1)
  c.reference = None
  c.dataset = 'sklearn_digits'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.num_classes = 10
  c.image_size = 8
  c.augment = 'none'
  c.mean_rgb = (85.0, 85.0, 85.0)
  c.std_rgb = (110.0, 110.0, 110.0)
  c.worker_count = 0
  c.batch_size = 32
  c.eval_batch_size = 128  # 360 test images: the last batch is padded
  c.num_train_steps = 12
  c.schedule = 'cosine'
  c.warmup_steps = 2
  c.lr_scaling = 'none'
  c.learning_rate = 0.05
  c.checkpoint_every_steps = 4
  c.eval_every_steps = 6
  c.log_every_steps = 1  # per-step records, so resumed runs compare 1:1
  # Runs in one test share compiled steps through JAX's persistent cache.
  c.compilation_cache_dir = os.path.join(tempfile.gettempdir(),
                                         'flax_resnet_test_jax_cache')
  c.progress_bar = 'off'
  for k, v in fields.items():
    c[k] = v
  return c


def read_metrics(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def restore_final(workdir, config):
  """The state in the newest checkpoint, as host numpy arrays."""
  spec = config_check.validate_config(config)
  ckpt = checkpoint_lib.Checkpointer(workdir / 'checkpoints', keep=10,
                                     keep_best=False)
  steps = ckpt.all_steps()
  import orbax.checkpoint as ocp
  restored = ckpt.manager.restore(steps[-1], args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  ckpt.close()
  del spec
  return steps, jax.tree.map(np.asarray, restored)


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  config = digits_config()
  result = loop.train_and_evaluate(config, str(workdir))
  return workdir, config, result


def test_end_to_end_run_writes_metrics_and_checkpoints(full_run):
  workdir, _, result = full_run
  assert result.status == 'completed' and result.step == 12
  records = read_metrics(workdir)
  train = [r for r in records if 'train_loss' in r]
  evals = [r for r in records if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [6, 12]
  assert {'train_loss', 'train_top1', 'lr', 'images_per_sec'} <= set(train[0])
  assert {'eval_loss', 'eval_top1', 'eval_top5'} <= set(evals[0])
  assert all(np.isfinite(r['train_loss']) for r in train)
  # It learns. Last/first step loss over seeds 0-9, with oneDNN's convs, XLA's
  # (FLAX_RESNET_ONEDNN=0) and both held to AVX2 (other kernels, other
  # rounding, as on another CPU model): 0.32-0.50 (seed 0: 0.37); the kernels
  # move it by <= 0.3 %, the seeds by the rest.
  assert train[-1]['train_loss'] < 0.75 * train[0]['train_loss']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  steps = checkpoint_lib.Checkpointer(
      workdir / 'checkpoints', keep=3, keep_best=True).all_steps()
  assert steps[-1] == 12 and len(steps) <= 4


def test_evaluation_counts_every_example(full_run):
  _, _, result = full_run
  # 360 test digits in batches of 128: 128 + 128 + 104 (+ 24 masked padding).
  assert result.eval_metrics['eval_examples'] == 360


def test_resume_equals_an_uninterrupted_run_bit_for_bit(full_run, tmp_path):
  workdir, config, _ = full_run
  first = loop.train_and_evaluate(config, str(tmp_path), stop_after=5)
  assert first.status == 'preempted' and first.step == 5
  second = loop.train_and_evaluate(config, str(tmp_path), stop_after=4)
  assert second.step == 9
  third = loop.train_and_evaluate(config, str(tmp_path))
  assert third.status == 'completed' and third.step == 12
  _, resumed = restore_final(tmp_path, config)
  _, straight = restore_final(workdir, config)
  for part in ('params', 'batch_stats', 'opt_state', 'step', 'rng'):
    flat_a = jax.tree_util.tree_flatten_with_path(resumed[part])[0]
    flat_b = jax.tree_util.tree_flatten_with_path(straight[part])[0]
    assert len(flat_a) == len(flat_b)
    for (path, a), (_, b) in zip(flat_a, flat_b):
      np.testing.assert_array_equal(a, b, err_msg=f'{part}{path}')
  straight_losses = {r['step']: r['train_loss'] for r in read_metrics(workdir)
                     if 'train_loss' in r}
  resumed_losses = {r['step']: r['train_loss'] for r in read_metrics(tmp_path)
                    if 'train_loss' in r}
  for step in range(6, 13):
    assert resumed_losses[step] == straight_losses[step]


def test_nan_stops_with_step_and_cause_and_keeps_last_good_checkpoint(tmp_path):
  config = digits_config(learning_rate=1e6, warmup_steps=0, schedule='constant',
                         checkpoint_every_steps=2, log_every_steps=1,
                         num_train_steps=40, eval_every_steps=100)
  with pytest.raises(loop.NonFiniteLossError, match=r'step \d+.*loss=') as e:
    loop.train_and_evaluate(config, str(tmp_path))
  assert 'learning_rate' in str(e.value)
  ckpt = checkpoint_lib.Checkpointer(tmp_path / 'checkpoints', keep=3,
                                     keep_best=False)
  steps = ckpt.all_steps()
  ckpt.close()
  if steps:  # every checkpoint that was written holds finite numbers
    _, state = restore_final(tmp_path, config)
    assert checkpoint_lib.tree_all_finite(state['params'])


def test_layout_mismatch_refuses_to_train_before_compiling(tmp_path):
  config = digits_config(reference='paper', image_size=32)
  config.model_overrides.shortcut = 'B'
  config.model_overrides.depths = (3, 3, 3)
  with pytest.raises(layout_lib.LayoutMismatch, match='shortcut') as e:
    loop.train_and_evaluate(config, str(tmp_path))
  assert 'stage 2 block 0' in str(e.value)
  assert 'reference=None' in str(e.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_num_classes_must_match_the_dataset(tmp_path):
  with pytest.raises(ValueError, match='num_classes.*10'):
    loop.train_and_evaluate(digits_config(num_classes=7), str(tmp_path))


@pytest.mark.parametrize('config_name', ['cifar100_resnet56', 'resnet50'])
def test_class_count_is_not_a_layout_difference(config_name, capsys):
  """configs/cifar100_resnet56.py has a 100-class head; paper's table has 10."""
  import importlib
  config = importlib.import_module(f'configs.{config_name}').get_config()
  config.num_classes = 7
  spec = config_check.model_spec(config)
  loop.check_layout(config, spec, is_lead=True)
  out = capsys.readouterr().out
  assert 'MATCH; head compared at the reference' in out
  assert 'this run has 7' in out


def test_class_count_does_not_hide_a_real_difference():
  import importlib
  config = importlib.import_module('configs.cifar100_resnet56').get_config()
  config.model_overrides.shortcut = 'B'
  spec = config_check.model_spec(config)
  with pytest.raises(layout_lib.LayoutMismatch, match='stage 2 block 0'):
    loop.check_layout(config, spec, is_lead=False)

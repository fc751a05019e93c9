"""Resuming with a changed config: the changed field is named, nothing is moved.

Issue 12: resuming with another optimizer called every intact checkpoint
damaged and advised moving the folder away; a precision change was called "a
different architecture" with two spec dumps. Now the saved config and the
saved state's structure are compared with this run's: an intact checkpoint is
never reported damaged, never moved, and the message offers the choices.
"""

import dataclasses
import hashlib
import logging
import pathlib
import sys

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_resnet import data as data_lib
from flax_resnet.model import ResNet
from flax_resnet.spec import ResNetSpec
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import compat
from flax_resnet.train import config_check
from flax_resnet.train import loop
from flax_resnet.train import optim
from flax_resnet.train import steps as steps_lib
from flax_resnet.zoo import get_spec

REPO = pathlib.Path(__file__).resolve().parent.parent


from fault_config import with_fields as fault_config  # tests/ is on sys.path


def abstract_state(config):
  spec = config_check.validate_config(config)
  tx = optim.create_optimizer(config, optim.create_schedule(config, 1, 10))
  shape = (config.image_size, config.image_size, 3)
  return jax.eval_shape(
      lambda rng: steps_lib.create_train_state(
          ResNet(spec), tx, rng, shape,
          float16=config.precision == 'float16'), jax.random.PRNGKey(0))


def meta_of(config):
  return {'model': config.model,
          'spec': repr(config_check.validate_config(config)),
          'config': config.to_json_best_effort()}


def write_checkpoint(workdir, config, step=2, data_state=None):
  """A checkpoint as the loop writes it, with random values shaped for `config`."""
  leaves, tree = jax.tree.flatten(abstract_state(config))
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state = jax.tree.unflatten(tree, [
      jax.random.uniform(k, s.shape).astype(s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype)
      for k, s in zip(keys, leaves)])
  ckpt = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints',
                                     keep=3, keep_best=False, async_save=False)
  ckpt.save(step, state, data_state or {'next_batch': step}, meta_of(config))
  ckpt.close()
  return state


def digests(folder):
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def resume(workdir, config):
  ckpt = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints',
                                     keep=3, keep_best=False, async_save=False)
  try:
    return ckpt.restore_latest(abstract_state(config), meta_of(config))
  finally:
    ckpt.close()


INCOMPATIBLE = {
    # name: (saved fields, resumed fields, what the message must say)
    'optimizer_sgd_to_adamw': (
        {}, {'optimizer': 'adamw'},
        ['optimizer: sgd -> adamw', '--config.optimizer=sgd']),
    'optimizer_sgd_to_lars': (
        {}, {'optimizer': 'lars'}, ['optimizer: sgd -> lars']),
    'optimizer_adamw_to_sgd': (
        {'optimizer': 'adamw'}, {}, ['optimizer: adamw -> sgd']),
    'grad_clip_norm_turned_on': (
        {}, {'grad_clip_norm': 1.0},
        ['grad_clip_norm: 0.0 -> 1.0', '--config.grad_clip_norm=0.0']),
    'grad_clip_norm_turned_off': (
        {'grad_clip_norm': 2.0}, {}, ['grad_clip_norm: 2.0 -> 0.0']),
    'momentum_turned_off': (
        {}, {'momentum': 0.0}, ['momentum: 0.9 -> 0.0']),
    'precision_to_float16': (
        {}, {'precision': 'float16'},
        ['precision: float32 -> float16', '--config.precision=float32']),
    'num_classes': (
        {'num_classes': 7, 'dataset': 'synthetic'}, {},
        ['num_classes: 7 -> 10', '--config.init_from_skip_head=True']),
}


@pytest.mark.parametrize('name', sorted(INCOMPATIBLE))
def test_changed_state_structure_names_the_field_and_keeps_the_checkpoint(
    name, tmp_path):
  saved, resumed, words = INCOMPATIBLE[name]
  write_checkpoint(tmp_path, fault_config(**saved))
  before = digests(tmp_path)
  with pytest.raises(checkpoint_lib.ResumeIncompatibleError) as e:
    resume(tmp_path, fault_config(**resumed))
  message = str(e.value)
  for word in words:
    assert word in message, message
  assert 'is intact' in message and 'damaged' not in message, message
  assert 'differently shaped train state' in message
  assert 'ResNetSpec(' not in message  # no spec dumps
  assert 'The checkpoint is left as it is. Choose one:' in message
  assert 'resume it exactly' in message and 'Use a fresh --workdir' in message
  if not name.startswith('num_classes'):
    assert (f'keep its trained weights with a fresh optimizer state: '
            f'--workdir NEW_FOLDER --config.init_from={tmp_path}') in message
  assert digests(tmp_path) == before
  assert not (tmp_path / 'checkpoints.damaged').exists()


ARCHITECTURE = {
    'depths': ({'model_overrides.depths': (2, 2, 2)},
               'model_overrides.depths: (1, 1, 1) -> (2, 2, 2)',
               '--config.model_overrides.depths=(1,1,1)'),
    'shortcut': ({'model_overrides.shortcut': 'B'},
                 "model_overrides.shortcut: 'A' -> 'B'",
                 '--config.model_overrides.shortcut=A'),
    'stem_width': ({'model_overrides.stem_width': 32,
                    'model_overrides.widths': (32, 64, 128)},
                   'model_overrides.stem_width: 16 -> 32',
                   '--config.model_overrides.stem_width=16'),
    'model': ({'model': 'resnet32'}, "model: resnet20 -> resnet32",
              '--config.model=resnet20'),
}


@pytest.mark.parametrize('name', sorted(ARCHITECTURE))
def test_another_architecture_names_fields_not_spec_dumps(name, tmp_path):
  resumed, change, flag = ARCHITECTURE[name]
  write_checkpoint(tmp_path, fault_config())
  before = digests(tmp_path)
  with pytest.raises(checkpoint_lib.ResumeIncompatibleError) as e:
    resume(tmp_path, fault_config(**resumed))
  message = str(e.value)
  assert 'a different architecture' in message, message
  assert change in message and flag in message, message
  assert 'ResNetSpec(' not in message and 'damaged' not in message
  assert digests(tmp_path) == before


@pytest.mark.parametrize('saved, resumed, change', [
    ({}, {'precision': 'bfloat16'}, 'precision: float32 -> bfloat16'),
    ({'precision': 'bfloat16'}, {}, 'precision: bfloat16 -> float32'),
    ({'grad_clip_norm': 1.0}, {'grad_clip_norm': 2.0},
     'grad_clip_norm: 1.0 -> 2.0'),
    ({}, {'learning_rate': 0.01}, 'learning_rate: 0.05 -> 0.01'),
    ({}, {'weight_decay': 5e-4}, 'weight_decay: 0.0001 -> 0.0005'),
    ({}, {'label_smoothing': 0.1}, 'label_smoothing: 0.0 -> 0.1'),
])
def test_same_structure_resumes_bit_exactly_with_a_warning(saved, resumed,
                                                           change, tmp_path,
                                                           caplog):
  state = write_checkpoint(tmp_path, fault_config(**saved))
  with caplog.at_level(logging.WARNING):
    restored, data_state, step = resume(tmp_path, fault_config(**resumed))
  assert step == 2 and data_state == {'next_batch': 2}
  assert 'resuming checkpoint step 2 with config changes' in caplog.text
  assert change in caplog.text, caplog.text
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_resume_through_the_loop_refuses_before_training(tmp_path):
  saved = data_lib.make_train_iterator(fault_config()).get_state()
  write_checkpoint(tmp_path, fault_config(),
                   data_state={**saved, 'next_batch': 2})
  before = digests(tmp_path / 'checkpoints')
  with pytest.raises(checkpoint_lib.ResumeIncompatibleError) as e:
    loop.train_and_evaluate(fault_config(optimizer='adamw'), str(tmp_path))
  assert 'optimizer: sgd -> adamw' in str(e.value)
  assert digests(tmp_path / 'checkpoints') == before
  assert not (tmp_path / 'metrics.jsonl').exists()
  # The lock was released: the right config resumes at once.
  result = loop.train_and_evaluate(fault_config(num_train_steps=3),
                                   str(tmp_path))
  assert result.step == 3


def test_a_truly_damaged_step_is_still_called_damaged(tmp_path):
  # The compatibility check must not hide real damage behind "incompatible".
  write_checkpoint(tmp_path, fault_config())
  (tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata').write_text('{"mod')
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    resume(tmp_path, fault_config())
  assert 'every checkpoint in' in str(e.value) and 'damaged' in str(e.value)


# --------------------------------------------------------- compat, the unit

SPECS = st.builds(
    lambda name, **fields: get_spec(name, **fields),
    name=st.sampled_from(['resnet18', 'resnet50', 'resnet20', 'resnet50d',
                          'resnext50_32x4d', 'resnet101']),
    num_classes=st.integers(1, 2000),
    bn_eps=st.floats(1e-8, 1.0),
    bn_momentum=st.floats(0.0, 0.999),
    zero_init_last_bn=st.booleans(),
    padding=st.sampled_from(['torch', 'same']),
    dtype=st.sampled_from(['float32', 'bfloat16', 'float16']))


@settings(max_examples=40, deadline=None)
@given(spec=SPECS)
def test_spec_repr_parses_back_field_by_field(spec):
  parsed = compat.parse_spec_repr(repr(spec))
  assert set(parsed) == {f.name for f in dataclasses.fields(ResNetSpec)}
  for field in dataclasses.fields(ResNetSpec):
    assert parsed[field.name] == repr(getattr(spec, field.name)), field.name


@settings(max_examples=40, deadline=None)
@given(a=SPECS, b=SPECS)
def test_spec_changes_are_exactly_the_differing_fields(a, b):
  changes = {f for f, _, _ in compat.spec_changes(repr(a), repr(b))}
  want = {f'model_overrides.{f.name}' for f in dataclasses.fields(ResNetSpec)
          if f.name not in ('dtype', 'num_classes') and
          repr(getattr(a, f.name)) != repr(getattr(b, f.name))}
  assert changes == want


def test_a_spec_field_added_later_is_no_change_at_its_default():
  spec = get_spec('resnet20')
  saved = repr(spec).replace(', padding=\'torch\'', '')
  assert compat.spec_changes(saved, repr(spec)) == []
  assert compat.spec_changes(saved, repr(spec.replace(padding='same'))) == [
      ('model_overrides.padding', "'torch'", "'same'")]


def test_precision_is_not_an_architecture_change():
  a, b = get_spec('resnet50'), get_spec('resnet50', dtype='bfloat16')
  assert compat.spec_changes(repr(a), repr(b)) == []

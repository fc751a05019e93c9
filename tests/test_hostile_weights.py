"""Weights that would train or predict nonsense are refused with one message.

NaN/Inf (or a negative BatchNorm variance) in any format load_weights reads,
the same through config.init_from from a file or a checkpoint folder, before
anything compiles; init_from reads what `python -m flax_resnet.convert`
writes; and a run that diverges says truthfully whether anything was saved.
Downloads are in test_pretrained.py.
"""

import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax_resnet import convert
from flax_resnet import pretrained
from flax_resnet import zoo
from flax_resnet.model import ResNet
from flax_resnet.pretrained import Weights
from flax_resnet.train import config_check
from flax_resnet.train import init_from
from flax_resnet.train import loop
from fault_config import with_fields as fault_config  # tests/ is on sys.path

BAD_TENSOR = 'layer2.0.conv1.weight'


@pytest.fixture(scope='module')
def spec():
  return config_check.validate_config(fault_config())


@pytest.fixture(scope='module')
def variables(spec):
  """Finite, non-trivial weights of the fault_config network (numpy)."""
  shapes = jax.eval_shape(lambda: ResNet(spec).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
  rng = np.random.default_rng(0)
  leaves = [rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
            for s in jax.tree.leaves(shapes)]
  return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAX_RESNET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.delenv('FLAX_RESNET_MIRROR', raising=False)


def state_dict_with(spec, variables, value, name=BAD_TENSOR):
  state_dict = {k: np.array(v) for k, v in
                convert.flax_to_torch(variables, spec).items()}
  state_dict[name].flat[5] = value
  return state_dict


class State(dict):
  """The two fields of a TrainState that init_from replaces."""
  params = property(lambda self: self['params'])
  batch_stats = property(lambda self: self['batch_stats'])

  def replace(self, **kw):
    return State({**self, **kw})


def zero_state(variables):
  return State(jax.tree.map(np.zeros_like, dict(variables)))


def assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------ NaN / Inf in load_weights


def _write(kind, state_dict, spec, tmp_path):
  if kind == 'mapping':
    return state_dict
  if kind == 'mapping-bfloat16':
    return {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
            for k, v in state_dict.items()}
  variables = convert.torch_to_flax(state_dict, spec)
  path = tmp_path / {'safetensors': 'w.safetensors', 'torch': 'w.pth',
                     'gluon': 'w.params'}[kind]
  {'safetensors': convert.save_safetensors, 'torch': convert.save_torch,
   'gluon': convert.save_gluon}[kind](variables, spec, path)
  return path


# The Gluon model zoo has only ImageNet-stem nets: a tiny one of that layout.
GLUON_SPEC = zoo.get_spec('gluon_resnet18_v1', depths=(1, 1, 1, 1),
                          widths=(8, 8, 8, 8), stem_width=8, num_classes=10)


@pytest.mark.parametrize('value, counts', [
    (np.nan, '1 NaN and 0 Inf'), (np.inf, '0 NaN and 1 Inf'),
    (-np.inf, '0 NaN and 1 Inf')])
@pytest.mark.parametrize('kind', ['safetensors', 'torch', 'gluon', 'mapping',
                                  'mapping-bfloat16'])
def test_load_weights_refuses_nonfinite_values_naming_tensor_and_file(
    kind, value, counts, spec, variables, tmp_path):
  if kind == 'gluon':
    spec = GLUON_SPEC
    variables = jax.tree.map(
        lambda s: np.ones(s.shape, s.dtype), jax.eval_shape(
            lambda: ResNet(spec).init(jax.random.PRNGKey(0),
                                      jnp.zeros((1, 32, 32, 3)), train=False)))
  source = _write(kind, state_dict_with(spec, variables, value), spec,
                  tmp_path)
  with pytest.raises(convert.NonFiniteWeights) as e:
    convert.load_weights(source, spec)
  message = str(e.value)
  where = 'the state_dict' if kind.startswith('mapping') else str(source)
  assert message.startswith(f'{where}: tensor '), message
  size = '576' if kind == 'gluon' else '4,608'
  assert f'holds {counts} of its {size} values' in message, message
  assert 'diverged' in message and '\n' not in message
  if kind != 'gluon':  # a Gluon file has its own names
    assert repr(BAD_TENSOR) in message
  assert isinstance(e.value, ValueError)


def test_the_convert_cli_refuses_nonfinite_weights_and_writes_nothing(
    spec, variables, tmp_path, capsys):
  source = _write('safetensors', state_dict_with(spec, variables, np.inf),
                  spec, tmp_path)
  assert convert.main(['resnet20', str(source), str(tmp_path / 'out'),
                       'depths=(1,1,1)']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {source}: tensor '{BAD_TENSOR}' ")
  assert err.count('\n') == 1 and not (tmp_path / 'out').exists()


def test_a_negative_batch_norm_variance_is_refused(spec, variables, tmp_path):
  source = _write('safetensors', state_dict_with(
      spec, variables, -0.5, name='layer3.0.bn2.running_var'), spec, tmp_path)
  with pytest.raises(convert.NonFiniteWeights) as e:
    convert.load_weights(source, spec)
  assert str(e.value).startswith(
      f'{source}: BatchNorm variance batch_stats/stage3_block0/')
  assert 'has 1 negative values' in str(e.value)


def test_finite_weights_with_integer_counters_load(spec, variables):
  state_dict = state_dict_with(spec, variables, 0.25)
  state_dict['bn1.num_batches_tracked'] = np.array(7, np.int64)
  loaded = convert.load_weights(state_dict, spec)
  assert loaded['params']['stage2_block0']['conv1']['kernel'].shape == (
      3, 3, 16, 32)


def test_a_safetensors_file_cut_short_names_the_missing_bytes(
    spec, variables, tmp_path):
  path = _write('safetensors', state_dict_with(spec, variables, 1.0), spec,
                tmp_path)
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError) as e:
    convert.load_weights(path, spec)
  assert str(e.value).startswith(f'{path} is truncated: its safetensors '
                                 'header lists ')
  assert 'download it again' in str(e.value)


# ------------------------------------------------------------ init_from


def test_init_from_a_nonfinite_file_stops_before_compiling(
    spec, variables, tmp_path, capsys):
  path = _write('safetensors', state_dict_with(spec, variables, np.nan), spec,
                tmp_path)
  config = fault_config(init_from=str(path))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(e.value).startswith(
      f"config.init_from: {path}: tensor '{BAD_TENSOR}' (32, 16, 3, 3) "
      'holds 1 NaN')
  assert 'compiling' not in capsys.readouterr().out
  assert not list((tmp_path / 'run' / 'checkpoints').iterdir())
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()


def _convert_cli_output(source, out_dir):
  assert convert.main(['resnet20', str(source), str(out_dir),
                       'depths=(1,1,1)']) == 0
  return out_dir


def test_init_from_reads_what_the_convert_cli_writes(spec, variables,
                                                     tmp_path, capsys):
  source = _write('safetensors', state_dict_with(spec, variables, 0.25), spec,
                  tmp_path)
  out_dir = _convert_cli_output(source, tmp_path / 'converted')
  assert 'Restore with' in capsys.readouterr().out
  config = fault_config(init_from=str(out_dir))
  state = init_from.load_init_weights(config, spec, zero_state(variables))
  assert_same(dict(state), convert.load_weights(source, spec))


def _orbax_folder(tree, path):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
  return path


def test_init_from_a_checkpoint_folder_with_nan_names_the_array(
    spec, variables, tmp_path):
  bad = jax.tree.map(np.array, dict(variables))
  bad['batch_stats']['stage1_block0']['bn1']['mean'][3] = np.inf
  folder = _orbax_folder(bad, tmp_path / 'converted')
  config = fault_config(init_from=str(folder))
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, zero_state(variables))
  assert str(e.value).startswith(
      f"config.init_from: {folder}: tensor \"['batch_stats']['stage1_block0']"
      "['bn1']['mean']\" (16,) holds 0 NaN and 1 Inf")


def test_init_from_a_folder_whose_arrays_only_have_the_same_size_is_refused(
    spec, variables, tmp_path):
  """A (64, 10) head where (10, 64) belongs used to be reshaped silently."""
  wrong = jax.tree.map(np.array, dict(variables))
  wrong['params']['fc']['kernel'] = wrong['params']['fc']['kernel'].T.copy()
  folder = _orbax_folder(wrong, tmp_path / 'converted')
  config = fault_config(init_from=str(folder))
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, zero_state(variables))
  assert f'{folder} does not fit model ' in str(e.value)
  assert "params['fc']['kernel']: got (10, 64), expected (64, 10)" in str(
      e.value)
  # The classifier alone differs: skip_head loads the rest.
  config.init_from_skip_head = True
  state = init_from.load_init_weights(config, spec, zero_state(variables))
  assert_same(state['batch_stats'], variables['batch_stats'])


def test_init_from_a_folder_of_no_known_kind_lists_what_it_takes(
    spec, variables, tmp_path):
  folder = tmp_path / 'notes'
  folder.mkdir()
  (folder / 'README.txt').write_text('hi')
  config = fault_config(init_from=str(folder))
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, zero_state(variables))
  message = str(e.value)
  assert message.startswith(f'config.init_from: no checkpoint found in {folder}')
  assert 'a folder written by python -m flax_resnet.convert' in message
  # An orbax folder of something else is named as such.
  other = _orbax_folder({'weights': np.zeros(3)}, tmp_path / 'other')
  config.init_from = str(other)
  with pytest.raises(config_check.ConfigError,
                     match=r'holds no Flax params \(it holds weights\)'):
    init_from.load_init_weights(config, spec, zero_state(variables))


def test_init_from_a_url_naming_no_file_says_so(spec, variables):
  config = fault_config(init_from='https://example.com/')
  with pytest.raises(config_check.ConfigError) as e:
    init_from.load_init_weights(config, spec, zero_state(variables))
  assert str(e.value).startswith(
      "config.init_from: url 'https://example.com/' names no file")


def test_init_from_an_unreadable_cached_download_says_to_delete_it(
    spec, variables, tmp_path):
  """The bytes start like a torch pickle, so only loading finds them bad."""
  url = 'https://weights.example.invalid/r20.pth'
  pretrained.register(Weights('resnet20', 'TEST_BROKEN', url, None, None,
                              'user', num_classes=10))
  try:
    cached = pretrained.cache_path(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b'\x80\x02}q\x00(X\x01')  # a pickle cut off
    config = fault_config(init_from='TEST_BROKEN')
    with pytest.raises(config_check.ConfigError) as e:
      init_from.load_init_weights(config, spec, zero_state(variables))
  finally:
    pretrained.unregister('resnet20', 'TEST_BROKEN')
  message = str(e.value)
  assert f'{cached} is not a readable state_dict' in message
  assert message.endswith(f'It is the cached download of {url}: delete it to '
                          'download again.')


# -------------------------------------------------- a run that diverges


def test_divergence_before_any_checkpoint_says_nothing_was_saved(tmp_path):
  config = fault_config(learning_rate=1e36, warmup_steps=0,
                        schedule='constant')
  with pytest.raises(loop.NonFiniteLossError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert 'training diverged at step 2' in message, message
  assert (f'Nothing was saved: {tmp_path}/checkpoints holds no checkpoint'
          in message)
  assert 'intact' not in message and 'resume' not in message
  assert message.endswith('then rerun to start again from step 0.')
  assert not list((tmp_path / 'checkpoints').iterdir())


def test_init_from_a_workdir_its_checkpoints_folder_or_one_step(tmp_path):
  """Three ways to name a training run's weights; the step folder said 'no
  checkpoint found'."""
  source = tmp_path / 'source'
  config = fault_config(num_train_steps=2)
  loop.train_and_evaluate(config, str(source))
  spec = config_check.validate_config(config)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(source / 'checkpoints' / '2' / 'state')
  want = {'params': saved['params'], 'batch_stats': saved['batch_stats']}
  zeros = zero_state(want)
  for folder in (source, source / 'checkpoints', source / 'checkpoints' / '2'):
    config.init_from = str(folder)
    state = init_from.load_init_weights(config, spec, zeros)
    assert_same(dict(state), want)

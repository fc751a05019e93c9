"""Bad input gets a clear error naming the field and the fix; nothing is lost.

Cases already covered elsewhere are not repeated here (RELIABILITY.md lists
them all): config fields in test_train_steps.py, model overrides and input
shapes in test_model.py, datasets, splits and images in test_data.py,
state_dict keys and shapes in test_convert.py.

Runs that get as far as compiling use tests/fault_config.py (tiny resnet20 on
the offline digits), whose compiled steps the fault tests share through the
persistent compilation cache.
"""

import errno
import hashlib
import json
import logging
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
# orbax internals: where a full disk is simulated.
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.serialization import serialization
import pytest

from flax_resnet import convert
from flax_resnet import data as data_lib
from flax_resnet.model import ResNet
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import loop
from flax_resnet.train import optim
from flax_resnet.train import steps as steps_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / 'tests' / 'fault_config.py'


from fault_config import with_fields as fault_config  # tests/ is on sys.path


def file_digests(folder) -> dict[str, str]:
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def assert_nothing_written(workdir):
  """Failed before training: no checkpoint step, no metrics."""
  workdir = pathlib.Path(workdir)
  folder = workdir / 'checkpoints'
  assert not (folder.exists() and any(folder.iterdir())), list(
      folder.iterdir())
  assert not (workdir / 'metrics.jsonl').exists()


# ------------------------------------------------------------- the CLI


CLI_CASES = {
    # name: (arguments, exit code, strings the output must contain)
    'misspelt_config_key': (
        ['--config.batch_sise=3'], 1,
        ['batch_sise', 'Did you mean "batch_size"']),
    'config_value_of_the_wrong_type': (
        ['--config.batch_size=abc'], 1,
        ['--config.batch_size=abc', "invalid literal for int()"]),
    'missing_config_file': (
        ['--config=configs/no_such_config.py'], 1,
        ['configs/no_such_config.py', 'No such file or directory']),
    'unknown_model_name': (
        ['--config.model=resnet5O'], 1,
        ['error: config.model:', 'resnet50']),
    'stray_positional_argument': (
        ['resnet50'], 1, ["unexpected arguments: ['resnet50']"]),
}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  """Every CLI case at once: each is mostly Python start-up."""
  root = tmp_path_factory.mktemp('cli')
  procs = {
      name: subprocess.Popen(
          [sys.executable, 'train.py', *args, '--workdir', str(root / name)],
          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for name, (args, _, _) in CLI_CASES.items()}
  outcomes = {}
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    outcomes[name] = (proc.returncode, out, root / name)
  return outcomes


@pytest.mark.parametrize('name', sorted(CLI_CASES))
def test_cli_rejects_bad_flags_naming_them(name, cli_runs):
  rc, out, workdir = cli_runs[name]
  _, want_rc, needles = CLI_CASES[name]
  assert rc == want_rc, out[-3000:]
  for needle in needles:
    assert needle in out, out[-3000:]
  assert_nothing_written(workdir)


# ------------------------------------------------------------ config fields


def test_unknown_key_in_an_unlocked_config_is_named():
  # Configs built in Python may be unlocked; validation still refuses.
  config = fault_config()
  config.unlock()
  config.batch_sise = 3
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_config(config)
  message = str(e.value)
  assert message.startswith('config.batch_sise:'), message
  assert 'Did you misspell' in message and "'batch_size'" in message


@pytest.mark.parametrize('fields, needles', [
    ({'prefetch_batches': -1}, ['config.prefetch_batches',
                                'it must be >= 0']),
    ({'image_size': 0}, ['config.image_size', 'it must be in [1, 8192]']),
    ({'log_every_steps': -1}, ['config.log_every_steps',
                               'it must be >= 1']),
    ({'decay_factor': 2.0}, ['config.decay_factor', 'must be in (0, 1]']),
    ({'grad_clip_norm': -1.0}, ['config.grad_clip_norm', '(0: off)']),
], ids=['prefetch_batches', 'image_size', 'log_every_steps', 'decay_factor',
        'grad_clip_norm'])
def test_config_field_errors_name_the_field_and_fix(fields, needles):
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_config(fault_config(**fields))
  for needle in needles:
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize('fields, needles', [
    ({'reference': 'paper', 'reference_model': 'resnet21'},
     ["reference 'paper' has no entry for model 'resnet21'", 'resnet20',
      'set config.reference=None']),
    ({'reference': 'torchvision'},
     ["reference 'torchvision' has no entry for model 'resnet20'",
      'resnet50', 'set config.reference=None']),
], ids=['reference_model', 'reference'])
def test_layout_reference_without_the_model_fails_before_training(
    fields, needles, tmp_path):
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(fault_config(**fields), str(tmp_path))
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  assert_nothing_written(tmp_path)


def test_seed_out_of_range_is_named(tmp_path):
  with pytest.raises(ValueError, match=r'config.seed: -1 is out of range: '
                     r'it must be in \[0, 4294967296\)'):
    loop.train_and_evaluate(fault_config(seed=-1), str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


# ------------------------------------------------------------------ workdir


def test_workdir_below_a_regular_file_is_not_writable(tmp_path):
  # Tests run as root, which chmod cannot stop; a path below a regular file
  # cannot be created by anyone.
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  workdir = blocker / 'run'
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(fault_config(), str(workdir))
  message = str(e.value)
  assert f'--workdir {workdir} is not writable (Not a directory)' in message
  assert 'choose a folder you can write to' in message
  assert blocker.read_text() == 'not a folder'


def test_workdir_that_is_a_regular_file(tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('precious')
  with pytest.raises(config_check.ConfigError,
                     match=r'--workdir .* is not writable \(File exists\)'):
    loop.train_and_evaluate(fault_config(), str(workdir))
  assert workdir.read_text() == 'precious'


def test_uncreatable_compilation_cache_dir_warns_and_goes_on(tmp_path,
                                                             caplog):
  # Only a speed-up: a read-only home must not stop training.
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  before = jax.config.jax_compilation_cache_dir
  with caplog.at_level(logging.WARNING):
    loop.enable_compilation_cache(str(blocker / 'cache'))
  assert 'config.compilation_cache_dir=' in caplog.text, caplog.text
  assert 'cannot be created (Not a directory)' in caplog.text
  assert 'Set it to a writable folder, or to "" to turn it off' in caplog.text
  assert jax.config.jax_compilation_cache_dir == before


def test_a_metrics_line_cut_short_is_dropped_with_a_warning(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train_loss": 2.0}\n'
                  '{"step": 2, "train_loss": 1.5}\n'
                  '{"step": 3, "tra')  # disk full or killed mid-write
  with caplog.at_level(logging.WARNING):
    loop._truncate_metrics(path, 2)  # pylint: disable=protected-access
  assert [json.loads(line)['step'] for line in
          path.read_text().splitlines()] == [1, 2]
  assert 'dropping an unreadable record' in caplog.text


# ---------------------------------------------------------- full disk


def fail_json_writes(monkeypatch, after: int):
  """Run-metadata writes fail with ENOSPC after `after` succeeded."""
  handler = json_checkpoint_handler.JsonCheckpointHandler
  original = handler._save_fn  # pylint: disable=protected-access
  calls = []

  async def save_fn(self, item, directory):
    calls.append(directory)
    if len(calls) > after:
      raise OSError(errno.ENOSPC, 'No space left on device',
                    str(directory / 'metadata'))
    return await original(self, item, directory)

  monkeypatch.setattr(handler, '_save_fn', save_fn)


def fail_array_writes(monkeypatch, after: int):
  """Array writes fail as tensorstore reports a full disk (seen on tmpfs)."""
  original = serialization.async_serialize_from_host
  calls = []

  async def serialize(value, tspec, **kwargs):
    calls.append(tspec)
    if len(calls) > after:
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "params.fc.kernel/0" in OCDBT '
          'database: Failed to write 35465 bytes to file 15: No space left '
          "on device [os_error_code='28']")
    return await original(value, tspec, **kwargs)

  monkeypatch.setattr(serialization, 'async_serialize_from_host', serialize)


@pytest.mark.parametrize('failing_write', ['run_metadata', 'arrays'])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    failing_write, monkeypatch, tmp_path):
  if failing_write == 'run_metadata':
    fail_json_writes(monkeypatch, after=2)  # the data + meta items of step 2
  else:
    leaves = len(jax.tree.leaves(abstract_state()))
    fail_array_writes(monkeypatch, after=leaves)  # every array of step 2
  # keep_checkpoints=1: a successful step-4 save would delete step 2.
  config = fault_config(keep_checkpoints=1)
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert 'could not write checkpoint step 4' in message, message
  assert '(No space left on device)' in message
  assert 'the previous checkpoint (step 2) is intact' in message
  assert 'Free disk space' in message and 'rerun the same command' in message
  monkeypatch.undo()
  ckpt = checkpoint_lib.Checkpointer(tmp_path / 'checkpoints', keep=1,
                                     keep_best=False, async_save=False)
  assert ckpt.all_steps() == [2]
  _, data_state, step = ckpt.restore_latest(abstract_state(), meta_of(config))
  ckpt.close()
  assert step == 2 and data_state['next_batch'] == 2


# ------------------------------------------------------------ checkpoints


def abstract_state(config=None):
  config = config or fault_config()
  spec = config_check.validate_config(config)
  tx = optim.create_optimizer(config, optim.create_schedule(config, 1, 10))
  shape = (config.image_size, config.image_size, 3)
  return jax.eval_shape(
      lambda rng: steps_lib.create_train_state(ResNet(spec), tx, rng, shape),
      jax.random.PRNGKey(0))


def meta_of(config):
  return {'model': config.model,
          'spec': repr(config_check.validate_config(config)),
          'config': config.to_json_best_effort()}


def write_checkpoint(workdir, config, data_state, step=2):
  """A checkpoint as the loop writes it, of zeros shaped for `config`."""
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       abstract_state(config))
  ckpt = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints',
                                     keep=3, keep_best=False,
                                     async_save=False)
  ckpt.save(step, state, data_state, meta_of(config))
  ckpt.close()


def deeper():
  config = fault_config()
  config.model_overrides.depths = (2, 2, 2)
  return config


@pytest.mark.parametrize('other, needles', [
    (deeper, ['different architecture',
              'model_overrides.depths: (2, 2, 2) -> (1, 1, 1)']),
    (lambda: fault_config(num_classes=7, dataset='synthetic'),
     ['differently shaped train state', 'num_classes: 7 -> 10',
      '--config.init_from_skip_head=True']),
], ids=['deeper', 'other_num_classes'])
def test_checkpoint_of_another_architecture_is_refused(other, needles,
                                                       tmp_path):
  write_checkpoint(tmp_path, other(), {'next_batch': 2})
  before = file_digests(tmp_path / 'checkpoints')
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    loop.train_and_evaluate(fault_config(), str(tmp_path))
  message = str(e.value)
  assert 'checkpoint step 2' in message and 'is intact' in message
  for needle in needles:
    assert needle in message, message
  assert 'damaged' not in message
  assert 'Use a fresh --workdir' in message
  # No fallback, no restart from scratch, nothing overwritten.
  assert file_digests(tmp_path / 'checkpoints') == before


def test_resuming_with_another_data_order_is_refused(tmp_path):
  saved = data_lib.make_train_iterator(fault_config()).get_state()
  write_checkpoint(tmp_path, fault_config(), {**saved, 'next_batch': 2})
  before = file_digests(tmp_path / 'checkpoints')
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(fault_config(batch_size=16), str(tmp_path))
  message = str(e.value)
  assert 'batch_size: saved 32, now 16' in message, message
  assert 'Restore with the original config' in message
  assert file_digests(tmp_path / 'checkpoints') == before


def test_workdir_with_only_an_interrupted_save_starts_over_with_a_warning(
    tmp_path, caplog):
  # A run killed during its first save leaves no step, only a tmp folder.
  (tmp_path / '2.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  ckpt = checkpoint_lib.Checkpointer(tmp_path, keep=3, keep_best=False)
  with caplog.at_level(logging.WARNING):
    assert ckpt.restore_latest(abstract_state(), meta_of(fault_config())) is (
        None)
  ckpt.close()
  assert 'only interrupted saves (2.orbax-checkpoint-tmp)' in caplog.text
  assert 'starting from step 0' in caplog.text


# ------------------------------------------------------- init_from weights


def torch_state_dict(config):
  """torchvision-named numpy weights for the model `config` builds."""
  spec = config_check.validate_config(config)
  variables = jax.eval_shape(
      lambda: ResNet(spec).init(jax.random.PRNGKey(0),
                                jnp.zeros((1, 8, 8, 3)), train=False))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  return dict(convert.flax_to_torch(zeros, spec))


def save_safetensors(state_dict, path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  return str(path)


def test_init_from_a_missing_file(tmp_path):
  config = fault_config(init_from=str(tmp_path / 'resnet20.pth'))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'config.init_from:' in str(e.value)
  assert 'does not exist; give a torchvision .pth/.safetensors' in str(e.value)
  assert_nothing_written(tmp_path / 'run')


def test_init_from_a_workdir_without_checkpoints(tmp_path):
  (tmp_path / 'empty_run' / 'checkpoints').mkdir(parents=True)
  config = fault_config(init_from=str(tmp_path / 'empty_run'))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'config.init_from: no checkpoint found' in str(e.value)
  assert 'give a training workdir that holds checkpoints' in str(e.value)
  assert_nothing_written(tmp_path / 'run')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_init_from_a_file_that_is_not_a_state_dict(suffix, tmp_path):
  path = tmp_path / f'weights{suffix}'
  path.write_bytes(b'\x00garbage, not weights' * 8)
  config = fault_config(init_from=str(path))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert f'config.init_from: {path} is not a readable state_dict' in message
  assert 'give a torchvision .pth/.safetensors file' in message
  assert 'weights_only' not in message  # torch's advice to unpickle it anyway
  assert_nothing_written(tmp_path / 'run')


def test_init_from_state_dict_with_missing_and_unexpected_keys(tmp_path):
  state_dict = torch_state_dict(fault_config())
  del state_dict['layer2.0.bn1.running_var']
  state_dict['layer4.0.conv1.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  config = fault_config(init_from=save_safetensors(
      state_dict, tmp_path / 'w.safetensors'))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert "config.init_from:" in message and "model 'resnet20'" in message
  assert '1 missing key(s)' in message
  assert 'layer2.0.bn1.running_var' in message
  assert '1 unexpected key(s)' in message and 'layer4.0.conv1.weight' in message
  assert 'Fix:' in message
  assert_nothing_written(tmp_path / 'run')


def test_init_from_state_dict_with_wrong_shapes(tmp_path):
  wider = fault_config()
  wider.model_overrides.widths = (32, 64, 128)
  wider.model_overrides.stem_width = 32
  config = fault_config(init_from=save_safetensors(
      torch_state_dict(wider), tmp_path / 'wider.safetensors'))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert 'shape mismatch(es)' in message
  assert 'conv1.weight: got (32, 3, 3, 3), expected (16, 3, 3, 3)' in message
  assert 'fc.weight: got (10, 128), expected (10, 64)' in message
  assert_nothing_written(tmp_path / 'run')


def test_init_from_state_dict_with_another_head_names_skip_head(tmp_path):
  config = fault_config(init_from=save_safetensors(
      torch_state_dict(fault_config(num_classes=7, dataset='synthetic')),
      tmp_path / 'seven_classes.safetensors'))
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert 'fc.weight: got (7, 64), expected (10, 64)' in message
  assert 'config.init_from_skip_head=True' in message
  assert_nothing_written(tmp_path / 'run')


def test_layout_mismatch_in_training_is_grouped_and_names_config_fields(
    tmp_path):
  """Was one flat list ending 'set reference=None' (no field to set)."""
  config = fault_config(reference='paper', **{
      'model_overrides.shortcut': 'B', 'model_overrides.depths': (3, 3, 3)})
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  lines = str(e.value).splitlines()
  assert lines[1:3] == [
      '  strides, shortcuts and shapes:',
      '    stage 2 block 0: shortcut           projection here vs zero-pad in '
      'paper']
  assert ('    stage 2 block 0: parameters  14,528 here vs  13,952 in paper  '
          "(-576: shortcut 'A')") in lines
  assert lines[-2] == (
      "The preset resnet20 matches paper; this model differs from it in: "
      "shortcut 'A' (here shortcut 'B'). Try config.model=resnet20 and no "
      'model_overrides.')
  assert lines[-1].endswith('or set config.reference=None to skip the '
                            'reference check.')
  assert_nothing_written(tmp_path)


def test_unknown_dataset_error_names_every_kind_of_dataset(tmp_path):
  """The error listed synthetic and sklearn_digits but not folder:ROOT."""
  with pytest.raises(data_lib.DatasetNotFoundError) as e:
    data_lib.dataset_info(fault_config(dataset='my_photos',
                                       data_dir=str(tmp_path)))
  text = str(e.value)
  assert "config.dataset='my_photos' is not a TFDS dataset" in text
  for kind in ("'folder:ROOT'", "'synthetic'", "'sklearn_digits'"):
    assert kind in text, text

"""One run per workdir; folders that cannot hold checkpoints; saves that fail fast.

Issue 12: two runs in one workdir both exited 0 with interleaved metrics and
each other's checkpoints; a file or an immutable folder at WORKDIR/checkpoints
hung for 300 s on an orbax barrier after the error. Each case here is real:
real processes holding and dying with the lock, a real immutable folder
(chattr +i, which stops root too), a real symlink to a missing disk.
"""

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading

import jax.numpy as jnp
import pytest

from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import loop
from flax_resnet.train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


from fault_config import with_fields as fault_config  # tests/ is on sys.path


# A process that takes the lock, says so, and then waits (or blocks while
# writing its record, to stand for a kill during acquisition).
HOLDER = '''
import os, sys, time
from flax_resnet.train import workdir
if sys.argv[2] == 'stall_in_record':
  # Called once the flock is taken, to write the record: stop right there.
  os.pwrite = lambda *a: (print('locked, no record', flush=True),
                          time.sleep(600))
lock = workdir.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(600)
'''


class Holder:
  """A subprocess that holds (or is taking) the workdir lock."""

  def __init__(self, workdir, mode='hold'):
    self.proc = subprocess.Popen(
        [sys.executable, '-c', HOLDER, str(workdir), mode], cwd=REPO,
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, 'PYTHONPATH': str(REPO)})
    self.first_line = self.proc.stdout.readline().strip()

  def kill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.kill()


def refusal(workdir) -> str:
  with pytest.raises(workdir_lib.WorkdirBusyError) as e:
    workdir_lib.WorkdirLock(workdir).acquire()
  return str(e.value)


# ------------------------------------------------------------------ the lock


def test_second_lock_in_this_process_is_refused_naming_the_holder(tmp_path):
  with workdir_lib.WorkdirLock(tmp_path):
    message = refusal(tmp_path)
  assert f'workdir {tmp_path} is in use by another run' in message
  assert f'pid {os.getpid()} on host {socket.gethostname()}, started 20' in (
      message)
  assert 'choose another --workdir' in message


def test_lock_held_by_another_process_is_refused_then_free_after_it_dies(
    tmp_path, caplog):
  with Holder(tmp_path) as holder:
    assert holder.first_line == 'locked'
    message = refusal(tmp_path)
    assert f'pid {holder.proc.pid} on host {socket.gethostname()}' in message
    holder.kill()  # SIGKILL: no cleanup ran, its record is still there
  record = json.loads((tmp_path / '.lock').read_text())
  assert record['pid'] == holder.proc.pid
  with caplog.at_level(logging.WARNING):
    lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert lock.previous_holder['pid'] == holder.proc.pid
  assert 'taking over the workdir lock' in caplog.text
  assert 'ended without releasing it' in caplog.text
  lock.release()


def test_kill_during_lock_acquisition_leaves_nothing_stuck(tmp_path):
  with Holder(tmp_path, 'stall_in_record') as holder:
    assert holder.first_line == 'locked, no record'
    # It holds the flock but has not written who it is: refused all the same.
    assert 'a process that is starting up' in refusal(tmp_path)
    holder.kill()
  lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert lock.previous_holder is None  # nothing was written before the kill
  lock.release()


@pytest.mark.parametrize('left_behind', [
    b'', b'{"pid": 12', b'\x00\xff\xfe garbage', b'null', b'[]',
    b'{"pid": 999999999, "host": "gone", "started": "yesterday"}'],
    ids=['empty', 'cut_short', 'binary', 'null', 'list', 'dead_pid'])
def test_any_stale_lock_file_is_taken_over(left_behind, tmp_path):
  (tmp_path / '.lock').write_bytes(left_behind)
  lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
  lock.release()


def test_a_clean_release_leaves_no_holder_behind(tmp_path):
  workdir_lib.WorkdirLock(tmp_path).acquire().release()
  assert (tmp_path / '.lock').read_text() == ''
  lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert lock.previous_holder is None
  lock.release()


def test_train_and_evaluate_refuses_a_locked_workdir_before_compiling(
    tmp_path):
  with Holder(tmp_path) as holder:
    assert holder.first_line == 'locked'
    with pytest.raises(workdir_lib.WorkdirBusyError) as e:
      loop.train_and_evaluate(fault_config(), str(tmp_path))
    assert f'pid {holder.proc.pid}' in str(e.value)
  assert not (tmp_path / 'metrics.jsonl').exists()
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.slow
def test_two_train_py_runs_in_one_workdir_one_is_refused(tmp_path):
  runs = [subprocess.Popen(
      [sys.executable, 'train.py', '--config', 'tests/fault_config.py',
       '--workdir', str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  outcomes = [(r.wait(600), r.stdout.read()) for r in runs]
  codes = sorted(rc for rc, _ in outcomes)
  assert codes == [0, 1], outcomes
  refused_out = next(out for rc, out in outcomes if rc == 1)
  assert 'is in use by another run: pid' in refused_out, refused_out
  assert 'Traceback' not in refused_out
  steps = [json.loads(line)['step'] for line in
           (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert steps == sorted(steps) and steps[-1] == 24, steps  # no interleaving


# --------------------------------------------- folders that cannot hold saves


def start_error(workdir) -> str:
  # ConfigError or CheckpointError: both ValueErrors, one error: line in train.py.
  with pytest.raises(ValueError) as e:
    loop.train_and_evaluate(fault_config(), str(workdir))
  return str(e.value)


def test_a_file_in_place_of_the_checkpoints_folder(tmp_path):
  (tmp_path / 'checkpoints').write_text('precious')
  message = start_error(tmp_path)
  assert f'{tmp_path}/checkpoints is a file, not a folder' in message
  assert (tmp_path / 'checkpoints').read_text() == 'precious'
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_checkpoints_symlinked_to_a_vanished_disk(tmp_path):
  (tmp_path / 'checkpoints').symlink_to(tmp_path / 'mnt' / 'disk')
  message = start_error(tmp_path)
  assert 'is a symlink to' in message and 'which does not exist' in message
  assert 'a disk that is not mounted?' in message
  assert (tmp_path / 'checkpoints').is_symlink()


def test_checkpoints_symlinked_into_proc_where_even_root_cannot_write(
    tmp_path):
  (tmp_path / 'checkpoints').symlink_to('/proc/self')
  message = start_error(tmp_path)
  assert 'cannot hold checkpoints' in message, message


def test_metrics_file_replaced_by_a_folder(tmp_path):
  (tmp_path / 'metrics.jsonl').mkdir()
  message = start_error(tmp_path)
  assert 'metrics.jsonl is not a file (a folder stands in its place)' in (
      message)


@pytest.mark.parametrize('workdir', ['', '   '])
def test_an_empty_workdir_is_refused(workdir):
  assert '--workdir is empty' in start_error(workdir)


def test_unreadable_bytes_in_metrics_are_dropped_with_a_warning(tmp_path,
                                                                 caplog):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe\x00\x81binary\n'
                   b'{"step": 2, "loss": 1.0}\n')
  with caplog.at_level(logging.WARNING):
    loop._truncate_metrics(path, 5)  # pylint: disable=protected-access
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [
      1, 2]
  assert 'dropping an unreadable record' in caplog.text


def chattr(flag, path) -> bool:
  if shutil.which('chattr') is None:
    return False
  return subprocess.run(['chattr', flag, str(path)],
                        capture_output=True).returncode == 0


@pytest.fixture
def immutable(tmp_path):
  """Makes folders immutable (chattr +i: even root cannot add files)."""
  made = []

  def make(path):
    if not chattr('+i', path):
      pytest.skip('chattr +i is not supported on this filesystem')
    made.append(path)

  yield make
  for path in made:
    chattr('-i', path)


def test_an_immutable_checkpoints_folder_is_refused_at_start(tmp_path,
                                                             immutable):
  (tmp_path / 'checkpoints').mkdir()
  immutable(tmp_path / 'checkpoints')
  message = start_error(tmp_path)
  assert 'cannot hold checkpoints (Operation not permitted)' in message


def test_a_save_that_fails_mid_run_fails_fast_and_closes(tmp_path, immutable):
  """The folder turns immutable between two saves: no barrier wait."""
  folder = tmp_path / 'checkpoints'
  state = {'w': jnp.arange(4.0)}
  ckpt = checkpoint_lib.Checkpointer(folder, keep=3, keep_best=False)
  ckpt.save(2, state, {'next_batch': 2}, {'model': 'm'})
  ckpt.wait()
  immutable(folder)
  outcome = {}

  def save_then_close():
    try:
      ckpt.save(4, state, {'next_batch': 4}, {'model': 'm'})
      ckpt.close()
    except checkpoint_lib.CheckpointError as e:
      outcome['error'] = str(e)
      try:
        ckpt.close()
      except checkpoint_lib.CheckpointError:
        pass
    outcome['closed'] = True

  worker = threading.Thread(target=save_then_close, daemon=True)
  worker.start()
  worker.join(120)  # a hang check, not a timing: the old code waited 300 s
  assert outcome.get('closed'), 'the failed save did not return'
  assert 'could not write checkpoint step 4' in outcome['error']
  assert '(Operation not permitted)' in outcome['error']
  assert 'the previous checkpoint (step 2) is intact' in outcome['error']
  assert sorted(p.name for p in folder.iterdir()) == ['2']


# -------------------------------------------- run lengths that train nothing


def test_num_epochs_that_round_to_zero_steps(tmp_path):
  config = fault_config(num_train_steps=-1, num_epochs=0.001)
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert message.startswith('config.num_epochs=0.001 is 0 steps'), message
  assert 'train at least one step' in message
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_batch_norm_over_one_value_is_refused_before_compiling(tmp_path):
  # resnet20 at 4x4 ends on a 1x1 map: batch 1 gives BN one value a channel.
  config = fault_config(image_size=4, batch_size=1, eval_batch_size=1)
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  assert 'config.batch_size=1: the last feature map is 1x1' in str(e.value)
  assert 'one value per channel' in str(e.value)


@pytest.mark.slow
def test_train_py_exits_at_once_when_a_save_fails_mid_run(tmp_path,
                                                         immutable):
  """The checkpoints folder turns immutable while train.py runs.

  Before the fix the error was printed, then the process waited out an orbax
  barrier for a step folder that was never made (300 s, 294 lines).
  """
  run = subprocess.Popen(
      [sys.executable, 'train.py', '--config', 'tests/fault_config.py',
       '--workdir', str(tmp_path), '--config.num_train_steps=100000',
       '--config.checkpoint_every_steps=20', '--config.eval_every_steps=100000',
       '--config.log_every_steps=1000'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  folder = tmp_path / 'checkpoints'
  while not (folder / '20').is_dir():
    assert run.poll() is None, run.stdout.read()[-3000:]
  immutable(folder)
  try:
    rc = run.wait(150)  # a hang check: the old code waited 300 s after this
  except subprocess.TimeoutExpired:
    run.kill()
    pytest.fail('train.py hung after a failed save')
  out = run.stdout.read()
  assert rc == 1, out[-3000:]
  assert 'error: could not write checkpoint step' in out, out[-3000:]
  assert '(Operation not permitted)' in out
  assert 'step_directory_creation' not in out


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch,
                                                      caplog):
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_locks)
  with caplog.at_level(logging.WARNING):
    lock = workdir_lib.WorkdirLock(tmp_path).acquire()
  assert 'this filesystem has no file locks' in caplog.text
  lock.release()

"""Fault injection: kills, signals, damaged checkpoints, NaN, two processes.

Every run here is `python train.py --config tests/fault_config.py` (24 steps of
a tiny resnet20 on the real offline digits, a checkpoint every 2 steps), so
what is tested is what a user runs. The uninterrupted reference run keeps
every checkpoint, so each checkpoint a faulty run leaves behind is compared
bit for bit with the reference's state at the same step.

Subprocess start-up (imports) dominates, so the subprocess scenarios run in two
background threads (one process each at a time, one per core) while the
in-process tests run; each test then checks its scenario's outcome.
"""

import asyncio
import concurrent.futures
import functools
import gc
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import stop_handlers
from flax_resnet import data as data_lib
from flax_resnet.model import ResNet
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import loop
from flax_resnet.train import optim
from flax_resnet.train import parallel
from flax_resnet.train import signals
from flax_resnet.train import steps as steps_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TRAIN_PY = REPO / 'train.py'
CONFIG_FILE = REPO / 'tests' / 'fault_config.py'
TOTAL_STEPS = 24
STATE_PARTS = ('params', 'batch_stats', 'opt_state', 'step', 'rng')
# Generous: a cold launch compiles for ~15 s, slower with the cores shared.
LAUNCH_TIMEOUT = 240


def fault_config():
  sys.path.insert(0, str(CONFIG_FILE.parent))
  try:
    import fault_config as module  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return module.get_config()


# --------------------------------------------------------- subprocess runs


class Run:
  """One `python train.py` subprocess, its output in a log file.

  own_group: in a process group of its own, so that a signal can reach it
  and its input worker processes together, as Ctrl-C in a terminal does.
  """

  def __init__(self, workdir, log_path, *flags, own_group=False):
    self.log_path = pathlib.Path(log_path)
    self._log = open(self.log_path, 'w')
    self.proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), '--config', str(CONFIG_FILE),
         '--workdir', str(workdir), *flags],
        cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        env={**os.environ, 'PYTHONUNBUFFERED': '1'},
        start_new_session=own_group)

  def output(self) -> str:
    if not self._log.closed:
      self._log.flush()
    return self.log_path.read_text()

  def wait(self, timeout=LAUNCH_TIMEOUT) -> int:
    try:
      rc = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'train.py did not finish in {timeout} s:\n'
                           f'{self.output()[-3000:]}') from None
    self._log.close()
    return rc

  def alive(self) -> bool:
    return self.proc.poll() is None


def wait_until(predicate, run: Run, what: str, timeout=LAUNCH_TIMEOUT):
  """Polls `predicate` every 2 ms; fails if the run ends or time runs out."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if not run.alive():
      raise AssertionError(f'train.py exited (rc {run.proc.returncode}) '
                           f'before {what}:\n{run.output()[-3000:]}')
    time.sleep(0.002)
  run.proc.kill()
  raise AssertionError(f'timed out waiting for {what}:\n{run.output()[-3000:]}')


def step_dirs(workdir) -> set[int]:
  folder = pathlib.Path(workdir) / 'checkpoints'
  if not folder.is_dir():
    return set()
  return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}


def save_folders(workdir) -> set[tuple[str, int]]:
  """(name, inode) of the tmp folders of saves under way or interrupted."""
  try:
    with os.scandir(pathlib.Path(workdir) / 'checkpoints') as entries:
      return {(e.name, e.inode()) for e in entries
              if checkpoint_lib.TMP_SUFFIX in e.name}
  except FileNotFoundError:
    return set()


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
  records = [r for r in read_metrics(workdir) if 'train_loss' in r]
  steps = [r['step'] for r in records]
  assert len(steps) == len(set(steps)), f'steps logged twice: {steps}'
  return {r['step']: r['train_loss'] for r in records}


def logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  return max((json.loads(line)['step']
              for line in path.read_text().splitlines()), default=0)


def file_digests(folder) -> dict[str, str]:
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def snapshot(workdir, dest) -> pathlib.Path:
  """A copy of the checkpoints as a kill left them (later runs prune them)."""
  if (pathlib.Path(workdir) / 'checkpoints').exists():
    shutil.copytree(pathlib.Path(workdir) / 'checkpoints', dest)
  return dest


def copy_reference(reference_dir, steps, dest):
  """A workdir holding the reference run's checkpoints `steps` and metrics."""
  (dest / 'checkpoints').mkdir(parents=True)
  for step in steps:
    shutil.copytree(reference_dir / 'checkpoints' / str(step),
                    dest / 'checkpoints' / str(step))
  records = [r for r in read_metrics(reference_dir) if r['step'] <= max(steps)]
  (dest / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in records))


def truncate_largest_array_file(step_dir):
  largest = max((step_dir / 'state').rglob('d/*'), key=lambda p: p.stat(
      ).st_size)
  os.truncate(largest, largest.stat().st_size // 2)


def flip_a_byte(step_dir):
  largest = max((step_dir / 'state').rglob('d/*'), key=lambda p: p.stat(
      ).st_size)
  raw = bytearray(largest.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  largest.write_bytes(bytes(raw))


# -------------------------------------------------- scenarios (background)


def run_reference(root) -> pathlib.Path:
  """The uninterrupted run, checkpointing every step and keeping them all."""
  run = Run(root / 'reference', root / 'reference.log',
            '--config.checkpoint_every_steps=1',
            '--config.keep_checkpoints=100')
  assert run.wait() == 0, run.output()[-3000:]
  assert step_dirs(root / 'reference') == set(range(1, TOTAL_STEPS + 1))
  return root / 'reference'


def wait_for_moment(kind: str, rng: random.Random, run: Run, workdir) -> str:
  """Waits for the moment `kind` names; returns a description of it.

  Moments are bounded in steps, not seconds: a step of fault_config takes
  ~0.1 s on one core and much less on a fast one, so a wall-clock delay could
  let a run train to its end before the signal (the chain must stop short of
  step 24 every time).
  """
  if kind == 'startup':  # imports, compilation or the restore
    delay = rng.uniform(0.5, 10.0)
    deadline = time.time() + delay
    while time.time() < deadline and 'compiled the train step' not in (
        run.output()):
      assert run.alive(), f'run ended during startup:\n{run.output()[-3000:]}'
      time.sleep(0.002)
    waited = delay - max(0.0, deadline - time.time())
    return f'startup +{waited:.1f}s'
  if kind == 'saving':  # arrays are being written into a new tmp folder
    # (one left by an earlier kill is replaced when its step is saved again)
    stale = save_folders(workdir)

    def writing_arrays():
      try:
        return any(p.is_file() for name, _ in save_folders(workdir) - stale
                   for p in (workdir / 'checkpoints' / name).glob(
                       'state*/**/*'))
      except FileNotFoundError:  # a tmp folder renamed (finalized) meanwhile
        return False

    wait_until(writing_arrays, run, 'a save to write arrays')
    return 'mid-save'
  if kind == 'pruning':  # a step was just finalized, the oldest is deleted
    keep = fault_config().keep_checkpoints

    def new_step_with_old_to_prune():
      steps = step_dirs(workdir)
      return bool(steps - seen) and (len(steps) > keep or bool(seen - steps))

    seen = step_dirs(workdir)
    wait_until(new_step_with_old_to_prune, run, 'a step beyond the kept ones')
    delay = rng.uniform(0.0, 0.05)
    time.sleep(delay)
    return f'new step, pruning +{delay:.2f}s'
  if kind == 'training':  # a random step, at a random moment of the next one
    # metrics.jsonl may still hold steps a kill lost until the run truncates
    # it, so the two steps waited for are beyond anything logged so far.
    target = logged_steps(workdir) + rng.randint(2, 4)
    wait_until(lambda: logged_steps(workdir) >= target - 1, run,
               f'step {target - 1}')
    started = time.time()
    wait_until(lambda: logged_steps(workdir) >= target, run, f'step {target}')
    fraction = rng.random()
    time.sleep(fraction * min(time.time() - started, 0.2))
    return f'training, step {target} +{fraction:.2f} of a step'
  raise ValueError(kind)


def chain_scenario(root, plan, seed: int, damage_after=None) -> dict:
  """Interrupts a run as `plan` says, resuming each time, then to the end.

  plan: (signal, moment) pairs, e.g. (SIGKILL, 'saving'); shuffled with
  `seed`, which also draws the random delays. After the stop by signal
  `damage_after`, the newest checkpoint is damaged (an array file truncated),
  so the next run must fall back to an older one and write that step again.
  """
  workdir = root / 'run'
  rng = random.Random(seed)
  plan = list(plan)
  rng.shuffle(plan)
  stops = []
  for i, (signum, kind) in enumerate(plan):
    run = Run(workdir, root / f'launch{i}.log')
    when = wait_for_moment(kind, rng, run, workdir)
    assert run.alive(), f'run ended before {when}:\n{run.output()[-3000:]}'
    saving = save_folders(workdir)
    run.proc.send_signal(signum)
    rc = run.wait()
    stops.append({
        'signal': signum, 'when': when, 'rc': rc, 'output': run.output(),
        'logged_step': logged_steps(workdir), 'step_dirs': step_dirs(workdir),
        # A save was cut short if its tmp folder outlived the process.
        'mid_save': signum == signal.SIGKILL and bool(
            saving & save_folders(workdir)),
        'snapshot': snapshot(workdir, root / f'after_stop{i}')})
    if signum == damage_after:
      stops[-1]['damaged_step'] = max(step_dirs(workdir))
      truncate_largest_array_file(
          workdir / 'checkpoints' / str(stops[-1]['damaged_step']))
  final = Run(workdir, root / 'final.log')
  return {'workdir': workdir, 'stops': stops, 'final_rc': final.wait(),
          'final_output': final.output()}


SIGKILL_PLAN = [(signal.SIGKILL, kind)
                for kind in ('saving', 'pruning', 'training', 'startup')]
SIGNAL_PLAN = [(signal.SIGTERM, 'training'), (signal.SIGINT, 'training'),
               (signal.SIGKILL, 'saving')]


# Stops in the phases before and between steps (issue 20): (signal, moment,
# flags of that launch, the phase the message must name). The flags change
# nothing the run computes, so the final run still equals the reference.
NO_CACHE = '--config.compilation_cache_dir='  # an XLA compile of seconds
PHASE_PLAN = [
    (signal.SIGTERM, 'imports', (), 'startup'),
    # To the whole process group, as Ctrl-C: the worker must not die of it.
    (signal.SIGINT, 'pipeline start', ('--config.worker_count=1',),
     'starting the input pipeline'),
    (signal.SIGTERM, 'compile', (NO_CACHE,), 'compiling the train step'),
    # 45 eval batches and an uncached compile: seconds of evaluation.
    (signal.SIGINT, 'eval', (NO_CACHE, '--config.eval_batch_size=8'),
     'evaluation'),
]
EVAL_STEP = 12  # fault_config.eval_every_steps


def wait_for_phase(kind: str, run: Run, workdir) -> None:
  if kind == 'imports':  # train.py's handler is its first line; jax follows
    stop_handlers.wait_for_stop_handler(run.proc)
  elif kind == 'pipeline start':
    wait_until(lambda: 'starting the input pipeline (1 worker' in run.output(),
               run, 'the input pipeline to start')
  elif kind == 'compile':
    wait_until(lambda: 'compiling the train step' in run.output(), run,
               'the compile')
  elif kind == 'eval':  # the metrics of step 12 are written just before
    wait_until(lambda: logged_steps(workdir) >= EVAL_STEP, run,
               f'step {EVAL_STEP}')
  else:
    raise ValueError(kind)


def phase_scenario(root) -> dict:
  """Signals each phase of PHASE_PLAN in turn, then runs to the end."""
  workdir = root / 'run'
  stops = []
  for i, (signum, kind, flags, phase) in enumerate(PHASE_PLAN):
    run = Run(workdir, root / f'launch{i}.log', *flags, own_group=True)
    wait_for_phase(kind, run, workdir)
    sent = time.time()
    os.killpg(run.proc.pid, signum)
    rc = run.wait()
    stops.append({'signal': signum, 'kind': kind, 'phase': phase, 'rc': rc,
                  'seconds': time.time() - sent, 'output': run.output(),
                  'step_dirs': step_dirs(workdir),
                  'logged_step': logged_steps(workdir),
                  'snapshot': snapshot(workdir, root / f'after_stop{i}')})
  final = Run(workdir, root / 'final.log')
  return {'workdir': workdir, 'stops': stops, 'final_rc': final.wait(),
          'final_output': final.output()}


def input_worker_kill_scenario(root) -> dict:
  """SIGKILL one of the two input worker processes after step 3."""
  import psutil  # pylint: disable=g-import-not-at-top
  workdir = root / 'run'
  run = Run(workdir, root / 'run.log', '--config.worker_count=2')
  wait_until(lambda: logged_steps(workdir) >= 3, run, 'step 3')
  workers = [p for p in psutil.Process(run.proc.pid).children()
             if 'resource_tracker' not in ' '.join(p.cmdline())]
  assert len(workers) == 2, [p.cmdline() for p in workers]
  workers[0].kill()
  rc = run.wait()
  return {'rc': rc, 'output': run.output(), 'workdir': workdir,
          'logged_step': logged_steps(workdir),
          'step_dirs': step_dirs(workdir)}


def nan_scenario(root, reference_dir) -> dict:
  """Resume the reference's step 12 with a learning rate that explodes."""
  copy_reference(reference_dir, (10, 12), root)
  before = file_digests(root / 'checkpoints')
  run = Run(root, root / 'nan.log', '--config.learning_rate=1e30',
            '--config.schedule=constant', '--config.warmup_steps=0')
  return {'rc': run.wait(), 'output': run.output(), 'before': before,
          'after': file_digests(root / 'checkpoints'),
          'step_dirs': step_dirs(root)}


class Scenarios:
  """The subprocess scenarios on two threads: one train.py per core.

  In submission order, each on the first free thread: the reference run, the
  SIGKILL chain, the NaN run (after the reference), the signal chain, the
  phase stops, the input worker kill.
  """

  def __init__(self, root: pathlib.Path):
    for name in ('reference', 'sigkill', 'signals', 'nan', 'phases',
                 'worker_kill'):
      (root / name).mkdir()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    self._pool = pool
    self.reference = pool.submit(run_reference, root / 'reference')
    self.sigkill = pool.submit(chain_scenario, root / 'sigkill', SIGKILL_PLAN,
                               seed=6)
    self.nan = pool.submit(
        lambda: nan_scenario(root / 'nan', self.reference.result()))
    self.signals = pool.submit(chain_scenario, root / 'signals', SIGNAL_PLAN,
                               seed=15, damage_after=signal.SIGTERM)
    self.phases = pool.submit(phase_scenario, root / 'phases')
    self.worker_kill = pool.submit(input_worker_kill_scenario,
                                   root / 'worker_kill')
    self._states = {}

  def reference_dir(self) -> pathlib.Path:
    return self.reference.result()

  def reference_state(self, step: int):
    if step not in self._states:
      self._states[step] = restore_step(
          self.reference_dir() / 'checkpoints', step)[0]
    return self._states[step]

  def reference_losses(self) -> dict[int, float]:
    return train_losses(self.reference_dir())

  def finish(self):
    self._pool.shutdown(wait=True)


@pytest.fixture(scope='module')
def scenarios(tmp_path_factory):
  # Builds the digits dataset once, before several processes could race to.
  data_lib.dataset_info(fault_config())
  started = Scenarios(tmp_path_factory.mktemp('faults'))
  yield started
  started.finish()


# ------------------------------------------------- in-process verification


@functools.lru_cache(maxsize=None)
def abstract_state_and_meta():
  """What the loop restores into, built the way the loop builds it."""
  config = fault_config()
  spec = config_check.validate_config(config)
  tx = optim.create_optimizer(config, optim.create_schedule(
      config, 1, config.num_train_steps))
  shape = (config.image_size, config.image_size, 3)
  state = jax.eval_shape(functools.partial(
      steps_lib.create_train_state, ResNet(spec), tx, image_shape=shape),
                         jax.random.PRNGKey(0))
  replicated = parallel.replicated(parallel.create_mesh())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  return abstract, {'model': config.model, 'spec': repr(spec)}


def checkpointer(folder) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(folder, keep=100, keep_best=False,
                                     async_save=False)


def restore_step(folder, step: int):
  """(state as numpy, data_state) of one step; raises if damaged."""
  abstract, meta = abstract_state_and_meta()
  ckpt = checkpointer(folder)
  try:
    state, data_state = ckpt.restore(step, abstract, meta)
  finally:
    ckpt.close()
  return jax.tree.map(np.asarray, state), data_state


def assert_states_equal(got, want, context: str):
  for part in STATE_PARTS:
    flat_got = jax.tree_util.tree_flatten_with_path(getattr(got, part))[0]
    flat_want = jax.tree_util.tree_flatten_with_path(getattr(want, part))[0]
    assert len(flat_got) == len(flat_want), (context, part)
    for (path, a), (_, b) in zip(flat_got, flat_want):
      np.testing.assert_array_equal(
          a, b, err_msg=f'{context}: {part}{jax.tree_util.keystr(path)}')


def check_every_checkpoint(folder, scenarios, context: str):
  """Each step on disk restores to the reference state or is skipped cleanly.

  Also: restore_latest picks the newest step, or None (start from step 0) when
  the run was stopped before its first checkpoint was finished. Returns the
  steps skipped as damaged.
  """
  steps = checkpointer(folder).all_steps() if folder.exists() else []
  damaged = []
  for step in steps:
    try:
      state, data_state = restore_step(folder, step)
    except checkpoint_lib.DamagedCheckpointError:
      # Only a kill while orbax prunes an old step can leave one half gone;
      # a kill never damages the newest step.
      assert step != steps[-1], f'{context}: newest step {step} is damaged'
      damaged.append(step)
      continue
    assert data_state['next_batch'] == step, (context, step, data_state)
    assert_states_equal(state, scenarios.reference_state(step),
                        f'{context}, step {step}')
  if folder.exists():
    abstract, meta = abstract_state_and_meta()
    ckpt = checkpointer(folder)
    latest = ckpt.restore_latest(abstract, meta)
    ckpt.close()
    assert (latest[2] if latest else None) == (steps[-1] if steps else None)
  return damaged


def assert_final_equals_reference(workdir, scenarios, context: str):
  state, _ = restore_step(workdir / 'checkpoints', TOTAL_STEPS)
  assert_states_equal(state, scenarios.reference_state(TOTAL_STEPS), context)
  assert train_losses(workdir) == scenarios.reference_losses()


# ------------------------------------------------------ damaged checkpoints


DAMAGE = {
    'truncated_array_file': truncate_largest_array_file,
    'flipped_byte_in_array_file': flip_a_byte,
    'deleted_array_metadata': lambda d: (d / 'state' / '_METADATA').unlink(),
    'deleted_iterator_state': lambda d: shutil.rmtree(d / 'data'),
    'deleted_run_metadata': lambda d: shutil.rmtree(d / 'meta'),
    'garbled_run_metadata': lambda d: (d / 'meta' / 'metadata').write_text(
        '{"model": '),
    'emptied_step_folder': lambda d: [shutil.rmtree(d), d.mkdir()],
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_a_warning(
    damage, scenarios, tmp_path, caplog):
  copy_reference(scenarios.reference_dir(), (20, 22, 24), tmp_path)
  DAMAGE[damage](tmp_path / 'checkpoints' / '24')
  abstract, meta = abstract_state_and_meta()
  ckpt = checkpointer(tmp_path / 'checkpoints')
  with caplog.at_level('WARNING'):
    state, data_state, step = ckpt.restore_latest(abstract, meta)
  ckpt.close()
  if damage == 'truncated_array_file':
    # TensorStore's reason, naming the array, not orbax's dump of its spec.
    assert 'unreadable (ValueError: OUT_OF_RANGE: Error reading "' in (
        caplog.text), caplog.text
    assert 'TensorStore details' not in caplog.text
  assert step == 22 and data_state['next_batch'] == 22
  assert_states_equal(jax.tree.map(np.asarray, state),
                      scenarios.reference_state(22), damage)
  assert 'checkpoint step 24' in caplog.text, caplog.text
  assert 'damaged' in caplog.text
  # Kept for inspection, out of the way of the step the run writes again.
  assert (tmp_path / 'checkpoints.damaged' / '24').is_dir()
  assert step_dirs(tmp_path) == {20, 22}


def test_init_from_a_workdir_skips_a_damaged_step_and_changes_nothing(
    scenarios, tmp_path, caplog):
  """config.init_from=WORKDIR reads another run: it falls back, moves nothing.

  (Before: orbax's exception and ~70 tracebacks, exit 1.)
  """
  source = tmp_path / 'source'
  copy_reference(scenarios.reference_dir(), (20, 22, 24), source)
  DAMAGE['truncated_array_file'](source / 'checkpoints' / '24')
  before = file_digests(source)
  config = fault_config()
  config.init_from = str(source)
  config.num_train_steps = 2
  with caplog.at_level('INFO'):
    result = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result.status == 'completed' and result.step == 2
  assert 'checkpoint step 24 in' in caplog.text, caplog.text
  assert 'unreadable (ValueError: OUT_OF_RANGE: Error reading "' in (
      caplog.text)
  assert 'initial weights from checkpoint step 22 in' in caplog.text
  assert file_digests(source) == before
  assert not (source / 'checkpoints.damaged').exists()


def test_after_a_failed_read_only_orbax_abandoned_reads_go_unreported(
    monkeypatch):
  """The filter a failed array read installs drops nothing else.

  (The chain in test_sigterm_and_sigint... checks train.py's output after a
  truncated array file: before the filter, ~60 tracebacks followed the
  warning.)
  """
  reports = []
  monkeypatch.setattr(sys, 'unraisablehook', reports.append)
  checkpoint_lib._drop_abandoned_reads()
  checkpoint_lib._drop_abandoned_reads()  # once is enough: not wrapped twice
  closed = asyncio.new_event_loop()
  closed.close()

  class CallsTheClosedLoop:  # a TensorStore callback into orbax's loop

    def __del__(self):
      closed.call_soon_threadsafe(print)

  class Broken:

    def __del__(self):
      raise RuntimeError('a real bug')

  CallsTheClosedLoop()
  Broken()
  assert [str(r.exc_value) for r in reports] == ['a real bug']


def test_after_a_failed_read_asyncio_drops_only_orbax_unretrieved_reads(
    monkeypatch, caplog):
  """An abandoned orbax read task, collected unawaited, is not logged.

  asyncio logs 'Task exception was never retrieved' for it, with the whole
  traceback (seen in CI after a truncated array file); any other task's
  lost exception is still logged.
  """
  monkeypatch.setattr(logging.getLogger('asyncio'), 'filters', [])
  monkeypatch.setattr(sys, 'unraisablehook', lambda report: None)
  checkpoint_lib._drop_abandoned_reads()
  checkpoint_lib._drop_abandoned_reads()  # one filter, not two
  assert len(logging.getLogger('asyncio').filters) == 1
  namespace = {}
  source = ('async def async_deserialize():\n'
            '  raise ValueError("OUT_OF_RANGE: Error reading")\n'
            'async def my_task():\n'
            '  raise ValueError("a real bug")\n')
  exec(compile(source, os.path.join(  # pylint: disable=exec-used
      'site-packages', 'orbax', 'checkpoint', '_src', 'serialization',
      'serialization.py'), 'exec'), namespace)
  loop = asyncio.new_event_loop()
  try:
    for name in ('async_deserialize', 'my_task'):
      task = loop.create_task(namespace[name]())
      loop.run_until_complete(asyncio.wait([task]))
      del task  # unretrieved: asyncio reports it when it is collected
      gc.collect()
  finally:
    loop.close()
  lost = [r.getMessage() for r in caplog.records
          if r.getMessage().startswith('Task exception was never retrieved')]
  assert len(lost) == 1 and 'my_task()' in lost[0], lost


def test_every_checkpoint_damaged_is_a_clear_error(scenarios, tmp_path):
  copy_reference(scenarios.reference_dir(), (20, 22, 24), tmp_path)
  for step, damage in zip((20, 22, 24), ('truncated_array_file',
                                         'deleted_run_metadata',
                                         'flipped_byte_in_array_file')):
    DAMAGE[damage](tmp_path / 'checkpoints' / str(step))
  before = file_digests(tmp_path / 'checkpoints')
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    loop.train_and_evaluate(fault_config(), str(tmp_path))
  message = str(e.value)
  assert 'every checkpoint' in message, message
  assert 'Refusing to start from scratch' in message
  for step in (20, 22, 24):
    assert f'step {step}:' in message
  # Nothing was moved, deleted or overwritten.
  assert file_digests(tmp_path / 'checkpoints') == before
  assert not (tmp_path / 'checkpoints.damaged').exists()


def test_nonfinite_parameters_with_a_finite_loss_are_never_saved(scenarios,
                                                                 tmp_path):
  # lr=1e10: step 14's loss is still finite (~1e20) but its update overflows
  # the parameters, which the check before every save catches.
  copy_reference(scenarios.reference_dir(), (10, 12), tmp_path)
  before = file_digests(tmp_path / 'checkpoints')
  config = fault_config()
  config.learning_rate = 1e10
  config.schedule, config.warmup_steps = 'constant', 0
  with pytest.raises(loop.NonFiniteLossError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert 'parameters are NaN/Inf at step 14; not saving' in message, message
  assert 'config.learning_rate' in message and 'intact' in message
  assert file_digests(tmp_path / 'checkpoints') == before
  assert step_dirs(tmp_path) == {10, 12}


# ---------------------------------------------------------- kills & signals


def check_chain_end(outcome, scenarios, context):
  assert max(stop['logged_step'] for stop in outcome['stops']) < TOTAL_STEPS
  assert outcome['final_rc'] == 0, outcome['final_output'][-3000:]
  assert 'completed at step 24/24' in outcome['final_output']
  # Final params, batch_stats, opt_state, step and rng, bit for bit; and the
  # logged loss of every step, each logged once.
  assert_final_equals_reference(outcome['workdir'], scenarios, context)


def check_kill(stop, scenarios):
  assert stop['rc'] == -signal.SIGKILL, stop['output'][-3000:]
  # What the kill left restores to the reference state, step by step; the
  # tmp folder of a save cut short is not a step and is ignored.
  stop['skipped'] = check_every_checkpoint(stop['snapshot'], scenarios,
                                           stop['when'])
  if stop['when'] == 'mid-save':
    assert stop['mid_save'], f'the save finished before the kill: {stop}'


def test_sigkill_at_random_moments_resumes_bit_identically(scenarios):
  outcome = scenarios.sigkill.result()
  for stop in outcome['stops']:
    check_kill(stop, scenarios)
  check_chain_end(outcome, scenarios, 'after kills')
  print('kills (moment, last logged step, damaged steps skipped):',
        [(s['when'], s['logged_step'], s['skipped']) for s in outcome['stops']])


def test_sigterm_and_sigint_checkpoint_exit_0_and_resume_exactly(scenarios):
  outcome = scenarios.signals.result()
  stopped_at = []
  next_outputs = [s['output'] for s in outcome['stops'][1:]] + [
      outcome['final_output']]
  for stop, next_output in zip(outcome['stops'], next_outputs):
    if 'damaged_step' in stop:
      # The run after it skipped the damaged step with a warning naming it,
      # moved it aside and wrote that step again (checked bit for bit below).
      damaged = stop['damaged_step']
      assert f'checkpoint step {damaged} in' in next_output, next_output
      assert f'moved damaged checkpoint step {damaged}' in next_output
      assert 'Traceback' not in next_output, next_output
      resumed = int(next_output.split('resumed from step ')[1].split()[0])
      assert resumed < damaged
    if stop['signal'] == signal.SIGKILL:
      check_kill(stop, scenarios)
      continue
    out = stop['output']
    assert stop['rc'] == 0, out[-3000:]
    assert f'stopping early (signal {int(stop["signal"])})' in out, out[-3000:]
    step = int(out.split('checkpoint at step ')[1].split()[0])
    assert f'== preempted at step {step}/24' in out
    # The checkpoint holds the step the signal interrupted, not an older one.
    assert max(stop['step_dirs']) == step == stop['logged_step']
    state, data_state = restore_step(stop['snapshot'], step)
    assert data_state['next_batch'] == step
    assert_states_equal(state, scenarios.reference_state(step), stop['when'])
    stopped_at.append(step)
  assert len(stopped_at) == 2
  check_chain_end(outcome, scenarios, 'after signals')
  print('stops:', [(s['signal'], s['when'], s['logged_step'])
                   for s in outcome['stops']])


# Signal to process exit. The run itself stops in < 0.1 s of Python, or at
# the end of an uncached XLA compile (~2 s here); the rest is closing a worker
# process still starting up and the interpreter's teardown in C (~3-5 s, as
# after a completed run), all slower on 2 cores shared with other tests.
STOP_SECONDS = 30


def test_signals_stop_every_phase_within_seconds_and_resume_exactly(
    scenarios):
  """Issue 20: before, a signal was read only after a step (SIGTERM during
  startup killed the run, rc -15; a stop during the eval trained a step
  more), and nothing but SIGKILL stopped a pipeline that never started."""
  outcome = scenarios.phases.result()
  for stop in outcome['stops']:
    out = stop['output']
    context = f'{stop["kind"]}: {out[-3000:]}'
    assert stop['rc'] == 0, context
    assert stop['seconds'] < STOP_SECONDS, (stop['seconds'], context)
    assert (f'stopping early (signal {int(stop["signal"])}) during '
            f'{stop["phase"]}: ') in out, context
    assert 'Traceback' not in out and 'leaked' not in out, context
    if stop['kind'] == 'eval':
      # The step evaluated is saved, no step more is trained.
      assert f'checkpoint at step {EVAL_STEP} written' in out, context
      assert max(stop['step_dirs']) == EVAL_STEP == stop['logged_step']
      state, data_state = restore_step(stop['snapshot'], EVAL_STEP)
      assert data_state['next_batch'] == EVAL_STEP
      assert_states_equal(state, scenarios.reference_state(EVAL_STEP),
                          'stopped during evaluation')
    else:
      assert 'nothing trained yet, nothing to save' in out, context
      assert not stop['step_dirs'], context
  check_chain_end(outcome, scenarios, 'after phase stops')
  print('seconds from signal to exit:', [
      (s['kind'], round(s['seconds'], 1)) for s in outcome['stops']])


def test_a_killed_input_worker_is_one_error_line_and_loses_no_step(
    scenarios):
  """Issue 20: before, grain's RuntimeError traceback; the steps trained
  since the last checkpoint were lost. (The segments the worker was filling:
  test_segments_a_dead_worker_was_filling_are_unlinked.)"""
  outcome = scenarios.worker_kill.result()
  out = outcome['output']
  assert outcome['rc'] == 1, out[-3000:]
  error = out[out.index('error: '):]
  assert error.startswith('error: an input worker process died (killed by '
                          'signal 9 (SIGKILL)'), error
  assert 'Traceback' not in out, out[-3000:]
  step = max(outcome['step_dirs'])
  assert step == outcome['logged_step'], (outcome, out[-3000:])
  assert (f'Checkpoint at step {step} written' in error or
          f'Nothing trained since the checkpoint at step {step}' in error)
  state, _ = restore_step(outcome['workdir'] / 'checkpoints', step)
  assert_states_equal(state, scenarios.reference_state(step),
                      'after the worker died')


def test_segments_a_dead_worker_was_filling_are_unlinked(tmp_path,
                                                        monkeypatch):
  """A SIGKILLed worker's in-flight batch: only its noted name knows it."""
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import worker_memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(worker_memory, '_folder', str(tmp_path))
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  orphan = shared_memory.SharedMemory(create=True, size=64)
  orphan.close()  # the dead worker's: mapped by no one
  handed_over = shared_memory.SharedMemory(create=True, size=64)  # mapped here
  of_a_live_worker = shared_memory.SharedMemory(create=True, size=64)
  of_a_live_worker.close()
  (tmp_path / str(dead_pid)).write_text(f'{orphan.name}\n{handed_over.name}')
  (tmp_path / str(os.getpid())).write_text(of_a_live_worker.name)
  try:
    worker_memory.release_shared_memory()
    names = set(os.listdir('/dev/shm'))
    assert orphan.name.lstrip('/') not in names
    assert handed_over.name.lstrip('/') in names
    assert of_a_live_worker.name.lstrip('/') in names
    assert not (tmp_path / str(dead_pid)).exists()
  finally:
    handed_over.close()
    handed_over.unlink()
    shared_memory.SharedMemory(of_a_live_worker.name).unlink()


SEGMENT_HELD_AT_EXIT = """
import sys, threading
import numpy as np
from multiprocessing import shared_memory
from grain._src.python.ipc import shared_memory_array
from flax_resnet.data import worker_memory
if sys.argv[1] == 'pipeline':
  worker_memory.segments_folder()  # what a pipeline with workers does
made = shared_memory.SharedMemory(create=True, size=4 * 96)  # a worker's
batch = shared_memory_array.SharedMemoryArray.from_metadata(
    shared_memory_array.SharedMemoryArrayMetadata(made.name, (96,), 'float32'))
batch.unlink_on_del()
made.close()
print(made.name, flush=True)
held = threading.Event()
def hold(batch):  # a thread blocked with a batch when the program ends
  held.set()
  threading.Event().wait()
threading.Thread(target=hold, args=(batch,), daemon=True).start()
del batch
held.wait()
"""


@pytest.mark.parametrize('pipeline', [True, False])
def test_a_batch_still_held_at_exit_leaves_no_segment_and_no_warning(
    pipeline):
  """A batch a thread still holds at exit is never deleted: Python's
  resource tracker then warned of a "leaked shared_memory object" (1 in 4
  loaded quickstart runs with workers). Without a pipeline (the control),
  the tracker still warns: the sweep is what stops it."""
  run = subprocess.run(
      [sys.executable, '-c', SEGMENT_HELD_AT_EXIT,
       'pipeline' if pipeline else 'none'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert run.returncode == 0, run.stderr[-3000:]
  name = run.stdout.split()[0]
  assert not os.path.exists('/dev/shm' + name)
  if pipeline:
    assert 'leaked' not in run.stderr and 'Traceback' not in run.stderr, (
        run.stderr[-3000:])
  else:
    assert 'leaked shared_memory objects' in run.stderr, run.stderr[-3000:]


def test_a_vanished_batch_segment_is_the_dead_workers_error(tmp_path,
                                                           monkeypatch):
  """A CI run once saw the parent fail opening a killed worker's batch
  (FileNotFoundError on /psm_...) before grain's "worker terminated": it was
  reported as a missing path under config.data_dir."""
  from flax_resnet.data import pipeline  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import worker_memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(worker_memory, '_folder', str(tmp_path))
  vanished = FileNotFoundError(2, 'No such file or directory', '/psm_0a1b2c')
  lost = pipeline.input_worker_error(vanished)
  assert str(lost).startswith(
      'a batch of the input worker processes was lost: its shared memory '
      '/psm_0a1b2c is gone (a worker process died, or something cleared '
      '/dev/shm).'), lost
  other, worker = (subprocess.Popen(['sleep', '600']) for _ in range(2))
  try:
    # Another dead worker, which never made that segment: not its death.
    (tmp_path / str(other.pid)).write_text('/psm_ffffff')
    other.send_signal(signal.SIGTERM)
    (tmp_path / str(worker.pid)).write_text('/psm_999999\n/psm_0a1b2c')
    worker.kill()  # not reaped: a zombie whose status /proc still holds
    deadline = time.time() + 30
    while (worker_memory.dead_worker_exit_code('/psm_0a1b2c') is None or
           worker_memory.dead_worker_exit_code('/psm_ffffff') is None):
      assert time.time() < deadline, 'the killed process never became a zombie'
      time.sleep(0.01)
    assert worker_memory.dead_worker_exit_code('/psm_ffffff') == -signal.SIGTERM
    died = pipeline.input_worker_error(vanished)
    assert isinstance(died, data_lib.InputWorkerError)
    assert str(died).startswith('an input worker process died (killed by '
                                'signal 9 (SIGKILL)'), died
    assert str(pipeline.input_worker_error(FileNotFoundError(
        2, 'No such file or directory', '/psm_123456'))).startswith(
            'a batch of the input worker processes was lost'), (
                'a segment no dead worker noted')
  finally:
    for process in (other, worker):
      process.wait()
  assert pipeline.input_worker_error(
      FileNotFoundError(2, 'No such file or directory', '/data/x.tfrecord')
  ) is None


def _stop_signal_masks(pid: int) -> dict[str, int]:
  """SIGINT's and SIGTERM's bits of process `pid`'s blocked and ignored
  masks, right now."""
  stop_bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
  with open(f'/proc/{pid}/status') as status:
    return {key: int(value, 16) & stop_bits for key, value in (
        line.split(':', 1) for line in status)
            if key in ('SigBlk', 'SigIgn')}


def _stop_signals_left_alone(pid: int) -> bool:
  """SIGINT and SIGTERM blocked or ignored in process `pid` right now."""
  masks = _stop_signal_masks(pid)
  left_alone = masks['SigBlk'] | masks['SigIgn']
  return all(left_alone & (1 << (sig - 1))
             for sig in (signal.SIGINT, signal.SIGTERM))


@pytest.mark.parametrize('pipeline', ['train', 'eval'])
def test_input_workers_never_take_a_stop_signal_even_while_starting(pipeline):
  """Before, a worker started with Python's default SIGINT handling until
  its init function ran (~1 s of imports): a Ctrl-C meanwhile printed its
  KeyboardInterrupt traceback under the run's own clean stop. Sampled from
  the worker's first moments until its first batch is out."""
  import psutil  # pylint: disable=g-import-not-at-top
  config = fault_config()
  config.worker_count = 1
  if pipeline == 'train':
    iterator = data_lib.make_train_iterator(config)
    first = lambda: next(iterator)
  else:
    iterator = data_lib.make_eval_iterator(config, passes=True)
    one_pass = iterator.one_pass()  # kept: a pass dropped closes the workers
    first = lambda: next(one_pass)
  before = {child.pid for child in psutil.Process().children()}
  got = concurrent.futures.ThreadPoolExecutor(1).submit(first)
  samples = {}
  try:
    while not got.done():
      for child in psutil.Process().children():
        try:
          if (child.pid not in before and
              '--multiprocessing-fork' in child.cmdline()):
            samples.setdefault(child.pid, []).append(
                _stop_signals_left_alone(child.pid))
        except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
          pass
      time.sleep(0.001)
    assert got.result()['image'].shape[0] > 0
    masks_after_start = {pid: _stop_signal_masks(pid) for pid in samples}
  finally:
    iterator.close()
  assert len(samples) == 1, samples
  [(pid, worker_samples)] = samples.items()
  assert len(worker_samples) > 10, worker_samples  # its start was watched
  assert all(worker_samples), worker_samples
  # Once started: ignored, no longer blocked (what it starts inherits that).
  assert masks_after_start[pid] == {'SigBlk': 0, 'SigIgn': (
      1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))}, (
          masks_after_start)


def test_a_stop_during_the_restore_names_the_checkpoints_kept(
    tmp_path, caplog, monkeypatch):
  """Before, a run resumed from step 2 and stopped while restoring said
  "nothing trained yet", as if the workdir had no checkpoint."""
  workdir = str(tmp_path / 'run')
  assert loop.train_and_evaluate(fault_config(), workdir,
                                 stop_after=2).step == 2
  restore_latest = checkpoint_lib.Checkpointer.restore_latest

  def signalled_while_restoring(self, *args):
    os.kill(os.getpid(), signal.SIGTERM)
    return restore_latest(self, *args)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'restore_latest',
                      signalled_while_restoring)
  with caplog.at_level(logging.WARNING):
    result = loop.train_and_evaluate(fault_config(), workdir)
  assert result.status == 'preempted'
  assert (f'stopping early (signal {int(signal.SIGTERM)}) during restoring '
          'the checkpoint: nothing trained since the checkpoints up to step '
          '2, nothing to save;') in caplog.text, caplog.text
  assert step_dirs(workdir) == {2}


def test_an_interruptible_phase_is_cut_short_at_once():
  with signals.StopSignal() as stop:
    started = time.time()
    with pytest.raises(signals.Interrupted) as e:
      with stop.interruptible('opening the dataset'):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
  assert time.time() - started < 1
  assert (e.value.signum, e.value.phase) == (signal.SIGTERM,
                                             'opening the dataset')


def test_a_deferred_phase_finishes_then_the_signal_stops_the_run():
  finished = []
  with signals.StopSignal() as stop:
    with pytest.raises(signals.Interrupted) as e:
      with stop.interruptible('startup'):
        with stop.deferred('taking the workdir lock'):
          os.kill(os.getpid(), signal.SIGINT)
          time.sleep(0.2)
          finished.append(True)
    assert finished and e.value.phase == 'startup'
    # Outside any interruptible phase (a train step): recorded only.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    assert stop.received == signal.SIGINT  # the first one counts
    # A pending signal stops the next interruptible phase on entry.
    with pytest.raises(signals.Interrupted):
      with stop.interruptible('evaluation'):
        finished.append(False)
  assert finished == [True]


def test_a_signal_during_an_import_stops_the_run_after_it(tmp_path,
                                                         monkeypatch):
  """Raised into an import, the exception reached jaxlib's C initialisation,
  which aborted train.py (rc -6): an import finishes first."""
  (tmp_path / 'slow_module_under_signal.py').write_text(
      'import os, signal, time\n'
      'os.kill(os.getpid(), signal.SIGTERM)\n'
      'deadline = time.time() + 0.3\n'
      'while time.time() < deadline:\n'
      '  pass\n'
      'COMPLETE = True\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  with signals.StopSignal() as stop:
    with pytest.raises(signals.Interrupted):
      with stop.interruptible('opening the dataset'):
        import slow_module_under_signal  # pylint: disable=g-import-not-at-top,import-outside-toplevel,unused-import
        time.sleep(5)
  assert sys.modules['slow_module_under_signal'].COMPLETE


def test_a_signal_taken_inside_a_destructor_is_delivered_again(monkeypatch):
  """The handler can run inside a gc callback or __del__ (jax has one), which
  drops its exception ("Exception ignored in ..."): it must still stop."""
  reports = []
  monkeypatch.setattr(sys, 'unraisablehook', reports.append)

  class SignalledWhileDeleted:

    def __del__(self):
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 0.5
      while time.time() < deadline:  # the handler runs in here
        pass

  with signals.StopSignal() as stop:
    started = time.time()
    with pytest.raises(signals.Interrupted):
      with stop.interruptible('restoring the checkpoint'):
        SignalledWhileDeleted()
        time.sleep(5)
  assert time.time() - started < 2
  assert reports == []


# ---------------------------------------------------------------- NaN / Inf


def test_nan_stops_train_py_with_exit_1_and_keeps_last_checkpoint(scenarios):
  outcome = scenarios.nan.result()
  out = outcome['output']
  assert outcome['rc'] == 1, out[-3000:]
  error = out[out.index('error: '):]
  # Step 13's update overflows; step 14's loss and gradients are not finite.
  assert 'training diverged at step 14: loss=' in error, error
  assert 'lr=1e+30' in error and 'numerical blow-up' in error
  assert 'config.learning_rate' in error and 'intact' in error
  # The last good checkpoints are untouched, byte for byte; nothing newer.
  assert outcome['after'] == outcome['before']
  assert outcome['step_dirs'] == {10, 12}


# ------------------------------------------------------- two processes


def test_two_processes_train_the_same_global_batch_as_one(scenarios,
                                                          tmp_path):
  scenarios.finish()  # both cores for the two processes
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  workdir = tmp_path / 'run'
  runs = [Run(workdir, tmp_path / f'process{i}.log', '--distributed',
              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}',
              # Fewer multi-process saves; the training numbers do not change.
              '--config.checkpoint_every_steps=12') for i in range(2)]
  for run in runs:
    assert run.wait(timeout=400) == 0, run.output()[-3000:]
  assert 'completed at step 24/24' in runs[0].output()
  got, want = train_losses(workdir), scenarios.reference_losses()
  assert sorted(got) == sorted(want)
  # The first steps differ only in the order of the cross-process sums
  # (float32 rounding); later ones compound that through SGD.
  for step in range(1, 12):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5,
                               err_msg=f'step {step}')
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-2,
                               err_msg=f'step {step}')
  evals = {r['step']: r for r in read_metrics(workdir) if 'eval_top1' in r}
  assert evals[24]['eval_examples'] == 360
  # The two-process checkpoint restores in one process, checksums included.
  state, data_state = restore_step(workdir / 'checkpoints', TOTAL_STEPS)
  assert data_state['next_batch'] == TOTAL_STEPS
  np.testing.assert_allclose(
      state.params['fc']['kernel'],
      scenarios.reference_state(TOTAL_STEPS).params['fc']['kernel'],
      atol=2e-2)


def test_a_second_unlink_of_a_dead_workers_segment_is_forgiven_alone():
  """A batch in flight when its dead worker's segment was unlinked: its
  array's own unlink finds nothing. That report is dropped; any other unraisable report still reaches the previous hook."""
  import types  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import worker_memory  # pylint: disable=g-import-not-at-top
  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = seen.append
  try:
    worker_memory._unlinked_here.add('/psm_test_gone')  # pylint: disable=protected-access
    worker_memory._forgive_second_unlinks()  # pylint: disable=protected-access
    owner = types.SimpleNamespace(__qualname__='SharedMemoryArray.__del__')
    gone = FileNotFoundError(2, 'No such file or directory', '/psm_test_gone')
    other = FileNotFoundError(2, 'No such file or directory', '/psm_other')
    for error, obj in [(gone, owner), (other, owner),
                       (gone, types.SimpleNamespace(__qualname__='f'))]:
      sys.unraisablehook(types.SimpleNamespace(
          exc_type=type(error), exc_value=error, exc_traceback=None,
          err_msg=None, object=obj))
    assert [u.exc_value for u in seen] == [other, gone]
  finally:
    sys.unraisablehook = previous
    worker_memory._unlinked_here.discard('/psm_test_gone')  # pylint: disable=protected-access


def test_a_grain_object_cut_short_by_a_stop_is_not_reported_from_its_del():
  """CI saw it once: SIGINT while grain built an InterleaveDatasetIterator;
  its __del__ then printed "AttributeError: ... no attribute '_closed'" after
  the clean stop. Only such reports are dropped, only after an interruption."""
  import types  # pylint: disable=g-import-not-at-top
  from grain._src.python.dataset import dataset as grain_dataset  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import signals  # pylint: disable=g-import-not-at-top
  grain_del = grain_dataset.DatasetIterator.__del__

  def __del__():  # a destructor outside grain  # pylint: disable=invalid-name
    pass

  half_built = types.SimpleNamespace(
      exc_value=AttributeError("no attribute '_closed'"), object=grain_del)
  assert signals._half_built_by_interruption(half_built)  # pylint: disable=protected-access
  for other in [types.SimpleNamespace(exc_value=ValueError('x'),
                                      object=grain_del),
                types.SimpleNamespace(exc_value=AttributeError('x'),
                                      object=__del__)]:
    assert not signals._half_built_by_interruption(other)  # pylint: disable=protected-access

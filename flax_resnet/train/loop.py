"""train_and_evaluate: layout check, then a jitted, data-parallel optax loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_resnet import data as data_lib
from flax_resnet.model import ResNet
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import finished
from flax_resnet.train import init_from
from flax_resnet.train import metrics as metrics_lib
from flax_resnet.train import optim
from flax_resnet.train import parallel
from flax_resnet.train import run_checks
from flax_resnet.train import signals
from flax_resnet.train import steps as steps_lib
from flax_resnet.train import workdir as workdir_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint is left untouched."""


def _last_good(ckpt) -> tuple[str, str]:
  """(what is on disk, what a rerun does), true also when nothing was saved."""
  ckpt.wait()  # a save still in flight is a good step too
  steps = ckpt.all_steps()
  if steps:
    return (f'No checkpoint was written after it; the last good one (step '
            f'{steps[-1]}) in {ckpt.directory} is intact',
            f'rerun to resume from step {steps[-1]}')
  return (f'Nothing was saved: {ckpt.directory} holds no checkpoint',
          'rerun to start again from step 0')


def enable_compilation_cache(directory: str):
  if not directory:
    return
  path = os.path.expanduser(directory)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    # Only a speed-up: a read-only home must not stop training.
    log.warning('config.compilation_cache_dir=%r cannot be created (%s); '
                'training without the persistent compilation cache. Set it to '
                'a writable folder, or to "" to turn it off.', directory,
                e.strerror)
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


check_layout = run_checks.check_layout  # pylint: disable=invalid-name


@dataclasses.dataclass
class RunResult:
  step: int
  status: str  # 'completed' or 'preempted'
  eval_metrics: dict[str, float]
  train_metrics: dict[str, float]
  seconds: float
  workdir: str


def _mean_metrics(window: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(window)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _first_nonfinite(window_start: int, fetched: list[dict[str, Any]]):
  for offset, m in enumerate(fetched):
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      return window_start + offset, m
  return None


def _truncate_metrics(path: pathlib.Path, last_step: int):
  """On resume, drop records logged after the restored checkpoint."""
  if not path.exists():
    return
  kept = []
  # Bytes that are not UTF-8 (a damaged disk, a binary file put there) spoil
  # only their line, which is dropped below like a line cut short.
  for line in path.read_bytes().decode('utf-8', 'replace').splitlines():
    try:
      if json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      # A line cut short (disk full, killed mid-write) loses only itself.
      if line.strip():
        log.warning('%s: dropping an unreadable record %r', path, line[:80])
  path.write_text(''.join(line + '\n' for line in kept))


def evaluate(eval_step, state, eval_iterator, mesh) -> dict[str, float]:
  totals = None
  try:
    for batch in eval_iterator:
      out = eval_step(state, parallel.global_batch(batch, mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  except (RuntimeError, OSError) as e:
    died = data_lib.pipeline.input_worker_error(e)
    if died is None:
      raise
    raise died from None
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'eval_loss': float(totals['loss_sum']) / count,
          'eval_top1': float(totals['top1_sum']) / count,
          'eval_top5': float(totals['top5_sum']) / count,
          'eval_examples': count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: Optional[int] = None) -> RunResult:
  """Trains and evaluates; resumes from `workdir` if it holds checkpoints.

  stop_after: leave after this many steps of this invocation, checkpointing as
  on SIGTERM (status 'preempted'): for time-boxed jobs and resume tests.
  SIGTERM/SIGINT stop the run in any phase (signals.py), exit status
  'preempted', with a checkpoint of any trained state none holds yet.
  One run per workdir: a second one is refused while this one holds its lock.
  """
  started = time.time()
  run = _Run(config, stop_after)
  # The handlers go last: nothing may stop the cleanup before them.
  with signals.StopSignal() as stop:
    with contextlib.ExitStack() as cleanup:
      try:
        with stop.interruptible('startup'):
          run.prepare(workdir, cleanup, stop)
        run.train(stop, cleanup)
      except signals.Interrupted as e:
        run.stop_early(e)
      except data_lib.InputWorkerError as e:
        raise data_lib.InputWorkerError(f'{e} {run.save_on_failure()}') from e
  result = RunResult(step=run.step, status=run.status,
                     eval_metrics=run.last_eval, train_metrics=run.last_train,
                     seconds=time.time() - started,
                     workdir=str(run.workdir_path or workdir))
  if run.is_lead:
    done_before = None
    if run.ckpt is not None and run.status == 'completed':
      done_before = finished.message(run.config, workdir, run.ckpt.directory,
                                     run.start_step, run.total_steps)
    print(done_before or summary(result, run.total_steps))
  return result


class _Run:
  """One invocation of a run: what it has set up, trained and saved so far."""

  def __init__(self, config, stop_after: Optional[int]):
    self.config = config
    self.stop_after = stop_after
    self.is_lead = jax.process_index() == 0
    self.workdir_path: Optional[pathlib.Path] = None
    self.total_steps: Optional[int] = None
    self.step = 0
    self.saved_step = 0  # the newest step a checkpoint holds (0: none)
    self.steps_on_disk: list[int] = []  # found before restoring
    self.status = 'completed'
    self.last_train: dict[str, float] = {}
    self.last_eval: dict[str, float] = {}
    self.state = None
    self.ckpt = None
    self.progress = None
    self.eval_passes = None
    self.window: list = []

  def _say(self, text: str, level=logging.INFO):
    if self.progress is not None:
      self.progress.message(text, level)
    elif self.is_lead:
      log.log(level, text)

  def prepare(self, workdir: str, cleanup: contextlib.ExitStack,
              stop: signals.StopSignal):
    """Everything before the first step; a signal may stop any of it."""
    config = self.config
    self.mesh = mesh = parallel.create_mesh()
    process_count = jax.process_count()
    # Validation first: nothing below may compile before the config is good.
    spec = config_check.validate_config(
        config, device_count=jax.device_count(), process_count=process_count)
    stop.phase = 'opening the dataset'
    info = data_lib.dataset_info(config)  # also checks num_classes and splits
    self.workdir_path = workdir_path = run_checks.check_workdir(workdir)
    with stop.deferred('checking the workdir'):
      workdir_lib.check_writable(workdir_path)
    workdir_lib.check_checkpoint_directory(workdir_path / 'checkpoints')
    if self.is_lead:
      with stop.deferred('taking the workdir lock'):
        cleanup.enter_context(workdir_lib.WorkdirLock(workdir_path))
    stop.phase = 'checking the layout'
    run_checks.check_batch_norm_statistics(
        config, run_checks.check_layout(config, spec, self.is_lead))
    steps_per_epoch = max(1, info.num_train // config.batch_size)
    self.total_steps = run_checks.run_length(config, steps_per_epoch)
    self.eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                       else steps_per_epoch)
    self.eval_batch = run_checks.eval_batch_size(config, info.num_eval,
                                                 jax.device_count())
    self.train_workers = data_lib.pipeline.worker_count(
        config, info.num_train // process_count,
        config.batch_size // process_count)
    run_checks.check_memory(
        config, num_train=info.num_train, eval_batch=self.eval_batch,
        train_workers=self.train_workers,
        eval_workers=data_lib.pipeline.worker_count(
            config, math.ceil(info.num_eval / process_count),
            self.eval_batch // process_count),
        process_count=process_count, device_count=jax.device_count(),
        available=run_checks.available_memory())
    identity = run_checks.run_identity(config, spec)
    resuming = run_checks.has_step_folders(workdir_path / 'checkpoints')
    run_checks.check_workdir_owner(workdir_path, identity,
                                   has_checkpoints=resuming)
    if not resuming:  # a resumed run ignores init_from
      init_from.check_preprocessing(config)
    if self.is_lead:
      run_checks.warn_about_sizes(
          config, num_train=info.num_train, steps_per_epoch=steps_per_epoch,
          eval_every=self.eval_every, total_steps=self.total_steps)
    enable_compilation_cache(config.compilation_cache_dir)

    schedule = optim.create_schedule(config, steps_per_epoch,
                                     self.total_steps)
    tx = optim.create_optimizer(config, schedule)
    model = ResNet(spec)
    image_shape = (config.image_size, config.image_size, 3)
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    stop.phase = 'initialising the model'
    init = jax.jit(functools.partial(
        steps_lib.create_train_state, model, tx, image_shape=image_shape,
        float16=config.precision == 'float16'), out_shardings=replicated)
    state = init(jax.random.PRNGKey(config.seed))
    self.meta = {'model': config.model, 'spec': repr(spec),
                 'config': config.to_json_best_effort()}
    origin = init_from.provenance(config)
    if origin is not None:  # kept by every step, also after a resume
      self.meta[init_from.PROVENANCE_KEY] = origin

    self.ckpt = ckpt = checkpoint_lib.Checkpointer(
        workdir_path / 'checkpoints', keep=config.keep_checkpoints,
        keep_best=config.keep_best)
    cleanup.callback(ckpt.close)
    self.steps_on_disk = ckpt.all_steps()
    stop.phase = 'restoring the checkpoint'
    restored = ckpt.restore_latest(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding), state), self.meta)
    if restored is not None:
      state, data_state, self.step = restored
      self.saved_step = self.step
    stop.phase = 'opening the train split'
    self.train_iter = data_lib.make_train_iterator(
        config, process_index=jax.process_index(), process_count=process_count)
    # Stop the grain worker processes when leaving: left to interpreter exit,
    # they are joined after a long timeout and leak their shared memory.
    cleanup.callback(self.train_iter.close)
    if restored is not None:
      self.train_iter.set_state(data_state)
      log.info('resumed from step %d in %s', self.step, ckpt.directory)
    elif config_check.init_from(config) is not None:
      stop.phase = 'loading config.init_from'
      state = init_from.load_init_weights(config, spec, state)
    self.start_step = self.step
    self.state = state
    if self.is_lead:
      with stop.deferred('rewriting metrics.jsonl'):
        run_checks.record_run(workdir_path, identity)
        # Drop records of steps this run will train again, also when a run
        # killed before its first checkpoint starts over from step 0.
        _truncate_metrics(workdir_path / 'metrics.jsonl', self.step)

    self.train_step = jax.jit(
        functools.partial(steps_lib.train_step, num_classes=config.num_classes,
                          label_smoothing=config.label_smoothing,
                          learning_rate_fn=schedule),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated), donate_argnums=0,
        compiler_options=steps_lib.compiler_options())
    self.eval_step = jax.jit(
        functools.partial(steps_lib.eval_step, num_classes=config.num_classes),
        in_shardings=(replicated, batch_sharding), out_shardings=replicated,
        compiler_options=steps_lib.compiler_options())
    self.all_finite = jax.jit(lambda s: jnp.all(jnp.asarray([
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((s.params,
                                                            s.batch_stats))])))
    self.writer = metrics_lib.MetricWriter(workdir_path, enabled=self.is_lead)
    cleanup.callback(self.writer.close)
    self.progress = metrics_lib.Progress(
        self.total_steps, self.step, config.progress_bar, enabled=self.is_lead)
    cleanup.callback(self.progress.close)
    self.prefetcher = parallel.DevicePrefetcher(self.train_iter, mesh,
                                                config.prefetch_batches)
    # The data state of the last step trained (the prefetcher's runs ahead
    # when a signal cuts short fetching the next batch).
    self.trained_data_state = self.prefetcher.state
    self.window_start, self.window_time = self.step, time.time()

  def flush(self):
    """Fetch the window's metrics; stop on NaN/Inf before anything is saved."""
    if not self.window:
      return
    config, step = self.config, self.step
    fetched = jax.device_get(self.window)
    bad = _first_nonfinite(self.window_start, fetched)
    if bad is not None and config.halt_on_nonfinite:
      bad_step, m = bad
      kept, rerun = _last_good(self.ckpt)
      raise NonFiniteLossError(
          f'training diverged at step {bad_step + 1}: loss={m["loss"]}, '
          f'grad_norm={m["grad_norm"]}, lr={m["lr"]:.4g}. The cause is '
          'numerical blow-up (too high a learning rate, or fp16 overflow). '
          f'{kept}. Lower config.learning_rate, set config.grad_clip_norm, '
          f'or use precision=bfloat16, then {rerun}.')
    elapsed = time.time() - self.window_time
    last_train = {k: float(np.mean([m[k] for m in fetched]))
                  for k in fetched[0]}
    last_train['images_per_sec'] = (len(fetched) * config.batch_size /
                                    max(elapsed, 1e-9))
    self.last_train = last_train
    self.writer.write(step, {f'train_{k}' if k in ('loss', 'top1') else k: v
                             for k, v in last_train.items()})
    self.progress.update(step, {'loss': last_train['loss'],
                                'top1': last_train['top1']})
    self.window, self.window_start, self.window_time = [], step, time.time()

  def save(self, metrics=None):
    if not bool(self.all_finite(self.state)):
      kept, rerun = _last_good(self.ckpt)
      raise NonFiniteLossError(
          f'parameters are NaN/Inf at step {self.step}; not saving. The cause '
          'is numerical blow-up in an update (too high a learning rate, or '
          f'fp16 overflow). {kept}. Lower config.learning_rate, set '
          f'config.grad_clip_norm, or use precision=bfloat16, then {rerun}.')
    self.ckpt.save(self.step, self.state, self.trained_data_state, self.meta,
                   metrics)
    self.saved_step = self.step

  def train(self, stop: signals.StopSignal, cleanup: contextlib.ExitStack):
    config = self.config
    compiled_step = None
    if self.is_lead and self.step < self.total_steps:
      workers = self.train_iter.worker_count
      print('starting the input pipeline' + (
          f' ({workers} worker processes)' if workers else '') + ' ...',
            flush=True)
    with self.mesh:
      while self.step < self.total_steps:
        with stop.interruptible('starting the input pipeline'
                                if compiled_step is None else
                                'waiting for the input pipeline'):
          batch = next(self.prefetcher)
        batch_state = self.prefetcher.state
        if compiled_step is None:
          with stop.interruptible('compiling the train step'):
            compiled_step = _compile(self.train_step, 'train step',
                                     self.is_lead, self.state, batch)
          self.state, metrics = compiled_step(self.state, batch)
          jax.block_until_ready(metrics)
          self.progress.begin(self.step + 1)  # the ETA leaves compilation out
        else:
          self.state, metrics = compiled_step(self.state, batch)
        self.trained_data_state = batch_state
        self.window.append(metrics)
        self.step = step = self.step + 1
        at_eval = step % self.eval_every == 0 or step == self.total_steps
        at_ckpt = step % config.checkpoint_every_steps == 0
        leaving = stop.received is not None or (
            self.stop_after is not None and
            step - self.start_step >= self.stop_after)
        if step % config.log_every_steps == 0 or at_eval or at_ckpt or leaving:
          self.flush()
        if at_eval:
          with stop.interruptible('evaluation'):
            self.evaluate(cleanup)
          self.save({'eval_top1': self.last_eval['eval_top1']})
        elif at_ckpt:
          self.save()
        if (leaving or stop.received) and step < self.total_steps:
          if self.saved_step != step:
            self.save()
          self.status = 'preempted'
          self._say(
              'stopping early ({}): checkpoint at step {} written; rerun the '
              'same command to resume.'.format(
                  f'signal {stop.received}' if stop.received else
                  'stop_after', step), logging.WARNING)
          break

  def evaluate(self, cleanup: contextlib.ExitStack):
    eval_started = time.time()
    if self.eval_passes is None:
      # Its worker processes serve every eval of the run, and are stopped
      # with their shared memory when it ends (not at exit, where they leaked
      # and delayed it).
      self.eval_passes = data_lib.make_eval_iterator(
          self.config, process_index=jax.process_index(),
          process_count=jax.process_count(), batch_size=self.eval_batch,
          passes=True)
      cleanup.callback(self.eval_passes.close)
    batches = self.eval_passes.one_pass()
    try:
      last_eval = evaluate(self.eval_step, self.state, batches, self.mesh)
    finally:
      batches.close()  # a pass cut short closes the workers' iterator
    self.last_eval = last_eval
    self.writer.write(self.step, last_eval)
    self.progress.message(
        f'eval at step {self.step}: top1={last_eval["eval_top1"]:.4f} '
        f'top5={last_eval["eval_top5"]:.4f} '
        f'loss={last_eval["eval_loss"]:.4f} '
        f'({int(last_eval["eval_examples"])} examples, '
        f'{time.time() - eval_started:.1f} s)')

  def _save_unsaved(self) -> str:
    """Checkpoints trained state no checkpoint holds; says what it did."""
    if self.state is None or self.step == self.saved_step:
      if self.step:
        return (f'nothing trained since the checkpoint at step {self.step}, '
                'nothing to save')
      if self.steps_on_disk:  # stopped before the restore ended
        return ('nothing trained since the checkpoints up to step '
                f'{self.steps_on_disk[-1]}, nothing to save')
      return 'nothing trained yet, nothing to save'
    self.flush()
    self.save()
    return f'checkpoint at step {self.step} written'

  def stop_early(self, interrupted: signals.Interrupted):
    self.status = 'preempted'
    saved = self._save_unsaved()
    self._say(f'stopping early (signal {interrupted.signum}) during '
              f'{interrupted.phase}: {saved}; rerun the same command to '
              'resume.', logging.WARNING)

  def save_on_failure(self) -> str:
    """After an input failure: keep what was trained, say what was kept."""
    try:
      saved = self._save_unsaved()
    except Exception as e:  # pylint: disable=broad-except
      return f'Saving step {self.step} failed too ({e}).'
    return f'{saved[0].upper()}{saved[1:]}; rerun the same command to resume.'


def _compile(jitted, what: str, is_lead: bool, *args):
  """Compiles `jitted` for `args` ahead of time, saying so and how long."""
  if is_lead:
    print(f'compiling the {what} ...', flush=True)
  started = time.time()
  compiled = jitted.lower(*args).compile()
  if is_lead:
    print(f'compiled the {what} in {time.time() - started:.1f} s', flush=True)
  return compiled


def summary(result: RunResult, total_steps: Optional[int]) -> str:
  of_total = f'/{total_steps}' if total_steps else ''
  lines = [f'\n== {result.status} at step {result.step}{of_total} in '
           f'{result.seconds:.1f} s ({result.workdir}) ==']
  for name, metrics in (('train', result.train_metrics),
                        ('eval', result.eval_metrics)):
    if metrics:
      lines.append(f'{name}: ' + ', '.join(
          f'{k}={v:.4f}' for k, v in sorted(metrics.items())))
  return '\n'.join(lines)

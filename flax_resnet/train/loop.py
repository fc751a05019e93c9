"""train_and_evaluate: layout check, then a jitted, data-parallel optax loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_resnet import data as data_lib
from flax_resnet import layout as layout_lib
from flax_resnet import references
from flax_resnet import zoo
from flax_resnet.model import ResNet
from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check
from flax_resnet.train import finished
from flax_resnet.train import init_from
from flax_resnet.train import metrics as metrics_lib
from flax_resnet.train import optim
from flax_resnet.train import parallel
from flax_resnet.train import steps as steps_lib

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


class _StopSignal:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly."""

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class RunResult:
  step: int
  status: str  # 'completed' or 'preempted'
  eval_metrics: dict[str, float]
  train_metrics: dict[str, float]
  seconds: float
  workdir: str


def check_layout(config, spec, is_lead: bool) -> layout_lib.Layout:
  """Prints the derived layout; stops on a mismatch with the reference."""
  model = ResNet(spec)
  size = config.image_size
  layout = layout_lib.derive_layout(model, (1, size, size, 3), config.model)
  ref = config_check.reference_name(config, spec)
  if is_lead:
    print(f'\n{config.model}: {layout.total_params:,} parameters, input '
          f'{size}x{size}')
    print(layout_lib.format_table(layout))
  if ref is None:
    if is_lead:
      print('layout reference: none (config.reference=None), not checked')
    return layout
  entry_name = config.reference_model or config.model
  # Reference tables are extracted at their library's native input size and
  # with its own head (1000 ImageNet or 10 CIFAR classes); a run's class count
  # is the dataset's choice, not an architecture difference.
  entries = references.load(ref)['models']
  ref_size = entries.get(entry_name, {}).get('input_size', size)
  preset = zoo.PRESETS.get(entry_name)
  ref_classes = preset.num_classes if preset is not None else spec.num_classes
  checked = layout
  if ref_size != size or ref_classes != spec.num_classes:
    checked = layout_lib.derive_layout(
        ResNet(dataclasses.replace(spec, num_classes=ref_classes)),
        (1, ref_size, ref_size, 3), config.model)
  layout_lib.check(checked, ref, entry_name, spec=spec)
  if is_lead:
    head_note = ('' if ref_classes == spec.num_classes else
                 f'; head compared at the reference\'s {ref_classes} classes, '
                 f'this run has {spec.num_classes}')
    print(f'layout reference {ref} ({entry_name}): MATCH{head_note}\n')
  return layout


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
  for batch in eval_iterator:
    out = eval_step(state, parallel.global_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
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
  One run per workdir: a second one is refused while this one holds its lock.
  """
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, stop_after, cleanup)


def _check_workdir(workdir: str) -> pathlib.Path:
  """The workdir, its checkpoints folder and metrics file can be used."""
  if not str(workdir).strip():
    raise config_check.ConfigError(
        '--workdir is empty; give the folder for this run\'s checkpoints and '
        'metrics, e.g. --workdir runs/my_run.')
  workdir_path = pathlib.Path(workdir).expanduser().absolute()
  metrics_path = workdir_path / 'metrics.jsonl'
  if metrics_path.exists() and not metrics_path.is_file():
    raise config_check.ConfigError(
        f'{metrics_path} is not a file (a folder stands in its place); move '
        'it away, or choose another --workdir.')
  return workdir_path


def _check_run_length(config, total_steps: int, steps_per_epoch: int):
  if total_steps < 1:
    raise config_check.ConfigError(
        f'config.num_epochs={config.num_epochs} is {total_steps} steps of '
        f'{steps_per_epoch} per epoch; train at least one step: raise '
        f'num_epochs to >= {1 / steps_per_epoch:.3g} or set num_train_steps.')


def _check_batch_norm_statistics(config, layout: layout_lib.Layout):
  """torch refuses a train-mode BatchNorm over one value per channel; so do we."""
  height, width = layout.blocks[-1].out_size if layout.blocks else (2, 2)
  if config.batch_size * height * width < 2:
    raise config_check.ConfigError(
        f'config.batch_size={config.batch_size}: the last feature map is '
        f'{height}x{width} at image_size={config.image_size}, so its '
        'BatchNorms would see one value per channel in training (constant '
        'logits, zero gradients). Use batch_size >= 2 or a larger image_size.')


def _train_and_evaluate(config, workdir, stop_after, cleanup) -> RunResult:
  started = time.time()
  mesh = parallel.create_mesh()
  is_lead = jax.process_index() == 0
  # Validation first: nothing below may compile before the config is known good.
  spec = config_check.validate_config(
      config, device_count=jax.device_count(),
      process_count=jax.process_count())
  info = data_lib.dataset_info(config)  # also checks num_classes and splits
  workdir_path = _check_workdir(workdir)
  try:
    workdir_path.mkdir(parents=True, exist_ok=True)
    # One name per process: processes sharing a workdir must not remove each
    # other's probe.
    probe = workdir_path / f'.write_test.{jax.process_index()}.{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise config_check.ConfigError(
        f'--workdir {workdir_path} is not writable ({e.strerror}); choose a '
        'folder you can write to.') from e
  checkpoint_lib.check_checkpoint_directory(workdir_path / 'checkpoints')
  if is_lead:
    cleanup.enter_context(checkpoint_lib.WorkdirLock(workdir_path))
  _check_batch_norm_statistics(config, check_layout(config, spec, is_lead))
  enable_compilation_cache(config.compilation_cache_dir)

  steps_per_epoch = max(1, info.num_train // config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                 int(round(config.num_epochs * steps_per_epoch)))
  _check_run_length(config, total_steps, steps_per_epoch)
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0 else
                steps_per_epoch)
  schedule = optim.create_schedule(config, steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config, schedule)
  model = ResNet(spec)
  image_shape = (config.image_size, config.image_size, 3)
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh)

  rng = jax.random.PRNGKey(config.seed)
  init = jax.jit(functools.partial(
      steps_lib.create_train_state, model, tx, image_shape=image_shape,
      float16=config.precision == 'float16'), out_shardings=replicated)
  state = init(rng)
  meta = {'model': config.model, 'spec': repr(spec),
          'config': config.to_json_best_effort()}

  ckpt = checkpoint_lib.Checkpointer(
      workdir_path / 'checkpoints', keep=config.keep_checkpoints,
      keep_best=config.keep_best)
  restored = ckpt.restore_latest(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                  sharding=x.sharding), state),
      meta)
  train_iter = data_lib.make_train_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count())
  start_step = 0
  if restored is not None:
    state, data_state, start_step = restored
    train_iter.set_state(data_state)
    log.info('resumed from step %d in %s', start_step, ckpt.directory)
  elif config.init_from:
    state = init_from.load_init_weights(config, spec, state)
  if is_lead:
    # Drop records of steps this run will train again, also when a run killed
    # before its first checkpoint starts over from step 0.
    _truncate_metrics(workdir_path / 'metrics.jsonl', start_step)

  train_step = jax.jit(
      functools.partial(steps_lib.train_step, num_classes=config.num_classes,
                        label_smoothing=config.label_smoothing,
                        learning_rate_fn=schedule),
      in_shardings=(replicated, batch_sharding),
      out_shardings=(replicated, replicated), donate_argnums=0,
      compiler_options=steps_lib.compiler_options())
  eval_step = jax.jit(
      functools.partial(steps_lib.eval_step, num_classes=config.num_classes),
      in_shardings=(replicated, batch_sharding), out_shardings=replicated,
      compiler_options=steps_lib.compiler_options())
  all_finite = jax.jit(lambda s: jnp.all(jnp.asarray([
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((s.params,
                                                          s.batch_stats))])))

  writer = metrics_lib.MetricWriter(workdir_path, enabled=is_lead)
  progress = metrics_lib.Progress(total_steps, start_step, config.progress_bar,
                                  enabled=is_lead)
  prefetcher = parallel.DevicePrefetcher(train_iter, mesh,
                                         config.prefetch_batches)
  window: list = []
  window_start = start_step
  window_time = time.time()
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  step = start_step
  status = 'completed'

  def flush():
    """Fetch the window's metrics; stop on NaN/Inf before anything is saved."""
    nonlocal window, window_start, window_time, last_train
    if not window:
      return
    fetched = jax.device_get(window)
    bad = _first_nonfinite(window_start, fetched)
    if bad is not None and config.halt_on_nonfinite:
      bad_step, m = bad
      kept, rerun = _last_good(ckpt)
      raise NonFiniteLossError(
          f'training diverged at step {bad_step + 1}: loss={m["loss"]}, '
          f'grad_norm={m["grad_norm"]}, lr={m["lr"]:.4g}. The cause is '
          'numerical blow-up (too high a learning rate, or fp16 overflow). '
          f'{kept}. Lower config.learning_rate, set config.grad_clip_norm, '
          f'or use precision=bfloat16, then {rerun}.')
    elapsed = time.time() - window_time
    last_train = {k: float(np.mean([m[k] for m in fetched])) for k in
                  fetched[0]}
    last_train['images_per_sec'] = (len(fetched) * config.batch_size /
                                    max(elapsed, 1e-9))
    writer.write(step, {f'train_{k}' if k in ('loss', 'top1') else k: v
                        for k, v in last_train.items()})
    progress.update(step, {'loss': last_train['loss'],
                           'top1': last_train['top1']})
    window, window_start, window_time = [], step, time.time()

  def save(metrics=None):
    if not bool(all_finite(state)):
      kept, rerun = _last_good(ckpt)
      raise NonFiniteLossError(
          f'parameters are NaN/Inf at step {step}; not saving. The cause is '
          'numerical blow-up in an update (too high a learning rate, or fp16 '
          f'overflow). {kept}. Lower config.learning_rate, set '
          'config.grad_clip_norm, or use precision=bfloat16, then '
          f'{rerun}.')
    ckpt.save(step, state, prefetcher.state, meta, metrics)

  try:
    with _StopSignal() as stop, mesh:
      compiled_step = None
      if is_lead and step < total_steps:
        print('starting the input pipeline' + (
            f' ({config.worker_count} worker processes)'
            if config.worker_count else '') + ' ...', flush=True)
      while step < total_steps:
        batch = next(prefetcher)
        if compiled_step is None:
          compiled_step = _compile(train_step, 'train step', is_lead, state,
                                   batch)
          state, metrics = compiled_step(state, batch)
          jax.block_until_ready(metrics)
          progress.begin(step + 1)  # the ETA leaves compilation out
        else:
          state, metrics = compiled_step(state, batch)
        window.append(metrics)
        step += 1
        at_eval = step % eval_every == 0 or step == total_steps
        at_ckpt = step % config.checkpoint_every_steps == 0
        leaving = stop.received is not None or (
            stop_after is not None and step - start_step >= stop_after)
        if step % config.log_every_steps == 0 or at_eval or at_ckpt or leaving:
          flush()
        if at_eval:
          eval_started = time.time()
          eval_batches = iter(data_lib.make_eval_iterator(
              config, process_index=jax.process_index(),
              process_count=jax.process_count()))
          try:
            last_eval = evaluate(eval_step, state, eval_batches, mesh)
          finally:
            # Its worker processes and their shared memory go now, not at
            # exit (where they leaked and delayed it).
            getattr(eval_batches, 'close', lambda: None)()
            data_lib.pipeline.release_shared_memory()
          writer.write(step, last_eval)
          progress.message(
              f'eval at step {step}: top1={last_eval["eval_top1"]:.4f} '
              f'top5={last_eval["eval_top5"]:.4f} '
              f'loss={last_eval["eval_loss"]:.4f} '
              f'({int(last_eval["eval_examples"])} examples, '
              f'{time.time() - eval_started:.1f} s)')
          save({'eval_top1': last_eval['eval_top1']})
        elif at_ckpt:
          save()
        if leaving and step < total_steps:
          if not (at_eval or at_ckpt):
            save()
          status = 'preempted'
          progress.message(
              'stopping early ({}): checkpoint at step {} written; rerun the '
              'same command to resume.'.format(
                  f'signal {stop.received}' if stop.received else
                  'stop_after', step), logging.WARNING)
          break
  finally:
    # Stop the grain worker processes now: left to interpreter exit, they are
    # joined after a long timeout and leak their shared memory.
    train_iter.close()
    ckpt.close()
    progress.close()
    writer.close()

  result = RunResult(step=step, status=status, eval_metrics=last_eval,
                     train_metrics=last_train,
                     seconds=time.time() - started, workdir=str(workdir_path))
  if is_lead:
    print(finished.message(config, workdir, ckpt.directory, start_step,
                           total_steps) or summary(result, total_steps))
  return result


def _compile(jitted, what: str, is_lead: bool, *args):
  """Compiles `jitted` for `args` ahead of time, saying so and how long."""
  if is_lead:
    print(f'compiling the {what} ...', flush=True)
  started = time.time()
  compiled = jitted.lower(*args).compile()
  if is_lead:
    print(f'compiled the {what} in {time.time() - started:.1f} s', flush=True)
  return compiled


def summary(result: RunResult, total_steps: int) -> str:
  lines = [f'\n== {result.status} at step {result.step}/{total_steps} in '
           f'{result.seconds:.1f} s ({result.workdir}) ==']
  for name, metrics in (('train', result.train_metrics),
                        ('eval', result.eval_metrics)):
    if metrics:
      lines.append(f'{name}: ' + ', '.join(
          f'{k}={v:.4f}' for k, v in sorted(metrics.items())))
  return '\n'.join(lines)

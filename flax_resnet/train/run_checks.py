"""A run against its dataset, machine and workdir, checked before it compiles.

The config schema (config_check) knows each field alone; these rules need
the dataset's sizes, the machine's memory and CPUs, or the workdir's contents.
Each raises ConfigError naming the field (or --workdir) and a value that works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Optional

from flax_resnet import layout as layout_lib
from flax_resnet import layout_check
from flax_resnet import layout_report
from flax_resnet import references
from flax_resnet import zoo
from flax_resnet.model import ResNet
from flax_resnet.train import config as config_lib
from flax_resnet.train import config_check
from flax_resnet.train.config_check import ConfigError

log = logging.getLogger(__name__)

# Identifies the run a workdir belongs to (see check_workdir_owner).
RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'


def check_workdir(workdir: str) -> pathlib.Path:
  """The workdir, its checkpoints folder and metrics file can be used."""
  if not str(workdir).strip():
    raise ConfigError(
        '--workdir is empty; give the folder for this run\'s checkpoints and '
        'metrics, e.g. --workdir runs/my_run.')
  workdir_path = pathlib.Path(workdir).expanduser().absolute()
  metrics_path = workdir_path / METRICS_FILE
  if metrics_path.exists() and not metrics_path.is_file():
    raise ConfigError(
        f'{metrics_path} is not a file (a folder stands in its place); move '
        'it away, or choose another --workdir.')
  return workdir_path


def run_length(config, steps_per_epoch: int) -> int:
  """Total steps; refuses a run of no step or of more than optax can count.

  Every step count derived from epochs (the run, the warmup, the schedule
  boundaries) must fit optax's int32 step counter.
  """
  derived = [('num_epochs', config.num_epochs)]
  if config.warmup_steps == config_lib.FROM_WARMUP_EPOCHS:
    derived.append(('warmup_epochs', config.warmup_epochs))
  if config.schedule == 'piecewise' and not config.boundaries_steps:
    derived += [('boundaries_epochs', e) for e in config.boundaries_epochs]
  for field, epochs in derived:
    if field == 'num_epochs' and config.num_train_steps > 0:
      continue
    if epochs * steps_per_epoch > config_lib.MAX_STEPS:
      raise ConfigError(
          f'config.{field}={epochs} is {epochs * steps_per_epoch:.4g} steps of '
          f'{steps_per_epoch} per epoch, more than the {config_lib.MAX_STEPS} '
          'that optax counts (int32); use at most '
          f'{config_lib.MAX_STEPS // steps_per_epoch} epochs.')
  total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                 int(round(config.num_epochs * steps_per_epoch)))
  if total_steps < 1:
    raise ConfigError(
        f'config.num_epochs={config.num_epochs} is {total_steps} steps of '
        f'{steps_per_epoch} per epoch; train at least one step: raise '
        f'num_epochs to >= {1 / steps_per_epoch:.3g} or set num_train_steps.')
  return total_steps


def check_layout(config, spec, is_lead: bool) -> layout_lib.Layout:
  """Prints the derived layout; stops on a mismatch with the reference."""
  model = ResNet(spec)
  size = config.image_size
  layout = layout_lib.derive_layout(model, (1, size, size, 3), config.model)
  ref = config_check.reference_name(config, spec)
  if is_lead:
    print(f'\n{config.model}: {layout.total_params:,} parameters, input '
          f'{size}x{size}')
    print(layout_report.format_table(layout))
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
  layout_check.check(checked, ref, entry_name, spec=spec)
  if is_lead:
    head_note = ('' if ref_classes == spec.num_classes else
                 f'; head compared at the reference\'s {ref_classes} classes, '
                 f'this run has {spec.num_classes}')
    print(f'layout reference {ref} ({entry_name}): MATCH{head_note}\n')
  return layout


def check_batch_norm_statistics(config, layout: layout_lib.Layout):
  """torch refuses a train-mode BatchNorm over one value per channel; so do we."""
  height, width = layout.blocks[-1].out_size if layout.blocks else (2, 2)
  if config.batch_size * height * width < 2:
    raise ConfigError(
        f'config.batch_size={config.batch_size}: the last feature map is '
        f'{height}x{width} at image_size={config.image_size}, so its '
        'BatchNorms would see one value per channel in training (constant '
        'logits, zero gradients). Use batch_size >= 2 or a larger image_size.')


def eval_batch_size(config, num_eval: int, device_count: int) -> int:
  """config.eval_batch_size, capped at the split rounded up to the devices.

  A larger batch only adds padding (masked out of the metrics): a huge
  eval_batch_size would build gigabytes of zero images for nothing.
  """
  whole_split = math.ceil(num_eval / device_count) * device_count
  return min(config.eval_batch_size, max(device_count, whole_split))


# ------------------------------------------------------------------ memory


def available_memory() -> Optional[int]:
  """Bytes this process may still allocate: RAM available, within a cgroup
  limit if one applies; None if the system does not say."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    available = psutil.virtual_memory().available
  except ImportError:
    available = _meminfo_available()
  try:
    limit = pathlib.Path('/sys/fs/cgroup/memory.max').read_text().strip()
    used = pathlib.Path('/sys/fs/cgroup/memory.current').read_text().strip()
    if limit.isdigit() and used.isdigit():
      within = max(0, int(limit) - int(used))
      available = within if available is None else min(available, within)
  except OSError:
    pass
  return available


def _meminfo_available() -> Optional[int]:
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def held_batches(workers: int, prefetch: int) -> int:
  """Batches the input pipeline holds at once, at most.

  The one in use and the one being built, those prefetched to the devices,
  and the read-ahead: in-process threads' prefetch_batches, or per worker
  process its own read-ahead, output buffer and the batch it builds.
  """
  if workers:
    return 2 + prefetch + workers * (1 + prefetch + max(1, prefetch))
  return 2 + 2 * prefetch


def _size(num_bytes: float) -> str:
  for unit in ('bytes', 'KB', 'MB', 'GB', 'TB', 'PB'):
    if num_bytes < 1000 or unit == 'PB':
      return f'{num_bytes:.3g} {unit}' if unit != 'bytes' else (
          f'{int(num_bytes)} bytes')
    num_bytes /= 1000
  raise AssertionError


def check_memory(config, *, num_train: int, eval_batch: int,
                 train_workers: int, eval_workers: int, process_count: int,
                 device_count: int, available: Optional[int]):
  """Refuses batches whose input pipeline cannot fit in host memory.

  Counted: float32 images (image_size^2 x 3 x 4 bytes) in every batch the
  pipeline holds (`held_batches`), train and eval together (the train
  pipeline keeps its batches during an eval). Not counted: the model and its
  activations, so this catches the impossible, not every out-of-memory.
  """
  if available is None:
    return
  image_bytes = config.image_size ** 2 * 3 * 4
  train_held = held_batches(train_workers, config.prefetch_batches)
  eval_held = held_batches(eval_workers, config.prefetch_batches)
  train_bytes = config.batch_size // process_count * image_bytes * train_held
  eval_bytes = eval_batch // process_count * image_bytes * eval_held
  # The smallest batches there can be: one example per device.
  smallest = device_count // process_count * (train_held + eval_held)
  image = f'{config.image_size}x{config.image_size}x3 float32 images'
  if smallest * image_bytes > available:
    largest = max(1, math.isqrt(available // (smallest * 12)))
    raise ConfigError(
        f'config.image_size={config.image_size}: even batches of one image '
        f'per device need {_size(smallest * image_bytes)} of {image} in the '
        f'input pipelines ({train_held} train and {eval_held} eval batches '
        f'held), more than the {_size(available)} of memory available; use '
        f'image_size <= {largest} (ResNets train at 224).')
  least_eval = device_count // process_count * image_bytes * eval_held
  if train_bytes + least_eval > available:
    fits = _largest_batch(available - least_eval, image_bytes * train_held,
                          process_count, device_count)
    raise ConfigError(
        f'config.batch_size={config.batch_size}: the input pipeline holds up '
        f'to {train_held} batches of {config.batch_size // process_count} '
        f'{image} ({_size(train_bytes)}), more than the {_size(available)} of '
        f'memory available; use batch_size <= {fits}'
        + (f' (<= {num_train}, the train split, for batches of distinct '
           'images)' if num_train < fits else '') +
        ', or lower prefetch_batches / worker_count.')
  if train_bytes + eval_bytes > available:
    fits = _largest_batch(available - train_bytes, image_bytes * eval_held,
                          process_count, device_count)
    raise ConfigError(
        f'config.eval_batch_size={config.eval_batch_size}: evaluating holds up '
        f'to {eval_held} batches of {eval_batch // process_count} {image} '
        f'({_size(eval_bytes)}) besides the train pipeline\'s '
        f'{_size(train_bytes)}, more than the {_size(available)} of memory '
        f'available; use eval_batch_size <= {fits}.')


def _largest_batch(available: int, bytes_per_example: int, process_count: int,
                   device_count: int) -> int:
  per_process = available // bytes_per_example
  return max(device_count,
             per_process * process_count // device_count * device_count)


# ------------------------------------------------------------------ warnings


def warn_about_sizes(config, *, num_train: int, steps_per_epoch: int,
                     eval_every: int, total_steps: int):
  """Legal but likely unintended sizes: said once, at the start."""
  if config.batch_size > num_train:
    log.warning(
        'config.batch_size=%d is larger than the train split (%d examples): '
        'each step repeats images within its batch (each about %.1f times). '
        'Use batch_size <= %d for batches of distinct images.',
        config.batch_size, num_train, config.batch_size / num_train,
        num_train)
  if eval_every == 1 and total_steps > 1:
    why = ('config.eval_every_steps=1' if config.eval_every_steps == 1 else
           f'config.eval_every_steps=EVERY_EPOCH and an epoch is '
           f'{steps_per_epoch} step (train split {num_train} examples, '
           f'batch_size {config.batch_size})')
    log.warning(
        '%s: the run evaluates after every one of its %d steps. Set '
        'config.eval_every_steps to evaluate less often, e.g. %d.', why,
        total_steps, max(2, total_steps // 10))


# ------------------------------------------------------------------ workdir


def run_identity(config, spec) -> dict:
  """What makes two runs the same run (what a workdir records it holds)."""
  return {'model': config.model, 'spec': repr(spec),
          'dataset': config.dataset, 'train_split': config.train_split}


def check_workdir_owner(workdir_path: pathlib.Path, identity: dict,
                        has_checkpoints: bool):
  """Refuses a workdir whose metrics belong to another run.

  With checkpoints, resuming decides (checkpoint.Checkpointer names what
  differs). Without, metrics.jsonl is either this run's, from an attempt
  stopped before its first checkpoint (its run.json says so: the records are
  dropped with a warning), or another run's (refused: starting would erase
  them).
  """
  metrics_path = workdir_path / METRICS_FILE
  if has_checkpoints or not metrics_path.is_file():
    return
  steps = []
  for line in metrics_path.read_bytes().decode('utf-8', 'replace').splitlines():
    try:
      steps.append(int(json.loads(line)['step']))
    except (ValueError, KeyError, TypeError):
      continue
  if not steps:
    return
  recorded = _read_run_file(workdir_path)
  if recorded == identity:
    log.warning('%s: dropping %d records (up to step %d) of an earlier '
                'attempt of this run, stopped before its first checkpoint; '
                'starting from step 0.', metrics_path, len(steps), max(steps))
    return
  if recorded is None:
    whose = f'a run that left no {RUN_FILE} and no checkpoint'
  else:
    differing = ', '.join(f'{k}: {recorded.get(k)!r}' for k in identity
                          if recorded.get(k) != identity[k] and k != 'spec')
    whose = f'another run ({differing or "a different architecture"})'
  raise ConfigError(
      f'--workdir {workdir_path} holds {METRICS_FILE} of {whose}: '
      f'{len(steps)} records up to step {max(steps)}, which this run would '
      'erase. Choose another --workdir, or delete '
      f'{metrics_path} to start over there.')


def has_step_folders(checkpoints: pathlib.Path) -> bool:
  try:
    return any(p.name.isdigit() and p.is_dir() for p in checkpoints.iterdir())
  except OSError:
    return False


def _read_run_file(workdir_path: pathlib.Path) -> Optional[dict]:
  try:
    recorded = json.loads((workdir_path / RUN_FILE).read_text())
  except (OSError, ValueError):
    return None
  return recorded if isinstance(recorded, dict) else None


def record_run(workdir_path: pathlib.Path, identity: dict):
  """Writes run.json (atomically: a kill leaves the old one or the new)."""
  if _read_run_file(workdir_path) == identity:
    return
  path = workdir_path / RUN_FILE
  partial = path.with_name(f'.{RUN_FILE}.{os.getpid()}')
  partial.write_text(json.dumps(identity, indent=1) + '\n')
  os.replace(partial, path)

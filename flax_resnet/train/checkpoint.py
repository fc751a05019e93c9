"""Orbax checkpoints: train state + data-iterator state + run metadata.

Keeps the newest `keep` checkpoints plus the best by eval top-1. Orbax writes
each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
process killed mid-save leaves no half-written step behind: the tmp folder is
not a step, restore ignores it and the next save of that step replaces it.

Every save also records CRC32 checksums of the train state and of the iterator
state in the step's metadata, because the array store has none of its own: a
flipped byte in a data file would otherwise restore silently as wrong weights.

A finished step that is later damaged (truncated or flipped bytes, a deleted
piece) is skipped on restore with a warning that names it, and moved aside to
`<directory>.damaged/` (kept, not deleted, and out of the way of the step the
resumed run will write again). Restore falls back to the newest intact step and
never silently starts from scratch: if every step is damaged it raises.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import time
import traceback
from typing import Any, Optional
import zlib

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from flax_resnet import unraisable
from flax_resnet.train import compat

log = logging.getLogger(__name__)

TMP_SUFFIX = '.orbax-checkpoint-tmp'


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be used; the message says why and how."""


class DamagedCheckpointError(CheckpointError):
  """One step's files are unreadable or fail their checksum."""


class ResumeIncompatibleError(CheckpointError):
  """An intact step that this config cannot resume: never moved, never damaged."""


def _encode_data_state(state) -> dict[str, Any]:
  if isinstance(state, bytes):
    return {'format': 'bytes', 'value': state.decode('utf-8')}
  return {'format': 'json', 'value': state}


def _decode_data_state(payload: dict[str, Any]):
  if payload['format'] == 'bytes':
    return payload['value'].encode('utf-8')
  return payload['value']


def _shape_tree(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in flat}


def _host_value(leaf) -> Optional[np.ndarray]:
  """The leaf's full value on this host; None if this host cannot see it all."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if leaf.is_fully_replicated:
      leaf = leaf.addressable_data(0)
    elif not leaf.is_fully_addressable:
      return None
  return np.ascontiguousarray(np.asarray(leaf))


def state_checksum(state) -> Optional[str]:
  """CRC32 over every leaf's path, dtype, shape and bytes, or None.

  None when some leaf is sharded across processes (this host cannot see all of
  it); the loop's state is replicated, so that does not happen there.
  """
  crc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    value = _host_value(leaf)
    if value is None:
      return None
    header = f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}'
    crc = zlib.crc32(header.encode(), crc)
    crc = zlib.crc32(value.view(np.uint8).reshape(-1).data, crc)
  return f'{crc:08x}'


def json_checksum(payload) -> str:
  return f'{zlib.crc32(json.dumps(payload, sort_keys=True).encode()):08x}'


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:limit] if text else ""}'


def _root_cause(error: BaseException) -> BaseException:
  """The innermost `raise ... from` cause: for a failed array read,
  TensorStore's own error, which names the array and the file (orbax's
  wrapper names only a slice, then dumps the store's whole spec)."""
  seen = {id(error)}
  while error.__cause__ is not None and id(error.__cause__) not in seen:
    error = error.__cause__
    seen.add(id(error))
  return error


def _is_abandoned_read(report) -> bool:
  """An error from orbax's other array reads after one read already failed.

  Orbax reads the arrays of a restore concurrently on its own event loop and
  closes that loop when one read fails; the reads still under way then end
  in TensorStore callbacks into the closed loop ('Event loop is closed') or
  as coroutines finalized unawaited. Python reports each as an unraisable
  exception: dozens of tracebacks after the one warning that names the
  damaged step, for a fallback that worked.
  """
  owner = getattr(report.object, '__qualname__', None)
  if owner == '_read_array_index_and_device_put':
    return True
  error = report.exc_value
  if not (isinstance(error, RuntimeError)
          and str(error) == 'Event loop is closed'):
    return False
  frames = traceback.extract_tb(report.exc_traceback)
  return any(f.name == 'call_soon_threadsafe'
             and f.filename.endswith(os.path.join('asyncio', 'base_events.py'))
             for f in frames)


def _unreadable(step: int, error: BaseException) -> str:
  """Why orbax could not read `step`, in one line; quiets its abandoned reads."""
  _drop_abandoned_reads()
  return f'step {step}: unreadable ({_first_line(_root_cause(error), 400)})'


def _every_step_damaged(directory, reasons: list[str]) -> str:
  listing = '\n  '.join(reasons)
  return f'every checkpoint in {directory} is damaged:\n  {listing}'


def _drop_abandoned_reads() -> None:
  """From now on, drop the reports `_is_abandoned_read` recognises.

  Installed once a restore has failed on a damaged array (the reports come
  later, from other threads and the garbage collector).
  """
  unraisable.drop(_is_abandoned_read)
  asyncio_log = logging.getLogger('asyncio')
  if _drop_unretrieved_reads not in asyncio_log.filters:
    asyncio_log.addFilter(_drop_unretrieved_reads)


def _drop_unretrieved_reads(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an abandoned orbax read (drops it).

  A read task that failed after its restore had already given up is never
  awaited; when it is garbage collected asyncio logs 'Task exception was never
  retrieved' with the whole traceback, from whichever thread collects it.
  """
  message = record.getMessage()
  return not (message.startswith('Task exception was never retrieved')
              and 'coro=<async_deserialize() ' in message
              and f'orbax{os.sep}checkpoint' in message)


# How tensorstore (which writes the arrays) reports an OS error.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_IO_MARKERS = ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'No space left',
               'Read-only file system', 'Disk quota exceeded')


def _write_failure_reason(error: BaseException) -> Optional[str]:
  """'No space left on device' etc. if `error` is an I/O failure, else None."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  text = str(error)
  if match := _OS_ERROR_CODE.search(text):
    return os.strerror(int(match.group(1)))
  if any(marker in text for marker in _IO_MARKERS):
    return _first_line(error)
  return None


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Save every N steps, keep K + best, restore the newest intact step."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               keep_best: bool, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    preserve = [policies.LatestN(n=keep)]
    if keep_best:
      preserve.append(policies.BestN(
          get_metric_fn=lambda m: m['eval_top1'], n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save,
        # Step folders are made in the calling thread: when that fails the
        # save raises at once. Made in the background, a failure left the
        # background thread waiting out a barrier for a folder that never
        # came (300 s and 294 lines after the error, issue 12).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'data', 'meta'))
    self._pending_step: Optional[int] = None

  @property
  def damaged_directory(self) -> pathlib.Path:
    return self.directory.with_name(self.directory.name + '.damaged')

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def unfinished_saves(self) -> list[pathlib.Path]:
    """Temporary folders of saves that were interrupted (not steps)."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if TMP_SUFFIX in p.name)

  def _raise_if_write_failure(self, step: Optional[int], error: Exception):
    """Turns an I/O failure of a save into a CheckpointError that says why."""
    reason = _write_failure_reason(error)
    if reason is None:
      return
    steps = [s for s in self.all_steps() if s != step]
    kept = (f'the previous checkpoint (step {steps[-1]}) is intact'
            if steps else 'no earlier checkpoint exists')
    raise CheckpointError(
        f'could not write checkpoint step {step} to {self.directory} '
        f'({reason}); {kept}. Free disk space or choose a --workdir on a '
        'larger, writable disk, then rerun the same command to resume.'
    ) from error

  def save(self, step: int, state, data_state, meta: dict[str, Any],
           metrics: Optional[dict[str, float]] = None) -> bool:
    """Starts writing `step` (asynchronously); raises CheckpointError on I/O.

    A failure of the previous asynchronous save surfaces here (orbax waits for
    it anyway), or at wait/close.
    """
    self.wait()
    encoded = _encode_data_state(data_state)
    meta = {**meta, 'checksums': {'state': state_checksum(state),
                                  'data': json_checksum(encoded)}}
    self._pending_step = step
    try:
      saved = self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(encoded),
              meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_write_failure(step, e)
      raise
    return bool(saved)

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_write_failure(self._pending_step, e)
      raise

  def close(self):
    """Waits for the last save; its failure is raised once, as from wait."""
    try:
      self.wait()
    except Exception:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        # The same failure again (orbax's close waits too): raised above.
        log.debug('closing %s', self.directory, exc_info=True)
      raise
    self.manager.close()

  def _read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _check_compatible(self, step: int, saved: dict, meta: dict,
                        abstract_state):
    """Raises ResumeIncompatibleError if `step` cannot resume this run.

    Decided by what is on disk (the saved network and the saved state's
    structure), never by the checkpoint's readability: an intact step written
    by another config is reported as such, named field by field, and is left
    where it is.
    """
    spec_changes = compat.spec_changes(saved.get('spec'), meta.get('spec'))
    if saved.get('model') != meta.get('model'):
      spec_changes.insert(0, ('model', saved.get('model'), meta.get('model')))
    config_changes = compat.config_changes(saved.get('config'),
                                           meta.get('config'))
    if spec_changes:
      raise ResumeIncompatibleError(compat.incompatible_message(
          step, self.directory, 'a different architecture', spec_changes,
          config_changes))
    try:
      structure = self._saved_structure(step)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'step {step}: state metadata unreadable ({_first_line(e)})') from e
    differences = compat.structure_differences(structure, abstract_state)
    if differences:
      raise ResumeIncompatibleError(compat.incompatible_message(
          step, self.directory, 'a differently shaped train state '
          f'({"; ".join(differences[:3])})', config_changes))
    if config_changes:
      log.warning('resuming checkpoint step %d with config changes (saved -> '
                  'now): %s', step, compat.format_changes(config_changes))

  def _saved_structure(self, step: int) -> dict[str, tuple]:
    # Read from disk by the handler itself: the manager's item_metadata knows
    # only items this process saved or restored.
    metadata = ocp.StandardCheckpointHandler().metadata(
        self.directory / str(step) / 'state')
    tree = getattr(metadata, 'tree', metadata)
    return {leaf.name: (tuple(leaf.shape), str(leaf.dtype))
            for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'name')}

  def restore(self, step: int, abstract_state, meta: dict[str, Any]):
    """(state, data_state) of one step.

    Raises:
      ResumeIncompatibleError: the step is intact but written by a config
        this run cannot resume from (a different network or state structure).
      DamagedCheckpointError: its files are unreadable or fail the checksums.
    """
    try:
      saved = self._read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f'step {step}: metadata unreadable ({_first_line(e)})') from e
    self._check_compatible(step, saved, meta, abstract_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(_unreadable(step, e)) from e
    state = restored['state']
    _check_shapes(state, abstract_state, step)
    want = saved.get('checksums') or {}
    got = {'state': state_checksum(state),
           'data': json_checksum(restored['data'])}
    for part in ('state', 'data'):
      if want.get(part) and got[part] and want[part] != got[part]:
        raise DamagedCheckpointError(
            f'step {step}: {part} checksum mismatch (saved {want[part]}, read '
            f'{got[part]}): its files were modified or corrupted on disk')
    return state, _decode_data_state(restored['data'])

  def restore_newest_readable(self) -> tuple[Any, int]:
    """(the saved train state as orbax reads it, step): for init_from.

    Read-only, as it reads another run's folder: an unreadable step is
    skipped with a warning naming it and left where it is.

    Raises:
      CheckpointError: there is no step, or none reads.
    """
    unreadable = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
        return restored['state'], step
      except Exception as e:  # pylint: disable=broad-except
        unreadable.append(_unreadable(step, e))
        log.warning('checkpoint step %d in %s is damaged (%s); trying an '
                    'older one.', step, self.directory, unreadable[-1])
    if unreadable:
      raise CheckpointError(_every_step_damaged(self.directory, unreadable))
    raise CheckpointError(f'no checkpoint found in {self.directory}')

  def _move_aside(self, step: int) -> pathlib.Path:
    """Moves a damaged step out of the manager's folder; never deletes it."""
    target = self.damaged_directory / str(step)
    if target.exists():
      target = target.with_name(f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    return target

  def restore_latest(self, abstract_state, meta: dict[str, Any]):
    """(state, data_state, step) of the newest intact step, or None if none.

    Damaged steps are skipped with a warning naming them, then moved to
    `damaged_directory` so that the resumed run can write those steps again.
    If steps exist but none restores, raises instead of starting over.
    """
    steps = self.all_steps()
    damaged: list[tuple[int, BaseException]] = []
    found = None
    for step in reversed(steps):
      try:
        found = (*self.restore(step, abstract_state, meta), step)
        break
      except DamagedCheckpointError as e:
        damaged.append((step, e))
        log.warning('checkpoint step %d in %s is damaged (%s); falling back '
                    'to an older one.', step, self.directory, e)
    if found is None:
      if damaged:
        raise CheckpointError(
            _every_step_damaged(self.directory, [str(e) for _, e in damaged])
            + '\nRefusing to start from scratch silently: move the folder '
            'away to start a new run, or restore a backup.')
      if unfinished := self.unfinished_saves():
        log.warning('%s holds only interrupted saves (%s), no finished '
                    'checkpoint: starting from step 0.', self.directory,
                    ', '.join(p.name for p in unfinished))
      return None
    _sync('flax_resnet_checkpoint_scanned')
    for step, _ in damaged:
      target = self._move_aside(step)
      log.warning('moved damaged checkpoint step %d to %s; resuming from step '
                  '%d.', step, target, found[2])
    if damaged:
      _sync('flax_resnet_checkpoint_moved')
      self.manager.reload()
    return found


def _check_shapes(state, abstract_state, step: int):
  got, want = _shape_tree(state), _shape_tree(abstract_state)
  diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
  if diff:
    raise CheckpointError(
        f'checkpoint step {step} has different shapes at {diff[:10]}; it was '
        'written by a different architecture.')


def tree_all_finite(tree) -> bool:
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  return all(np.isfinite(x).all() for x in leaves)


def load_meta(directory: str | os.PathLike, step: int) -> dict[str, Any]:
  path = pathlib.Path(directory) / str(step) / 'meta' / 'metadata'
  return json.loads(path.read_text())

"""Orbax checkpoints: train state + data-iterator state + run metadata.

Keeps the newest `keep` checkpoints plus the best by eval top-1. Orbax writes
each step into a temporary folder and renames it when complete, so a process
killed mid-save leaves no half-written step behind. A finished step that is
later damaged (truncated file, deleted piece) is skipped on restore with a
warning that names it; restore falls back to the next-newest intact step and
never silently starts from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint exists but cannot be used; the message says why and how."""


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
        create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'data', 'meta'))

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state, meta: dict[str, Any],
           metrics: Optional[dict[str, float]] = None) -> bool:
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode_data_state(data_state)),
            meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)
    return bool(saved)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def _check_architecture(self, step: int, abstract_state, meta: dict):
    """Raises CheckpointError if `step` holds a different network."""
    saved = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if saved.get('model') != meta.get('model') or saved.get(
        'spec') != meta.get('spec'):
      raise CheckpointError(
          f'checkpoint step {step} in {self.directory} is a different '
          f'architecture: it holds model {saved.get("model")!r} with spec '
          f'{saved.get("spec")}, this run builds {meta.get("model")!r} with '
          f'spec {meta.get("spec")}. Use a fresh --workdir, or set '
          'config.init_from to that checkpoint with init_from_skip_head=True '
          'to fine-tune from it.')

  def restore_latest(self, abstract_state, meta: dict[str, Any]):
    """(state, data_state, step) of the newest intact step, or None if none.

    Damaged steps are skipped with a warning naming them. If steps exist but
    none restores, raises instead of starting over.
    """
    steps = self.all_steps()
    damaged = []
    for step in reversed(steps):
      try:
        self._check_architecture(step, abstract_state, meta)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        log.warning('checkpoint step %d in %s is damaged (%s: %s); falling '
                    'back to an older one.', step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:200])
        continue
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore()))
        state = restored['state']
        _check_finite_shapes(state, abstract_state, step)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        log.warning('checkpoint step %d in %s is damaged (%s: %s); falling '
                    'back to an older one.', step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:200])
        continue
      return state, _decode_data_state(restored['data']), step
    if damaged:
      listing = '\n  '.join(f'step {s}: {type(e).__name__}: '
                            f'{str(e).splitlines()[0][:200]}'
                            for s, e in damaged)
      raise CheckpointError(
          f'every checkpoint in {self.directory} is damaged:\n  {listing}\n'
          'Refusing to start from scratch silently: move the folder away to '
          'start a new run, or restore a backup.')
    return None


def _check_finite_shapes(state, abstract_state, step: int):
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

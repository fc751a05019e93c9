"""Data parallelism with a device Mesh: batch sharded, parameters replicated.

Multi-host: call `jax.distributed.initialize()` first (train.py does when
asked); each process loads its own 1/process_count of every global batch and
`global_batch` stitches the local pieces into one sharded global array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh):
  """This process's slice of the batch -> one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


class DevicePrefetcher:
  """Keeps `size` batches already transferred to the devices.

  The data iterator runs ahead of training, so `state` is the iterator state
  just after the last batch handed out, not the iterator's own current state:
  that is what a checkpoint must store for an exact resume.
  """

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    self._iterator = iterator
    self._mesh = mesh
    self._size = max(size, 0)
    self._queue: list = []
    self.state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) <= self._size:
      batch = global_batch(next(self._iterator), self._mesh)
      self._queue.append((batch, self._iterator.get_state()))
    batch, self.state = self._queue.pop(0)
    return batch

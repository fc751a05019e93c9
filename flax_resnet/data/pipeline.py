"""grain input pipelines: an infinite, resumable train stream and a finite eval.

Both are `grain.MapDataset` pipelines over a random-access source:

  train: source -> shuffle (reshuffled every epoch) -> repeat forever
         -> augment (rng from seed and stream position) -> this process's
         share [process_index::process_count] -> batch -> read-ahead threads
         -> worker processes
  eval:  this process's share, padded to whole batches -> preprocess -> batch

Shuffling and augmentation happen before the process split, so the global
batch (the concatenation of the processes' local batches) does not depend on
process_count, and batching happens before the worker split, so the stream
does not depend on worker_count or prefetch_batches either.

The train iterator's state is therefore just the index of the next batch (plus
what fixes the order, checked on restore): it resumes exactly, and also after
changing worker_count, prefetch_batches or process_count. It is a
`grain.DatasetIterator`, so grain's orbax handler
(`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) saves it too.
"""

import math
import os
import re
import signal
from typing import Optional

from absl import flags
import grain
import numpy as np

from flax_resnet.data import preprocess
from flax_resnet.data import sources
from flax_resnet.data import worker_memory


def check_config(config, *, process_index: int = 0,
                 process_count: int = 1) -> None:
  """Raises ValueError naming the field when the data config is unusable."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index}, process_count={process_count}: need '
        'process_count >= 1 and 0 <= process_index < process_count.')
  for field in ('batch_size', 'eval_batch_size'):
    size = config[field]
    if size <= 0 or size % process_count:
      raise ValueError(
          f'config.{field}={size} must be a positive multiple of the process '
          f'count ({process_count}): every process loads {field} // '
          f'{process_count} examples. Set config.{field} to a multiple of '
          f'{process_count}.')
  if config.augment not in preprocess.AUGMENTATIONS:
    raise ValueError(f'config.augment={config.augment!r}; use one of '
                     f'{preprocess.AUGMENTATIONS}.')
  if config.image_size <= 0:
    raise ValueError(f'config.image_size={config.image_size} must be positive.')
  if not 0 < config.eval_crop_ratio <= 1:
    raise ValueError(f'config.eval_crop_ratio={config.eval_crop_ratio} must be '
                     'in (0, 1], e.g. 0.875 (resize to 256, crop 224).')
  for field in ('mean_rgb', 'std_rgb'):
    if len(config[field]) != 3:
      raise ValueError(f'config.{field}={config[field]} needs one value per '
                       'RGB channel (3 values).')
  if min(config.std_rgb) <= 0:
    raise ValueError(f'config.std_rgb={config.std_rgb} must be positive.')
  if config.num_classes <= 0:
    raise ValueError(f'config.num_classes={config.num_classes} must be '
                     'positive.')
  if config.worker_count is not None and config.worker_count < 0:
    raise ValueError(f'config.worker_count={config.worker_count}; use 0 (no '
                     'worker processes), more, or None (chosen for you).')
  if config.prefetch_batches < 0:
    raise ValueError(f'config.prefetch_batches={config.prefetch_batches}; use '
                     '0 (no read-ahead) or more.')
  if not 0 <= config.seed < 2**32:
    raise ValueError(f'config.seed={config.seed} must be in [0, 2**32).')


# config.worker_count=None: no worker processes for a split of at most this
# many batches (starting one costs ~1 s of a core, more than such a split's
# whole pass), nor below this many CPUs (the read-ahead threads decode in
# parallel already, and worker processes take cores from XLA: issue 18 saw 30
# steps take 218 s with 4 workers on 2 cores, 10 s with none).
AUTO_WORKERS_MIN_BATCHES = 4
AUTO_WORKERS_MIN_CPUS = 4
AUTO_WORKERS_MAX = 8


def usable_cpus() -> int:
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def worker_count(config, num_examples: int, batch_size: int) -> int:
  """config.worker_count, or if None, a count for this machine and split.

  Args:
    config: the run config.
    num_examples: examples this process reads per pass of the split.
    batch_size: this process's batch.
  """
  if config.worker_count is not None:
    return config.worker_count
  cpus = usable_cpus()
  if (num_examples <= AUTO_WORKERS_MIN_BATCHES * batch_size or
      cpus < AUTO_WORKERS_MIN_CPUS):
    return 0
  return min(AUTO_WORKERS_MAX, cpus // 2)


class InputWorkerError(RuntimeError):
  """A worker process of the input pipeline died (killed or crashed)."""


_WORKER_DIED = re.compile(
    r'Worker process was terminated unexpectedly with exit code (-?\d+)')


def input_worker_error(error: Exception):
  """grain's error for a dead worker process as an InputWorkerError, or None.

  grain 0.2.18 raises a RuntimeError with the exit code in its message (and
  a traceback filtered of its frames); the message is all there is to go by.
  A batch whose shared memory is gone (FileNotFoundError on /psm_...) is the
  same failure seen first from the segment's side: the worker's exit code is
  then read from the dead process, if it is not reaped yet.
  """
  if isinstance(error, FileNotFoundError):
    segment = str(error.filename or '')
    if not segment.startswith('/psm_'):
      return None
    code = worker_memory.dead_worker_exit_code(segment)
    if code is None:
      return InputWorkerError(
          f'a batch of the input worker processes was lost: its shared '
          f'memory {segment} is gone (a worker process died, or something '
          'cleared /dev/shm). If it recurs, lower config.worker_count or '
          'config.batch_size (memory), or set worker_count=0.')
  else:
    match = _WORKER_DIED.search(str(error))
    if match is None:
      return None
    code = int(match.group(1))
  if code < 0:
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = 'unknown'
    how = f'killed by signal {-code} ({name})'
    if -code == signal.SIGKILL:
      how += ', e.g. by the out-of-memory killer'
  else:
    how = f'exit code {code}'
  return InputWorkerError(
      f'an input worker process died ({how}); the input pipeline cannot go '
      'on without its batches. If it recurs, lower config.worker_count or '
      'config.batch_size (memory), or set worker_count=0.')


def make_train_iterator(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's training batches.

  Args:
    config: the run config.
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).

  Returns:
    A `TrainIterator` of {'image': float32 (B, S, S, 3), 'label': int32 (B,)}
    with B = config.batch_size // process_count.
  """
  check_config(config, process_index=process_index,
               process_count=process_count)
  source = sources.open_source(config, 'train_split')
  options = preprocess.PreprocessOptions.from_config(config, 'train_split')
  transform = preprocess.TrainPreprocess(options)
  # Surface bad data (rank, dtype, channels, labels) here rather than later
  # from inside a read-ahead thread or a worker process.
  transform.random_map(source[0], np.random.default_rng(0))
  batches = (grain.MapDataset.source(source)
             .seed(config.seed)
             .shuffle()
             .repeat()
             .random_map(transform)
             [process_index::process_count]
             .batch(config.batch_size // process_count, drop_remainder=True,
                    batch_fn=preprocess.NormalizedBatch(options)))
  order = {'dataset': config.dataset, 'train_split': config.train_split,
           'num_examples': len(source), 'seed': config.seed,
           'batch_size': config.batch_size}
  local_batch = config.batch_size // process_count
  return TrainIterator(
      batches, order,
      worker_count=worker_count(config, len(source) // process_count,
                                local_batch),
      prefetch_batches=config.prefetch_batches)


class TrainIterator(grain.DatasetIterator):
  """Batches of an infinite batched MapDataset, resumable by batch index.

  State: {'next_batch': k, **order}, where `order` names what fixes the
  stream (dataset, split, size, seed, global batch size); `set_state` refuses
  a state whose order differs. The read-ahead threads and worker processes
  start at the first `next()` (or `start_prefetch()`), so creating an
  iterator only to restore it costs nothing. Call `close()` to stop the
  workers.
  """

  def __init__(self, batches: grain.MapDataset, order: dict, *,
               worker_count: int, prefetch_batches: int):
    super().__init__()
    self._batches = batches
    self._order = order
    self.worker_count = worker_count
    self._prefetch_batches = prefetch_batches
    self._next_batch = 0
    self._running = None  # the grain iterator from _next_batch on, once begun

  def __next__(self):
    self._assert_not_closed()
    try:
      if self._running is None and self.worker_count:
        batch = self._first_batch()
      else:
        batch = next(self._start())
    except (RuntimeError, OSError) as e:
      died = input_worker_error(e)
      if died is None:
        raise
      try:
        self._stop()  # its shared memory goes with the surviving workers
      except OSError:
        pass  # a dead worker's segment freed twice: its death is the error
      raise died from None
    self._next_batch += 1
    return batch

  def get_state(self) -> dict:
    return {'next_batch': self._next_batch, **self._order}

  def set_state(self, state: dict) -> None:
    differing = {key: (state.get(key), value)
                 for key, value in self._order.items()
                 if state.get(key) != value}
    if differing:
      details = ', '.join(f'{key}: saved {saved!r}, now {now!r}'
                          for key, (saved, now) in differing.items())
      raise ValueError(
          f'The train iterator state was saved for another data order '
          f'({details}); a batch index only carries over with the same '
          'config.dataset, train_split, seed and batch_size. Restore with the '
          'original config, or start a fresh iterator.')
    self._stop()
    self._next_batch = int(state['next_batch'])

  def start_prefetch(self) -> None:
    self._start().start_prefetch()

  def close(self) -> None:
    self._stop()
    super().close()
    worker_memory.release_shared_memory()

  def _start(self) -> grain.DatasetIterator:
    if self._running is None:
      self._running = iter(_read_ahead(
          self._batches[self._next_batch:], self.worker_count,
          self._prefetch_batches))
    return self._running

  def _first_batch(self):
    """The first batch of a (re)started stream, its workers started with the
    stop signals blocked (`worker_memory.first_next`)."""
    try:
      return worker_memory.first_next(self._start())
    except BaseException as e:
      if not isinstance(e, Exception):  # Ctrl-C or a stop while waiting
        # Its thread may still be reading: the next next() starts afresh
        # (at the same batch), not beside it.
        try:
          self._stop()
        except Exception:  # pylint: disable=broad-except
          pass  # closed beside that thread; the stop is what to report
      raise

  def _stop(self) -> None:
    if self._running is not None:
      running, self._running = self._running, None
      running.close()

  def __str__(self) -> str:
    return f'TrainIterator({self.get_state()})'


def make_eval_iterator(config, *, process_index: int = 0,
                       process_count: int = 1,
                       batch_size: Optional[int] = None,
                       passes: bool = False):
  """Every example of config.eval_split exactly once across the processes.

  Process p reads examples p, p + process_count, ...; each process yields the
  same number of batches (so collective ops line up), the missing tail padded
  with zero images whose 'mask' is False.

  Args:
    config: the run config.
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    batch_size: the global batch, if not config.eval_batch_size (the loop
      caps it at the split, see `run_checks.eval_batch_size`).
    passes: return an `EvalPasses` instead, whose worker processes serve
      every pass (each eval of a run) rather than starting for each.

  Returns:
    A re-iterable `grain.IterDataset` (each `iter()` is a fresh pass in the
    same order) of {'image': float32 (B, S, S, 3), 'label': int32 (B,),
    'mask': bool (B,)} with B = batch_size // process_count.
  """
  check_config(config, process_index=process_index,
               process_count=process_count)
  source = sources.open_source(config, 'eval_split')
  transform = preprocess.EvalPreprocess(
      preprocess.PreprocessOptions.from_config(config, 'eval_split'))
  transform.map({**source[0], 'mask': True})  # bad data fails here
  batch_size = (batch_size or config.eval_batch_size) // process_count
  shard_size = math.ceil(len(source) / process_count)
  batches = math.ceil(shard_size / batch_size)
  shard = PaddedShard(source, process_index, process_count,
                      batches * batch_size)
  ds = grain.MapDataset.source(shard).map(transform).batch(batch_size)
  workers = worker_count(config, shard_size, batch_size)
  if passes:
    return EvalPasses(_read_ahead(ds, workers, config.prefetch_batches),
                      batches, workers)
  return _read_ahead(ds, workers, config.prefetch_batches)


class EvalPasses:
  """Passes over a finite eval dataset; worker processes kept between them.

  With worker processes, one repeated iterator serves every pass (grain
  0.2.18 keeps the workers across the epochs of a `RepeatIterDataset`); a pass cut short (an
  exception, a signal) closes it, so the next pass starts aligned. Without
  workers each pass is a fresh iterator: nothing to keep.
  """

  def __init__(self, dataset: grain.IterDataset, num_batches: int,
               worker_count: int):
    self._dataset = dataset
    self._num_batches = num_batches
    self._worker_count = worker_count
    self._iterator = None

  def one_pass(self):
    """Yields the batches of one pass over the split."""
    if not self._worker_count:
      iterator = iter(self._dataset)
      try:
        yield from iterator
      finally:
        iterator.close()
      return
    starting = self._iterator is None
    if starting:
      self._iterator = iter(grain.experimental.RepeatIterDataset(self._dataset))
    finished = False
    try:
      for _ in range(self._num_batches):
        if starting:
          starting = False
          yield worker_memory.first_next(self._iterator)
        else:
          yield next(self._iterator)
      finished = True
    finally:
      if not finished:
        self.close()

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None
    worker_memory.release_shared_memory()


class PaddedShard:
  """Examples shard_index, shard_index + shard_count, ... then padding.

  Items carry 'mask': True; items past the shard are {'mask': False}.
  """

  def __init__(self, source, shard_index: int, shard_count: int,
               padded_length: int):
    self._source = source
    self._shard_index = shard_index
    self._shard_count = shard_count
    self._num_real = len(range(shard_index, len(source), shard_count))
    if padded_length < self._num_real:
      raise ValueError(f'padded_length={padded_length} is shorter than the '
                       f'shard ({self._num_real} examples).')
    self._padded_length = padded_length

  def __len__(self) -> int:
    return self._padded_length

  def __getitem__(self, index: int):
    if not 0 <= index < self._padded_length:
      raise IndexError(f'index {index} out of range [0, {self._padded_length})')
    if index >= self._num_real:
      return {'mask': False}
    example = self._source[self._shard_index + index * self._shard_count]
    return {'image': example['image'], 'label': example['label'], 'mask': True}

  def __repr__(self) -> str:
    return (f'PaddedShard({self._source!r}, shard {self._shard_index} of '
            f'{self._shard_count}, {self._num_real} examples padded to '
            f'{self._padded_length})')


def _read_ahead(ds: grain.MapDataset, worker_count: int,
                prefetch_batches: int) -> grain.IterDataset:
  """Batches computed ahead by threads and, if asked, worker processes."""
  ahead = prefetch_batches
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=ahead,
                                            prefetch_buffer_size=ahead))
  if worker_count > 0:
    worker_memory.segments_folder()
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads one of its absl flags when it starts workers with
      # JAX loaded (google/grain#1355); programs that never parse flags (not
      # using absl.app) get the defaults instead of an UnparsedFlagAccessError.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count,
        per_worker_buffer_size=max(1, ahead)), worker_init_fn=worker_memory.start_worker)
  return ds

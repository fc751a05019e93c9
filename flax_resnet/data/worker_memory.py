"""Shared memory of the input pipeline's worker processes, and their signals.

grain's worker processes hand batches over in shared memory segments. A
worker that is killed leaves the segment it was filling, which no one else
can name, and grain frees handed-over segments on a background thread that
may still be busy at exit: either way Python's resource tracker warns of
"leaked shared_memory objects" (and /dev/shm fills). Here workers note their
newest segments, the main process unlinks a dead worker's, and
`release_shared_memory` frees what was handed over. Workers leave
SIGINT/SIGTERM to the main process.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import signal

from flax_resnet import unraisable


def start_worker(worker_index: int, worker_count: int) -> None:
  """Starts a worker process: signals left to the main one, segments noted.

  Ctrl-C reaches the whole process group, and schedulers (SLURM, docker
  stop) signal every process of a job: a worker that died of it would turn
  the main process's orderly stop into an input failure. The main process
  stops the workers when it closes the pipeline.
  """
  del worker_index, worker_count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  folder = os.environ.get(_SEGMENTS_ENV)
  if folder:
    _note_new_segments(os.path.join(folder, str(os.getpid())))


# A worker notes the names of the shared memory segments it creates last, so
# that if it is killed, the main process can unlink the one it was filling
# (no one else knows its name: Python's resource tracker would unlink it at
# exit, warning of "leaked shared_memory objects").
_SEGMENTS_ENV = 'FLAX_RESNET_WORKER_SEGMENTS'
_SEGMENTS_NOTED = 16  # the newest; older ones were handed over


def _note_new_segments(path: str) -> None:
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  register = resource_tracker.register
  newest = []

  def noting_register(name, rtype):
    if rtype == 'shared_memory':
      newest.append(name)
      del newest[:-_SEGMENTS_NOTED]
      with open(path + '.new', 'w') as f:
        f.write('\n'.join(newest))
      os.replace(path + '.new', path)
    register(name, rtype)

  resource_tracker.register = noting_register


def segments_folder() -> str:
  """This process's folder of its workers' segment notes (made once)."""
  folder = os.environ.get(_SEGMENTS_ENV)
  if folder is None or not os.path.isdir(folder):
    import tempfile  # pylint: disable=g-import-not-at-top
    folder = tempfile.mkdtemp(prefix='flax_resnet_segments_')
    os.environ[_SEGMENTS_ENV] = folder  # inherited by the workers it spawns
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  return folder


def _unlink_dead_workers_segments() -> None:
  """Unlinks the segments workers that are gone had noted and not freed."""
  folder = os.environ.get(_SEGMENTS_ENV)
  if not folder or not os.path.isdir(folder) or not os.path.isdir('/proc'):
    return  # (without /proc, whether a worker is gone is not known here)
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  held = _mapped_segments()
  for note in os.listdir(folder):
    if not note.isdigit() or _alive(int(note)):
      continue
    path = os.path.join(folder, note)
    with open(path) as f:
      names = f.read().split()
    for name in names:
      if name.lstrip('/') in held:
        continue  # handed over: its array here unlinks it when deleted
      try:
        segment = shared_memory.SharedMemory(name)
      except OSError:
        continue  # freed by whoever received it
      segment.close()
      segment.unlink()  # also tells the resource tracker
      _unlinked_for_dead_workers.add(name)
      _forgive_second_unlinks()
    os.remove(path)


# Segments unlinked above on behalf of a dead worker. One can still reach this
# process after the check (a batch in flight on grain's queue), and its array
# then unlinks it again when deleted: a FileNotFoundError that Python reports
# as an "Exception ignored" traceback. (The resource tracker may still warn
# at exit about such a name; it has nothing left to free.)
_unlinked_for_dead_workers: set[str] = set()


def _is_second_unlink(report) -> bool:
  error = report.exc_value
  return (isinstance(error, FileNotFoundError)
          and error.filename in _unlinked_for_dead_workers
          and getattr(report.object, '__qualname__', '').startswith(
              'SharedMemoryArray.'))


def _forgive_second_unlinks() -> None:
  unraisable.drop(_is_second_unlink)


def _mapped_segments() -> set[str]:
  """Names of the shared memory segments this process has mapped."""
  with open('/proc/self/maps') as f:
    return {line.rsplit('/dev/shm/', 1)[1].split()[0]
            for line in f if '/dev/shm/' in line}


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return False


def release_shared_memory() -> None:
  """Frees the shared memory of batches the worker processes handed over.

  grain unlinks a batch's shared memory when its array is deleted, on a
  background thread; the last few deletions are still queued when the
  program exits, and Python's resource tracker then warns about "leaked
  shared_memory objects". Collecting the dropped batches and waiting for that
  thread here frees them all. (grain 0.2.18 has no public call for this.)
  """
  try:
    # Also ImportError when an abandoned iterator is closed at interpreter
    # shutdown: nothing is left to release then.
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  gc.collect()
  arrays = shared_memory_array.SharedMemoryArray
  deleting = getattr(arrays, '_del_thread_pool', None)
  if deleting is not None:
    deleting.close()
    deleting.join()
    # The next worker iterator starts a fresh deletion thread.
    arrays._disable_async_del()  # pylint: disable=protected-access
  _unlink_dead_workers_segments()

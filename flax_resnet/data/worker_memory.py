"""Shared memory of the input pipeline's worker processes, and their signals.

grain's worker processes hand batches over in shared memory segments. A
worker that is killed leaves the segment it was filling, which no one else
can name, and grain frees handed-over segments on a background thread that
may still be busy at exit: either way Python's resource tracker warns of
"leaked shared_memory objects" (and /dev/shm fills). Here workers note their
newest segments, the main process unlinks a dead worker's,
`release_shared_memory` frees what was handed over, and at exit the main
process unlinks the segments it still maps. Workers leave
SIGINT/SIGTERM to the main process, from their first instruction on
(`first_next`).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import signal
import threading

from flax_resnet import unraisable


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def first_next(iterator):
  """next(iterator) on a thread that blocks SIGINT and SIGTERM.

  grain starts its worker processes within the first next(), from threads
  that next() creates. A thread inherits its creator's signal mask, and a
  process its forking thread's, across exec: started from here, a worker
  has the stop signals blocked from its first instruction until
  `start_worker` ignores them. (Started from the main thread, a worker that
  a Ctrl-C reached while its interpreter was still starting printed a
  KeyboardInterrupt traceback.) The main thread waits with the signals its
  own to handle: a handler that raises ends the wait, abandoning the thread
  (the caller then closes the iterator).
  """
  done = threading.Event()
  outcome = []

  def run():
    try:
      # Starting Python's resource tracker unblocks the stop signals in the
      # thread that starts it (resource_tracker.ensure_running, CPython
      # 3.11), which grain's threads would do on first use: started first,
      # it leaves the mask set below alone.
      from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
      resource_tracker.ensure_running()
      signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
      outcome.append((True, next(iterator)))
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append((False, e))
    finally:
      done.set()

  threading.Thread(target=run, name='flax_resnet-input-start',
                   daemon=True).start()
  done.wait()
  succeeded, value = outcome[0]
  if not succeeded:
    raise value
  return value


def start_worker(worker_index: int, worker_count: int) -> None:
  """Starts a worker process: signals left to the main one, segments noted.

  Ctrl-C reaches the whole process group, and schedulers (SLURM, docker
  stop) signal every process of a job: a worker that died of it would turn
  the main process's orderly stop into an input failure. The main process
  stops the workers when it closes the pipeline.
  """
  del worker_index, worker_count
  for sig in STOP_SIGNALS:
    signal.signal(sig, signal.SIG_IGN)
  # Blocked since the fork (first_next); one that came meanwhile is dropped.
  signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
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


# This process's folder of its workers' notes. Not read from the environment:
# a program started by one that ran a pipeline inherits that one's variable.
_folder = None


def segments_folder() -> str:
  """This process's folder of its workers' segment notes (made once)."""
  global _folder
  if _folder is None or not os.path.isdir(_folder):
    import tempfile  # pylint: disable=g-import-not-at-top
    from multiprocessing import util  # pylint: disable=g-import-not-at-top
    first = _folder is None
    _folder = tempfile.mkdtemp(prefix='flax_resnet_segments_')
    os.environ[_SEGMENTS_ENV] = _folder  # inherited by the workers it spawns
    atexit.register(shutil.rmtree, _folder, ignore_errors=True)
    if first:
      _track_registered_segments()
      # Twice: before multiprocessing's exit function (run only after it,
      # the warning came back in 3 of 8 loaded runs: it terminates thread
      # pools, grain's deletion pool among them, dropping queued deletions),
      # and after it, once grain's finalizers have closed any pipeline left
      # open and the workers are joined.
      atexit.register(_unlink_segments_still_mapped)
      util.Finalize(None, _unlink_segments_still_mapped, exitpriority=-1)
  return _folder


# Segments this process told the resource tracker of (Python 3.11 does so on
# every SharedMemory, also one opened by name) and has not unlinked since.
_registered: set[str] = set()


def _track_registered_segments() -> None:
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  register, unregister = resource_tracker.register, resource_tracker.unregister

  def tracked_register(name, rtype):
    if rtype == 'shared_memory':
      _registered.add(name)
    register(name, rtype)

  def tracked_unregister(name, rtype):
    if rtype == 'shared_memory':
      _registered.discard(name)
    unregister(name, rtype)

  resource_tracker.register = tracked_register
  resource_tracker.unregister = tracked_unregister


def _unlink_segments_still_mapped() -> None:
  """At exit, unlinks the segments this process opened and still maps.

  A batch that a thread still holds when the interpreter exits is never
  deleted, so its array never unlinks its segment: Python's resource tracker
  unlinks it after this process, warning of "leaked shared_memory objects".
  (Seen in 4 of 12 runs of 2 eval and 2 train workers on 2 loaded cores:
  one batch's image opened during the first eval, never deleted.) Only the
  segments this process registered with its own resource tracker and has
  not unregistered: exactly those the tracker would unlink, without the
  warning. (A tracker shared with a parent process outlives this one, and
  so may the segments.) Unlinking a mapped segment frees nothing early: the
  mapping stays valid, and the memory goes with the process.
  """
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top
  tracker = getattr(resource_tracker, '_resource_tracker', None)
  if getattr(tracker, '_pid', None) is None:
    return
  try:
    mapped = _mapped_segments()
  except OSError:  # no /proc
    return
  for name in sorted(_registered):
    if name.lstrip('/') not in mapped:
      continue
    try:
      segment = shared_memory.SharedMemory(name.lstrip('/'))
      segment.close()
      segment.unlink()  # also tells the resource tracker
    except OSError:
      continue
    _unlinked_here.add(name)
    _forgive_second_unlinks()


def _unlink_dead_workers_segments() -> None:
  """Unlinks the segments workers that are gone had noted and not freed."""
  folder = _folder
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
        # Without its '/': SharedMemory adds one, and the resource tracker
        # would be told of '//psm_...', keeping '/psm_...' to warn about.
        segment = shared_memory.SharedMemory(name.lstrip('/'))
        segment.close()
        segment.unlink()  # also tells the resource tracker
      except OSError:
        continue  # freed by whoever received it (also since opened here)
      _unlinked_here.add(name)
      _forgive_second_unlinks()
    os.remove(path)


# Segments unlinked here for a dead worker, or at exit while still mapped.
# A dead worker's can still reach this process after the check (a batch in
# flight on grain's queue), and a mapped one's array may yet be deleted: the
# array then unlinks it again, a FileNotFoundError that Python reports as an
# "Exception ignored" traceback.
_unlinked_here: set[str] = set()


def _is_second_unlink(report) -> bool:
  error = report.exc_value
  return (isinstance(error, FileNotFoundError)
          and error.filename in _unlinked_here
          and getattr(report.object, '__qualname__', '').startswith(
              'SharedMemoryArray.'))


def _forgive_second_unlinks() -> None:
  unraisable.drop(_is_second_unlink)


def _mapped_segments() -> set[str]:
  """Names of the shared memory segments this process has mapped."""
  with open('/proc/self/maps') as f:
    return {line.rsplit('/dev/shm/', 1)[1].split()[0]
            for line in f if '/dev/shm/' in line}


def _stat_fields(pid) -> list[str]:
  """/proc/PID/stat from its 3rd field (state) on; [] if unreadable."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()
  except (OSError, IndexError):
    return []


def _alive(pid: int) -> bool:
  fields = _stat_fields(pid)
  return bool(fields) and fields[0] != 'Z'


def dead_worker_exit_code(segment: str):
  """The exit code (-N: killed by signal N) of the dead worker that noted
  `segment` (one of its newest), if not reaped yet, else None.

  Read from /proc/PID/stat's exit_code field; 0 there (also where the
  kernel hides it) is taken as unknown.
  """
  folder = _folder
  if not folder or not os.path.isdir(folder):
    return None
  for note in os.listdir(folder):
    if not note.isdigit():
      continue
    try:
      with open(os.path.join(folder, note)) as f:
        if segment not in f.read().split():
          continue
    except OSError:
      continue
    fields = _stat_fields(note)
    if fields[:1] == ['Z'] and len(fields) > 49 and int(fields[49]):
      return os.waitstatus_to_exitcode(int(fields[49]))
  return None


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

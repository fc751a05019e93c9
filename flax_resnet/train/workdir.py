"""The workdir a run owns: checked before anything compiles, locked while it runs.

A run writes its checkpoints and metrics into one workdir. Two runs writing
into the same one would overwrite each other's checkpoints, and a workdir on a
disk that is not mounted or not writable would fail at the first save, after
the compile; both are found here, up front.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import time
from typing import Optional

import jax

from flax_resnet.train.checkpoint import CheckpointError
from flax_resnet.train.config_check import ConfigError

log = logging.getLogger(__name__)


def _probe_write(folder: pathlib.Path) -> None:
  """Writes and removes a file in `folder`; raises the OSError if it cannot."""
  # One name per process: processes sharing a workdir must not remove each
  # other's probe.
  probe = folder / f'.write_test.{jax.process_index()}.{os.getpid()}'
  probe.write_text('ok')
  probe.unlink()


def check_writable(workdir_path: pathlib.Path) -> None:
  """Makes the workdir, and makes sure this process can write into it."""
  try:
    workdir_path.mkdir(parents=True, exist_ok=True)
    _probe_write(workdir_path)
  except OSError as e:
    raise ConfigError(
        f'--workdir {workdir_path} is not writable ({e.strerror}); choose a '
        'folder you can write to.') from e


def check_checkpoint_directory(directory: str | os.PathLike) -> pathlib.Path:
  """Makes sure saves into `directory` can work, before anything compiles.

  Raises CheckpointError naming the problem: a file in its place, a symlink to
  a folder that is gone (an unmounted disk), or a folder nobody can write.
  """
  path = pathlib.Path(directory)
  if path.is_symlink() and not path.exists():
    raise CheckpointError(
        f'{path} is a symlink to {os.readlink(path)}, which does not exist '
        '(a disk that is not mounted?). Mount it, or remove the symlink to '
        'keep checkpoints in the workdir, or choose another --workdir.')
  if path.exists() and not path.is_dir():
    raise CheckpointError(
        f'{path} is a file, not a folder, so no checkpoint can be saved '
        'there. Move it away, or choose another --workdir.')
  if not path.exists():
    return path  # made by the first save, in a workdir already probed
  try:
    _probe_write(path)
  except OSError as e:
    raise CheckpointError(
        f'{path} cannot hold checkpoints ({e.strerror}); make it a writable '
        'folder, or choose another --workdir.') from e
  return path


class WorkdirBusyError(CheckpointError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """One run per workdir: an exclusive flock on WORKDIR/.lock.

  The kernel drops a flock when its holder dies, however it dies (SIGKILL
  included), so a lock is never left stuck: the file a dead run leaves behind
  only records who held it last, and the next run takes it over. The record
  (pid, host, start time) is what a refused second run names; a clean exit
  empties it, so a record found on taking the lock is a dead run's. Only the lead
  process of a multi-process run locks; its peers share its workdir.
  """

  FILE = '.lock'

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / self.FILE
    self._fd: Optional[int] = None
    self.previous_holder: Optional[dict] = None

  def holder(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text() or 'null')
    except (OSError, ValueError):
      return None

  def acquire(self) -> 'WorkdirLock':
    import fcntl  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise CheckpointError(
          f'cannot create the workdir lock {self.path} ({e.strerror}); '
          'choose a writable --workdir.') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        # A filesystem without locks (some network mounts): say so, go on.
        log.warning('cannot lock %s (%s): this filesystem has no file locks, '
                    'so a second run in this workdir would not be refused.',
                    self.path, e.strerror)
        return self
      holder = self.holder()
      if holder:
        who = (f'pid {holder.get("pid")} on host {holder.get("host")}, '
               f'started {holder.get("started")}')
      else:
        # It is between taking the lock and writing its record.
        who = 'a process that is starting up (its record is not written yet)'
      raise WorkdirBusyError(
          f'workdir {self.path.parent} is in use by another run: {who}. Two '
          'runs in one workdir would overwrite each other\'s checkpoints and '
          'interleave metrics. Wait for it to finish (or stop it), or choose '
          'another --workdir.') from e
    self.previous_holder = self.holder()
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd
    if self.previous_holder:
      # A clean exit empties the record: this one's run died holding it.
      log.warning('taking over the workdir lock %s: its holder (%s) ended '
                  'without releasing it (killed?) and is no longer running.',
                  self.path, self.previous_holder)
    return self

  def release(self):
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
      os.close(self._fd)  # drops the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

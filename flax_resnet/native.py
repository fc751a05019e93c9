"""Compiling the project's small C++ extensions at first use.

The oneDNN convolutions (flax_resnet/cpu/onednn.py), the JPEG crop decoder
(flax_resnet/data/jpeg.py) and the pixel normaliser (flax_resnet/data/pixels.py)
are each one C++ file, compiled with g++ on first use into `cache_dir()`
(default ~/.cache/flax_resnet) under a name keyed
by the source and what it links against, and loaded with ctypes. Building at
first use rather than at `pip install` keeps the project a plain pure-Python
package (no build isolation, editable installs work). The library is written
to a temporary file and renamed into place, so processes building it at the
same time (pytest-xdist workers) each see either nothing or a whole library.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Iterable, Optional

log = logging.getLogger('flax_resnet')


class BuildError(RuntimeError):
  """An extension cannot be built or loaded here (a one-line reason)."""


def cache_dir() -> str:
  """$FLAX_RESNET_CACHE, else $XDG_CACHE_HOME/flax_resnet, else ~/.cache/...

  The one cache folder: built extensions, downloaded weights, the torchvision
  wheel the reference tests read.
  """
  return os.path.expanduser(os.environ.get('FLAX_RESNET_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or '~/.cache', 'flax_resnet'))


def library_path(name: str, source: str, key_parts: Iterable[str]) -> str:
  """Where the library `name` built from `source` (and key_parts) lives."""
  key = hashlib.sha256()
  with open(source, 'rb') as f:
    key.update(f.read())
  for part in key_parts:
    key.update(part.encode())
  return os.path.join(cache_dir(), f'{name}-{key.hexdigest()[:16]}.so')


def compile_library(source: str, path: str, compile_flags: Iterable[str],
                    link_flags: Iterable[str]) -> str:
  """Compiles `source` into the shared library `path` atomically."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which(
      'c++')
  if not compiler:
    raise BuildError('no C++ compiler (g++) on PATH')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix='.so',
                                   delete=False) as tmp:
    pass
  cmd = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
         *compile_flags, source, '-o', tmp.name, *link_flags]
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or ['?']
      # The first line is often only "In function ...": name the error.
      first = next((line for line in lines if 'error' in line), lines[0])
      raise BuildError(f'{os.path.basename(compiler)} failed: {first}')
    os.replace(tmp.name, path)
  finally:
    if os.path.exists(tmp.name):
      os.unlink(tmp.name)
  return path


def _home_relative(path: str) -> str:
  home = os.path.expanduser('~')
  return '~' + path[len(home):] if path.startswith(home + os.sep) else path


def _announce(text: str) -> None:
  """One line on stderr: through logging where it shows INFO, else printed.

  A first use compiles for seconds; without a word that looks like a hang,
  also to a library user who configured no logging.
  """
  if log.isEnabledFor(logging.INFO) and log.hasHandlers():
    log.info(text)
  else:
    print(f'flax_resnet: {text}', file=sys.stderr, flush=True)


class LazyLibrary:
  """An extension loaded on first use: built if needed, or one warning line.

  load() returns the ctypes library, or None when it is switched off (the
  environment variable `switch` set to 0: silent) or cannot be built or
  loaded (`failure` says why; logged once, with `fallback`).
  """

  def __init__(self, what: str, switch: str, fallback: str, path, build,
               setup):
    """path() -> str; build(path); setup(library) declares and registers."""
    self._what, self._switch, self._fallback = what, switch, fallback
    self._path, self._build, self._setup = path, build, setup
    self._lock = threading.Lock()
    self.library: Optional[ctypes.CDLL] = None
    self.failure: Optional[str] = None

  def load(self) -> Optional[ctypes.CDLL]:
    if self.library is not None or self.failure is not None:
      return self.library
    with self._lock:
      if self.library is not None or self.failure is not None:
        return self.library
      if os.environ.get(self._switch, '1') == '0':
        self.failure = f'{self._switch}=0'
        return None
      try:
        path = self._path()
        if not os.path.exists(path):
          _announce(f'building the {self._what} extension (once; cached in '
                    f'{_home_relative(os.path.dirname(path))})')
          self._build(path)
        library = ctypes.CDLL(path)
        self._setup(library)
        self.library = library
      except (BuildError, OSError, AttributeError) as e:
        self.failure = str(e)
        log.warning('flax_resnet: %s unavailable (%s); %s', self._what,
                    self.failure, self._fallback)
    return self.library

  def available(self) -> bool:
    """True if the extension is built and loaded."""
    return self.load() is not None

  def unavailable_reason(self) -> Optional[str]:
    self.load()
    return self.failure

  def build_now(self) -> None:
    """Builds and loads it now (CI, images), printing where it is.

    For an extension the project runs without: a failure has warned in one
    line and is not an error.
    """
    if self.available():
      print(self._path())

"""The weights cache: atomic, checksummed downloads into $FLAX_RESNET_CACHE.

A file is written to a temporary name beside its final place and renamed only
once it is complete and its checksum agrees, so an interrupted or corrupted
transfer never leaves a file that a later run would trust. A file already in
the cache is used without touching the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Optional

from flax_resnet import native

# Seconds to wait for a connection or for the next bytes: an unreachable
# network fails fast instead of hanging.
TIMEOUT_S = 10.0
_ALGORITHMS = {'sha256': 64, 'sha1': 40, 'md5': 32}


class DownloadError(OSError):
  """The file could not be fetched; the message says where to put it by hand."""


class ChecksumMismatch(ValueError):
  """A file's content differs from its published checksum."""


def cache_dir() -> pathlib.Path:
  """$FLAX_RESNET_CACHE, default ~/.cache/flax_resnet (see native.cache_dir)."""
  return pathlib.Path(native.cache_dir())


def cache_path(url: str, member: Optional[str] = None) -> pathlib.Path:
  """Where the file from `url` lives in the cache: weights/HOST/PATH.

  Derived from the URL alone, so a user can place a file there by hand.
  With `member` (a file inside a .zip download) it is that file's name in the
  archive's folder.
  """
  parsed = urllib.parse.urlsplit(url)
  parts = [p for p in urllib.parse.unquote(parsed.path).split('/')
           if p not in ('', '.', '..')]
  if not parts:
    raise ValueError(f'url {url!r} names no file.')
  host = parsed.netloc.replace(':', '_') or 'local'
  path = cache_dir().joinpath('weights', host, *parts)
  return path.with_name(member) if member else path


def parse_checksum(checksum: Optional[str]) -> Optional[tuple[str, str]]:
  """'sha256:HEX' -> ('sha256', 'hex'); a bare HEX is sha256; None stays None."""
  if checksum is None:
    return None
  algorithm, _, digest = checksum.rpartition(':')
  algorithm = algorithm or 'sha256'
  digest = digest.strip().lower()
  if (algorithm not in _ALGORITHMS or not digest or
      len(digest) > _ALGORITHMS[algorithm] or
      any(c not in '0123456789abcdef' for c in digest)):
    raise ValueError(
        f'checksum {checksum!r} is not a hex digest; give sha256=HEX (64 hex '
        'digits, or a prefix of them) or ALGO:HEX with ALGO in '
        f'{", ".join(_ALGORITHMS)}.')
  return algorithm, digest


def file_digest(path: os.PathLike, algorithm: str) -> str:
  digest = hashlib.new(algorithm)
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def verify(path: os.PathLike, checksum: Optional[str], source: str) -> None:
  """Raises ChecksumMismatch unless `path` has `checksum` (prefix allowed)."""
  parsed = parse_checksum(checksum)
  if parsed is None:
    return
  algorithm, want = parsed
  got = file_digest(path, algorithm)
  if not got.startswith(want):
    raise ChecksumMismatch(
        f'{source} has {algorithm} {got}, but {want} was expected')


def _mirrored(url: str) -> str:
  """$FLAX_RESNET_MIRROR/HOST/PATH when a mirror is set (air-gapped sites)."""
  mirror = os.environ.get('FLAX_RESNET_MIRROR')
  if not mirror:
    return url
  parsed = urllib.parse.urlsplit(url)
  return f'{mirror.rstrip("/")}/{parsed.netloc}{parsed.path}'


def _place_by_hand(url: str, dest: pathlib.Path, member: Optional[str],
                   checksum: Optional[str]) -> str:
  what = f'the {member} inside it' if member else 'it'
  check = f' ({checksum})' if checksum else ''
  return (f'To use it offline, download {url} on a machine with network and '
          f'place {what} at {dest}{check}.')


def _download(url: str, directory: pathlib.Path, progress: bool,
              timeout: float) -> pathlib.Path:
  """Streams `url` into a temporary file in `directory`; returns its path.

  The temporary file is removed on any failure, including a transfer that
  ends before its Content-Length.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  request = urllib.request.Request(url, headers={'User-Agent': 'flax_resnet'})
  # Connect first: an unreachable host leaves nothing behind, not even a folder.
  with urllib.request.urlopen(request, timeout=timeout) as response:
    length = response.headers.get('Content-Length')
    total = int(length) if length and length.isdigit() else None
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.download-',
                               suffix='.part')
    tmp_path = pathlib.Path(tmp)
    try:
      with os.fdopen(fd, 'wb') as out, tqdm(
          total=total, unit='B', unit_scale=True, unit_divisor=1024,
          desc=url.rsplit('/', 1)[-1], disable=not progress,
          leave=False) as bar:
        received = 0
        while True:
          try:
            chunk = response.read(1 << 20)
          except http.client.IncompleteRead as e:
            received += len(e.partial)
            raise DownloadError(
                f'the transfer ended after {received:,} of '
                f'{received + (e.expected or 0):,} bytes') from None
          if not chunk:
            break
          out.write(chunk)
          received += len(chunk)
          bar.update(len(chunk))
        if total is not None and received != total:
          raise DownloadError(
              f'the transfer ended after {received:,} of {total:,} bytes')
        out.flush()
        os.fsync(out.fileno())
      return tmp_path
    except BaseException:
      tmp_path.unlink(missing_ok=True)
      raise


def _extract(archive: pathlib.Path, member: str,
             directory: pathlib.Path) -> pathlib.Path:
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.extract-',
                             suffix='.part')
  tmp_path = pathlib.Path(tmp)
  try:
    with zipfile.ZipFile(archive) as zf, os.fdopen(fd, 'wb') as out:
      names = {pathlib.PurePosixPath(n).name: n for n in zf.namelist()}
      if member not in names:
        raise ChecksumMismatch(
            f'the archive holds no {member} (it has {", ".join(names)})')
      with zf.open(names[member]) as src:
        shutil.copyfileobj(src, out)
    return tmp_path
  except BaseException:
    tmp_path.unlink(missing_ok=True)
    raise


def fetch(url: str, *, checksum: Optional[str] = None,
          member: Optional[str] = None, progress: bool = True,
          timeout: float = TIMEOUT_S) -> pathlib.Path:
  """The cached file for `url`, downloading it once.

  Args:
    url: http(s) or file URL.
    checksum: 'ALGO:HEX' or a sha256 HEX (a prefix is allowed); verified on
      download and on every cache hit.
    member: for a .zip download, the file inside it to keep (and verify).
    progress: show a tqdm progress bar.
    timeout: seconds to wait for a connection or for data.

  Raises:
    DownloadError: no network / server error / interrupted transfer, with the
      URL and the cache path where the file can be placed by hand.
    ChecksumMismatch: the downloaded (then discarded) or cached file differs.
  """
  parse_checksum(checksum)  # a malformed checksum fails before any transfer
  dest = cache_path(url, member)
  if dest.is_file():
    try:
      verify(dest, checksum, f'the cached file {dest}')
    except ChecksumMismatch as e:
      raise ChecksumMismatch(
          f'{e}. It is not the file {url} should give; delete it to download '
          'again, or pass the checksum of the file you mean.') from None
    return dest

  source = _mirrored(url)
  try:
    downloaded = _download(source, dest.parent, progress, timeout)
  except (urllib.error.URLError, OSError, http.client.HTTPException,
          ValueError) as e:
    reason = getattr(e, 'reason', None) or e
    if isinstance(e, urllib.error.HTTPError):
      reason = f'HTTP {e.code} {e.reason}'
    elif isinstance(e, (socket.timeout, TimeoutError)):
      reason = f'no answer within {timeout:g} s'
    via = f' (via the mirror {source})' if source != url else ''
    raise DownloadError(
        f'cannot download {url}{via}: {reason}. '
        f'{_place_by_hand(url, dest, member, checksum)}') from None
  try:
    kept = downloaded
    if member:
      try:
        kept = _extract(downloaded, member, dest.parent)
      except zipfile.BadZipFile:
        raise ChecksumMismatch(
            f'the download from {url} is not a valid .zip archive') from None
      finally:
        downloaded.unlink(missing_ok=True)
    verify(kept, checksum, f'the download from {url}' +
           (f' ({member})' if member else ''))
  except ChecksumMismatch as e:
    kept.unlink(missing_ok=True)
    raise ChecksumMismatch(
        f'{e}; nothing was kept (a corrupted transfer or a changed file). '
        'Run again; if it persists, the checksum is wrong. '
        f'{_place_by_hand(url, dest, member, checksum)}') from None
  os.replace(kept, dest)
  return dest

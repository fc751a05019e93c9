"""The weights cache: atomic, checksummed downloads into $FLAX_RESNET_CACHE.

A file is written to a temporary name beside its final place and renamed only
once it is complete and its checksum agrees, so an interrupted or corrupted
transfer never leaves a file that a later run would trust. Without a checksum
the bytes must be a weights format (convert.files.sniff): an error or login
page served as 200 OK is refused, not cached. A file already in the cache is
used without touching the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Optional

from flax_resnet import native
from flax_resnet.convert import files

# Seconds to wait for a connection or for the next bytes: an unreachable
# network fails fast instead of hanging.
TIMEOUT_S = 10.0
_ALGORITHMS = {'sha256': 64, 'sha1': 40, 'md5': 32}
# A shorter prefix tells files apart no better than chance (one file in 16
# shares a 1-digit prefix); torchvision's file names carry 8 hex digits.
MIN_CHECKSUM_DIGITS = 8


class DownloadError(OSError):
  """The file could not be fetched; the message says where to put it by hand."""


class ChecksumMismatch(ValueError):
  """A file's content differs from its published checksum."""


class CachedFileDamaged(ValueError):
  """A file in the cache is not a weights file; the message says to delete it."""


def cache_dir() -> pathlib.Path:
  """$FLAX_RESNET_CACHE, default ~/.cache/flax_resnet (see native.cache_dir)."""
  return pathlib.Path(native.cache_dir())


def cache_path(url: str, member: Optional[str] = None) -> pathlib.Path:
  """Where the file from `url` lives in the cache: weights/HOST/PATH.

  Derived from the URL alone, so a user can place a file there by hand.
  A query string ('download?id=...') is part of what names the file: URLs that
  differ only there get different cache files (NAME-q<8 hex of sha256>).
  With `member` (a file inside a .zip download) it is that file's name in the
  archive's folder.
  """
  parsed = urllib.parse.urlsplit(url)
  parts = [p for p in urllib.parse.unquote(parsed.path).split('/')
           if p not in ('', '.', '..')]
  if not parts:
    raise ValueError(
        f'url {url!r} names no file (its path is empty); give the URL of the '
        'weights file itself, e.g. https://host/models/resnet50.pth.')
  host = parsed.netloc.replace(':', '_') or 'local'
  path = cache_dir().joinpath('weights', host, *parts)
  if parsed.query:
    query = hashlib.sha256(parsed.query.encode()).hexdigest()[:8]
    path = path.with_name(f'{path.stem}-q{query}{path.suffix}')
  return path.with_name(member) if member else path


def parse_checksum(checksum: Optional[str]) -> Optional[tuple[str, str]]:
  """'sha256:HEX' -> ('sha256', 'hex'); a bare HEX is sha256; None stays None.

  HEX is the whole digest or a prefix of at least MIN_CHECKSUM_DIGITS digits.
  """
  if checksum is None:
    return None
  algorithm, _, digest = str(checksum).rpartition(':')
  algorithm = algorithm.strip().lower()
  # A bare HEX is what load_pretrained's sha256= takes: name that field.
  field = f'checksum {checksum!r}' if algorithm else f'sha256={checksum!r}'
  algorithm = algorithm or 'sha256'
  digest = digest.strip().lower()
  usage = ('give sha256=HEX or checksum=ALGO:HEX with ALGO in '
           f'{", ".join(_ALGORITHMS)}, HEX the whole digest or its first '
           f'{MIN_CHECKSUM_DIGITS}+ hex digits.')
  if (algorithm not in _ALGORITHMS or not digest or
      any(c not in '0123456789abcdef' for c in digest)):
    raise ValueError(f'{field} is not a hex digest; {usage}')
  full = _ALGORITHMS[algorithm]
  if len(digest) > full:
    raise ValueError(f'{field} has {len(digest)} hex digits, more than a '
                     f'{algorithm} digest\'s {full}; {usage}')
  if len(digest) < MIN_CHECKSUM_DIGITS:
    raise ValueError(
        f'{field} has {len(digest)} hex digit{"s" if len(digest) > 1 else ""}'
        f', too few to tell files apart: give at least {MIN_CHECKSUM_DIGITS} '
        f'(torchvision\'s file names carry 8) or all {full}.')
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


class _Refused(Exception):
  """A complete transfer whose content is not the file wanted (internal)."""


@dataclasses.dataclass(frozen=True)
class _Received:
  """A finished transfer: its temporary file and what the server said of it."""
  path: pathlib.Path
  content_type: str
  final_url: str


def _download(url: str, directory: pathlib.Path, progress: bool,
              timeout: float) -> _Received:
  """Streams `url` into a temporary file in `directory`.

  The temporary file is removed on any failure, including a transfer that
  ends before its Content-Length.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  request = urllib.request.Request(url, headers={'User-Agent': 'flax_resnet'})
  # Connect first: an unreachable host leaves nothing behind, not even a folder.
  # An HTTP error status raises here, so its body is never written.
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
      return _Received(tmp_path, response.headers.get('Content-Type', ''),
                       response.geturl() or url)
    except BaseException:
      tmp_path.unlink(missing_ok=True)
      raise


def _describe_page(path: pathlib.Path, content_type: str) -> Optional[str]:
  """'an HTML page titled ...' when the body is a web page or a JSON/XML
  message (an error, a login form, a quota notice), else None."""
  with open(path, 'rb') as f:
    head = f.read(4096)
  text = head.lstrip(b'\xef\xbb\xbf \t\r\n').lower()
  kind = content_type.split(';')[0].strip().lower()
  if text.startswith((b'<!doctype html', b'<html')) or 'html' in kind:
    what = 'an HTML page'
    title = re.search(rb'<title[^>]*>([^<]{1,120})', head, re.IGNORECASE)
    if title:
      what += f' titled {title.group(1).decode("utf-8", "replace").strip()!r}'
  elif text.startswith(b'<') or 'xml' in kind:
    what = 'an XML document'
  elif text.startswith((b'{', b'[')) or 'json' in kind:
    what = 'a JSON document'
  else:
    return None
  start = ' '.join(head[:100].decode('utf-8', 'replace').split())
  return f'{what} ({content_type or "no Content-Type"}) starting {start!r}'


def _not_weights(path: pathlib.Path, content_type: str,
                 name: str) -> Optional[str]:
  """'NAME is ...': why `path` is not a weights file, or None if it is one."""
  try:
    files.sniff(path)
    return None
  except ValueError as e:
    page = _describe_page(path, content_type)
    if page:
      return f'{name} is {page}, not a weights file'
    return str(e).replace(f'weights file {path}', name).replace(str(path),
                                                                 name)


def _extract(archive: pathlib.Path, member: str,
             directory: pathlib.Path) -> pathlib.Path:
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.extract-',
                             suffix='.part')
  tmp_path = pathlib.Path(tmp)
  try:
    with zipfile.ZipFile(archive) as zf, os.fdopen(fd, 'wb') as out:
      names = {pathlib.PurePosixPath(n).name: n for n in zf.namelist()
               if not n.endswith('/')}
      if member not in names:
        raise _Refused(
            f'the archive holds no {member} (it holds '
            f'{", ".join(sorted(names)) or "no files"}): the archive changed '
            'or the entry names the wrong member')
      with zf.open(names[member]) as src:
        shutil.copyfileobj(src, out)
    return tmp_path
  except BaseException:
    tmp_path.unlink(missing_ok=True)
    raise


def _check_destination(dest: pathlib.Path, url: str):
  """The cache path must be free for a file (a folder there cannot be replaced)."""
  if dest.exists() and not dest.is_file():
    raise DownloadError(
        f'cannot cache {url}: {dest} exists and is not a file; move it away.')


def _cached(dest: pathlib.Path, url: str, checksum: Optional[str]
            ) -> pathlib.Path:
  """The cached file, checked: by its checksum, or without one by its format."""
  if checksum:
    try:
      verify(dest, checksum, f'the cached file {dest}')
    except ChecksumMismatch as e:
      raise ChecksumMismatch(
          f'{e}. It is not the file {url} should give; delete it to download '
          'again, or pass the checksum of the file you mean.') from None
    return dest
  problem = _not_weights(dest, '', f'the cached file {dest} (from {url})')
  if problem:
    raise CachedFileDamaged(
        f'{problem.rstrip(".")}. Delete it to download again.')
  return dest


def fetch(url: str, *, checksum: Optional[str] = None,
          member: Optional[str] = None, progress: bool = True,
          timeout: float = TIMEOUT_S) -> pathlib.Path:
  """The cached file for `url`, downloading it once.

  Args:
    url: http(s) or file URL.
    checksum: 'ALGO:HEX' or a sha256 HEX (the whole digest or a prefix of at
      least 8 hex digits); verified on download and on every cache hit.
      Without one, the file must be a weights format (convert.files), on
      download and on every cache hit.
    member: for a .zip download, the file inside it to keep (and verify).
    progress: show a tqdm progress bar.
    timeout: seconds to wait for a connection or for data.

  Raises:
    DownloadError: no network / server error / interrupted transfer / a web
      page where the file should be, with the URL and the cache path where
      the file can be placed by hand. Nothing is kept.
    ChecksumMismatch: the downloaded (then discarded) or cached file differs.
    CachedFileDamaged: a cached file without a checksum is not weights.
  """
  parse_checksum(checksum)  # a malformed checksum fails before any transfer
  dest = cache_path(url, member)
  _check_destination(dest, url)
  if dest.is_file():
    return _cached(dest, url, checksum)

  source = _mirrored(url)
  via = f' (via the mirror {source})' if source != url else ''
  by_hand = _place_by_hand(url, dest, member, checksum)
  try:
    received = _download(source, dest.parent, progress, timeout)
  except (urllib.error.URLError, OSError, http.client.HTTPException,
          ValueError) as e:
    reason = getattr(e, 'reason', None) or e
    if isinstance(e, urllib.error.HTTPError):
      reason = f'HTTP {e.code} {e.reason}'
    elif isinstance(e, (socket.timeout, TimeoutError)):
      reason = f'no answer within {timeout:g} s'
    raise DownloadError(
        f'cannot download {url}{via}: {reason}. {by_hand}') from None
  redirect = (f' (redirected to {received.final_url})'
              if received.final_url != source else '')
  kept = received.path
  try:
    if member:
      try:
        kept = _extract(received.path, member, dest.parent)
      except zipfile.BadZipFile:
        page = _describe_page(received.path, received.content_type)
        raise _Refused(f'the server\'s answer is {page or "damaged"}, not a '
                       '.zip archive') from None
      finally:
        received.path.unlink(missing_ok=True)
    if checksum:
      verify(kept, checksum, f'the download from {url}' +
             (f' ({member})' if member else ''))
    elif problem := _not_weights(kept, received.content_type,
                                 'the server\'s answer'):
      raise _Refused(problem.rstrip('.'))
  except _Refused as e:
    kept.unlink(missing_ok=True)
    raise DownloadError(
        f'cannot download {url}{via}{redirect}: {e}; nothing was kept. Open '
        f'the URL in a browser to see what it serves. {by_hand}') from None
  except ChecksumMismatch as e:
    page = _describe_page(kept, received.content_type) if not member else None
    kept.unlink(missing_ok=True)
    cause = (f'the server\'s answer is {page}{redirect}' if page else
             'a corrupted transfer or a changed file')
    raise ChecksumMismatch(
        f'{e}; nothing was kept ({cause}). Run again; if it persists, the '
        f'checksum is wrong. {by_hand}') from None
  os.replace(kept, dest)
  return dest

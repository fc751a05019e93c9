"""CIFAR-10/100 as users have them: upstream archives or torchvision folders.

Accepted `--source` values (upstream layouts, https://www.cs.toronto.edu/~kriz/cifar.html):
  - binary archives: cifar-10-binary.tar.gz (cifar-10-batches-bin/
    data_batch_{1..5}.bin, test_batch.bin, batches.meta.txt; records of
    <label><3072 pixels>) and cifar-100-binary.tar.gz (cifar-100-binary/
    train.bin, test.bin, {coarse,fine}_label_names.txt; records of
    <coarse><fine><3072 pixels>);
  - python archives: cifar-10-python.tar.gz (cifar-10-batches-py/
    data_batch_{1..5}, test_batch, batches.meta) and cifar-100-python.tar.gz
    (cifar-100-python/train, test, meta): pickled dicts with bytes keys;
  - those folders extracted (torchvision leaves ROOT/cifar-10-batches-py and
    ROOT/cifar-100-python), given as the folder itself or its parent, or a
    folder holding one of the archives.

Pixels are stored channel-major (1024 R, 1024 G, 1024 B) in both formats; the
examples come out as (labels, HWC uint8 image) in file order, the order TFDS's
own cifar builder yields them in.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
from typing import Iterator

import numpy as np

PIXELS = 32 * 32 * 3


class SourceError(ValueError):
  """The given source is not (a complete) what the dataset needs."""


def unreadable(e: BaseException) -> str:
  """`ReadError: first line` of an archive error, for a one-line message.

  tarfile's 'r:*' error lists every compression it tried, one per line.
  """
  text = str(e).splitlines()[0].rstrip(':') if str(e) else 'truncated'
  return f'{type(e).__name__}: {text}'


@dataclasses.dataclass(frozen=True)
class _Layout:
  """One upstream format of one CIFAR dataset."""
  archive: str  # upstream archive file name
  folder: str  # top folder inside it
  splits: dict[str, tuple[str, ...]]  # TFDS split -> member files
  label_files: dict[str, str]  # TFDS label feature -> names file / meta key
  binary: bool


_LABEL_KEYS = {'cifar10': ('label',), 'cifar100': ('coarse_label', 'label')}
LAYOUTS = {
    'cifar10': (
        _Layout('cifar-10-binary.tar.gz', 'cifar-10-batches-bin',
                {'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
                 'test': ('test_batch.bin',)},
                {'label': 'batches.meta.txt'}, binary=True),
        _Layout('cifar-10-python.tar.gz', 'cifar-10-batches-py',
                {'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
                 'test': ('test_batch',)},
                {'label': 'batches.meta'}, binary=False),
    ),
    'cifar100': (
        _Layout('cifar-100-binary.tar.gz', 'cifar-100-binary',
                {'train': ('train.bin',), 'test': ('test.bin',)},
                {'coarse_label': 'coarse_label_names.txt',
                 'label': 'fine_label_names.txt'}, binary=True),
        _Layout('cifar-100-python.tar.gz', 'cifar-100-python',
                {'train': ('train',), 'test': ('test',)},
                {'coarse_label': 'meta', 'label': 'meta'}, binary=False),
    ),
}
# Keys of the pickled python batches.
_PICKLE_LABELS = {'label': ('labels', 'fine_labels'),
                  'coarse_label': ('coarse_labels',)}
_PICKLE_NAMES = {'cifar10': {'label': 'label_names'},
                 'cifar100': {'label': 'fine_label_names',
                              'coarse_label': 'coarse_label_names'}}
# What TFDS's cifar builders download (the binary archives).
URLS = {'cifar10': 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
        'cifar100': 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz'}
NUM_CLASSES = {'cifar10': {'label': 10},
               'cifar100': {'label': 100, 'coarse_label': 20}}


def expected_sources(name: str) -> str:
  layouts = LAYOUTS[name]
  return (' or '.join(layout.archive for layout in layouts) +
          ' (or a folder holding ' +
          ' or '.join(f'{layout.folder}/' for layout in layouts) + ')')


class CifarSource:
  """Reads one CIFAR dataset from an archive or an extracted folder."""

  def __init__(self, name: str, source: str):
    if name not in LAYOUTS:
      raise ValueError(f'{name!r} is not a CIFAR dataset: {sorted(LAYOUTS)}')
    self.name = name
    self.source = os.path.abspath(os.path.expanduser(source))
    self.layout, self._files = self._locate()
    self.label_keys = _LABEL_KEYS[name]
    self.label_names = self._read_label_names()
    self._batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  # -- finding the files ------------------------------------------------------

  def _locate(self) -> tuple[_Layout, '_FolderFiles | _TarFiles']:
    path = self.source
    if not os.path.exists(path):
      raise SourceError(f'--source {path} does not exist; give '
                        f'{expected_sources(self.name)}.')
    if os.path.isdir(path):
      for layout in LAYOUTS[self.name]:
        for folder in (path, os.path.join(path, layout.folder)):
          if (os.path.basename(os.path.normpath(folder)) == layout.folder
              and os.path.isdir(folder)):
            return layout, _FolderFiles(folder)
      for layout in LAYOUTS[self.name]:
        archive = os.path.join(path, layout.archive)
        if os.path.isfile(archive):
          return layout, _TarFiles(archive, layout, self.name)
      raise SourceError(
          f'--source {path} holds no {self.name} data: expected '
          f'{expected_sources(self.name)}.{_other_dataset_hint(self.name, path)}')
    # Any archive name works; the layout is told by its members.
    files = _TarFiles(path, None, self.name)
    for layout in LAYOUTS[self.name]:
      if files.top_folder == layout.folder:
        return layout, files
    raise SourceError(
        f'--source {path} is not a {self.name} archive: its top folder is '
        f'{files.top_folder!r}, but {self.name} comes as '
        f'{expected_sources(self.name)}.'
        f'{_other_dataset_hint(self.name, files.top_folder)}')

  # -- metadata -----------------------------------------------------------------

  def _read_label_names(self) -> dict[str, list[str]]:
    names = {}
    for key, file in self.layout.label_files.items():
      data = self._files.read(file, what='label names')
      if self.layout.binary:
        # TFDS keeps the non-empty lines (the files end in blank lines).
        names[key] = [n for n in data.decode('utf-8').split('\n') if n]
      else:
        meta = self._unpickle(file, data)
        names[key] = [n.decode('utf-8') if isinstance(n, bytes) else str(n)
                      for n in meta[_PICKLE_NAMES[self.name][key]]]
      expected = NUM_CLASSES[self.name][key]
      if len(names[key]) != expected:
        raise SourceError(
            f'{self._files.where(file)} lists {len(names[key])} class names, '
            f'{self.name} has {expected}: is it a {self.name} file?')
    return names

  def split_files(self, split: str) -> tuple[str, ...]:
    return self.layout.splits[split]

  def check_splits(self) -> dict[str, int]:
    """Examples per split from the member sizes (no decoding); checks all."""
    counts = {}
    for split, files in self.layout.splits.items():
      missing = [f for f in files if not self._files.exists(f)]
      if missing:
        raise SourceError(
            f'{self._files.where(missing[0])} is missing, so split {split!r} '
            f'of {self.name} is incomplete: {self.source} should hold '
            f'{", ".join(self.layout.folder + "/" + f for f in files)}. '
            'Download the archive again.')
      if self.layout.binary:
        record = len(self.label_keys) + PIXELS
        total = 0
        for f in files:
          size = self._files.size(f)
          if size % record or size == 0:
            raise SourceError(
                f'{self._files.where(f)} is {size} bytes, not a whole number '
                f'of {record}-byte {self.name} records: the file is truncated '
                'or not from ' + self.layout.archive + '.')
          total += size // record
        counts[split] = total
      else:
        counts[split] = sum(len(self._batch(f)[1]) for f in files)
    return counts

  # -- examples -----------------------------------------------------------------

  def examples(self, split: str) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(labels in label_keys order, (32, 32, 3) uint8) in file order."""
    for file in self.layout.splits[split]:
      if self.layout.binary:
        data = self._files.read(file, what=f'split {split!r}')
        yield from self._binary_records(file, data)
      else:
        yield from self._pickled_records(file, None)

  def _binary_records(self, file, data):
    width = len(self.label_keys)
    records = np.frombuffer(data, np.uint8)
    if records.size % (width + PIXELS):
      raise SourceError(f'{self._files.where(file)} is truncated: '
                        f'{records.size} bytes is not a whole number of '
                        f'{width + PIXELS}-byte records.')
    records = records.reshape(-1, width + PIXELS)
    labels = records[:, :width]
    self._check_labels(file, labels)
    images = records[:, width:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for label, image in zip(labels, images):
      yield tuple(int(x) for x in label), image

  def _pickled_records(self, file, data):
    del data  # already unpickled by _batch
    labels, images = self._batch(file)
    for label, image in zip(labels, images):
      yield tuple(int(x) for x in label), image

  def _batch(self, file):
    """(labels (N, K), images (N, 32, 32, 3)) of a pickled batch, cached."""
    if file not in self._batches:
      self._batches[file] = self._read_batch(file)
    return self._batches[file]

  def _read_batch(self, file):
    batch = self._unpickle(file, self._files.read(file, what='a batch'))
    try:
      pixels = np.asarray(batch['data'], np.uint8)
      columns = []
      for key in self.label_keys:
        field = next(k for k in _PICKLE_LABELS[key] if k in batch)
        columns.append(np.asarray(batch[field], np.int64))
    except (KeyError, StopIteration, TypeError, ValueError) as e:
      raise SourceError(f'{self._files.where(file)} is not a {self.name} '
                        f'python batch (no data/labels: {e!r}).') from e
    if pixels.ndim != 2 or pixels.shape[1] != PIXELS or any(
        len(c) != len(pixels) for c in columns):
      raise SourceError(f'{self._files.where(file)}: data has shape '
                        f'{pixels.shape} for {len(columns[0])} labels; expected '
                        f'(N, {PIXELS}) for N labels.')
    labels = np.stack(columns, 1)
    self._check_labels(file, labels)
    return labels, pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

  def _check_labels(self, file, labels):
    for column, key in enumerate(self.label_keys):
      limit = NUM_CLASSES[self.name][key]
      if labels.size and labels[:, column].max() >= limit:
        raise SourceError(
            f'{self._files.where(file)} has {key} {labels[:, column].max()}, '
            f'but {self.name} has {limit} classes: is it a {self.name} file?')

  def _unpickle(self, file, data):
    try:
      # Pickled by Python 2: its str keys load as bytes.
      loaded = pickle.loads(data, encoding='bytes')
      return {k.decode('latin1') if isinstance(k, bytes) else k: v
              for k, v in loaded.items()}
    except Exception as e:  # pylint: disable=broad-except
      raise SourceError(f'{self._files.where(file)} is not a readable pickled '
                        f'{self.name} batch ({type(e).__name__}): the file is '
                        f'truncated or not from {self.layout.archive}.') from e

  def close(self):
    self._files.close()


def _other_dataset_hint(name: str, where: str) -> str:
  for other, layouts in LAYOUTS.items():
    if other != name and any(
        layout.folder in where or layout.archive in where
        for layout in layouts):
      return f' It looks like {other}: run prepare {other} instead.'
  return ''


class _FolderFiles:
  """Members of an extracted CIFAR folder."""

  def __init__(self, folder: str):
    self.folder = folder

  def where(self, file: str) -> str:
    return os.path.join(self.folder, file)

  def exists(self, file: str) -> bool:
    path = self.where(file)
    return os.path.exists(path) and not os.path.isdir(path)

  def size(self, file: str) -> int:
    return os.path.getsize(self.where(file))

  def read(self, file: str, what: str) -> bytes:
    if not self.exists(file):
      raise SourceError(f'{self.where(file)} is missing ({what}); the folder '
                        'is incomplete. Extract the archive again.')
    with open(self.where(file), 'rb') as f:
      return f.read()

  def close(self):
    pass


class _TarFiles:
  """Members of a CIFAR .tar.gz, read once into memory (at most ~180 MB)."""

  def __init__(self, path: str, layout: _Layout | None, name: str):
    self.path = path
    self._members: dict[str, bytes] = {}
    try:
      with tarfile.open(path, 'r:*') as tar:
        for member in tar:
          if member.isfile():
            data = tar.extractfile(member).read()
            self._members[member.name.lstrip('./')] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
      # zlib/gzip errors (truncated download) are OSError/EOFError subclasses.
      raise SourceError(
          f'{path} is not a readable archive ({unreadable(e)}): '
          'the download is truncated or it is not '
          f'{expected_sources(name)}. Download it again.') from e
    tops = {n.split('/')[0] for n in self._members if '/' in n}
    self.top_folder = sorted(tops)[0] if len(tops) == 1 else ', '.join(
        sorted(tops)) or None
    if layout is not None and self.top_folder != layout.folder:
      raise SourceError(
          f'{path} holds {self.top_folder!r}, not {layout.folder}/: it is not '
          f'{layout.archive}.')

  def where(self, file: str) -> str:
    return f'{self.path}:{self.top_folder}/{file}'

  def exists(self, file: str) -> bool:
    return f'{self.top_folder}/{file}' in self._members

  def size(self, file: str) -> int:
    return len(self._members[f'{self.top_folder}/{file}'])

  def read(self, file: str, what: str) -> bytes:
    if not self.exists(file):
      raise SourceError(f'{self.where(file)} is missing ({what}); the archive '
                        'is incomplete. Download it again.')
    return self._members[f'{self.top_folder}/{file}']

  def close(self):
    self._members.clear()

"""ImageNet 2012 (ILSVRC2012) from the two tars image-net.org hands out.

  ILSVRC2012_img_train.tar: 1,000 per-synset tars (n01440764.tar, ...), each
    holding that synset's JPEGs (n01440764_10026.JPEG, ...); the label is the
    synset.
  ILSVRC2012_img_val.tar: 50,000 JPEGs ILSVRC2012_val_00000001.JPEG ...
    ILSVRC2012_val_00050000.JPEG; their synsets are not in the tar. TFDS's
    imagenet2012 builder ships them (datasets/imagenet2012/
    validation_labels.txt, line i = synset of the i-th name in sorted order),
    and so do we: the same file, read the same way. A val tar holding only
    some of the images gets each image's own line (by its number), which is
    what TFDS gives for the complete tar.

Records are TFDS imagenet2012's: {'file_name', 'image' (JPEG bytes), 'label'
(synset)}, keyed by file name, with TFDS's fixes for its 22 CMYK JPEGs and
its one PNG (re-encoded as RGB JPEG at quality 100: by TensorFlow when it is
installed, as TFDS does, otherwise by Pillow).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from flax_resnet.data import images
from flax_resnet.data.cifar_source import SourceError
from flax_resnet.data.cifar_source import unreadable

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
_VAL_NAME = re.compile(r'^ILSVRC2012_val_(\d{8})\.JPEG$')
_SYNSET_TAR = re.compile(r'^(n\d{8})\.tar$')


def synsets() -> list[str]:
  with open(os.fspath(imagenet_common.label_names_file())) as f:
    return f.read().split()


def validation_synsets() -> list[str]:
  path = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)  # pylint: disable=protected-access
  with open(os.fspath(path)) as f:
    return f.read().strip().splitlines()


class ImagenetSource:
  """The train and val tars in one folder; checked before anything is read."""

  def __init__(self, folder: str):
    self.folder = os.path.abspath(os.path.expanduser(folder))
    if os.path.isfile(self.folder) and os.path.basename(self.folder) in (
        TRAIN_TAR, VAL_TAR):
      self.folder = os.path.dirname(self.folder)
    if not os.path.isdir(self.folder):
      raise SourceError(
          f'--source {self.folder} is not a folder; give the folder that holds '
          f'{TRAIN_TAR} and {VAL_TAR}.')
    self.paths = {'train': os.path.join(self.folder, TRAIN_TAR),
                  'validation': os.path.join(self.folder, VAL_TAR)}
    for split, path in self.paths.items():
      if not os.path.isfile(path):
        raise SourceError(
            f'{path} is missing, so split {split!r} of imagenet2012 cannot be '
            f'built: --source must hold both {TRAIN_TAR} and {VAL_TAR} '
            '(from https://image-net.org/download-images).')
    self._synsets = set(synsets())
    self._val_names = self._list_val()

  def total_bytes(self) -> int:
    return sum(os.path.getsize(p) for p in self.paths.values())

  def num_examples(self, split: str) -> int | None:
    # The val tar's index is read anyway; counting the train tar's images
    # would mean reading all 140 GB twice.
    return len(self._val_names) if split == 'validation' else None

  def _list_val(self) -> list[str]:
    path = self.paths['validation']
    try:
      with tarfile.open(path, 'r:') as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as e:
      raise SourceError(
          f'{path} is not a readable tar ({unreadable(e)}): '
          'the download is truncated or it is not '
          f'{VAL_TAR}. Download it again.') from e
    bad = [n for n in names if not _VAL_NAME.match(os.path.basename(n))]
    if bad or not names:
      raise SourceError(
          f'{path} holds {bad[0] if bad else "no images"}: {VAL_TAR} holds '
          'ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_00050000.JPEG.')
    return sorted(names)

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    if split == 'validation':
      yield from self._val_examples()
    else:
      yield from self._train_examples()

  def _val_examples(self):
    labels = validation_synsets()
    path = self.paths['validation']
    with _reading(path, VAL_TAR) as tar:
      for member in tar:
        if not member.isfile():
          continue
        number = int(_VAL_NAME.match(os.path.basename(member.name)).group(1))
        if not 1 <= number <= len(labels):
          raise SourceError(f'{path}:{member.name}: there are {len(labels)} '
                            'validation images.')
        image = tar.extractfile(member).read()
        yield member.name, {'file_name': member.name, 'image': image,
                            'label': labels[number - 1]}

  def _train_examples(self):
    path = self.paths['train']
    with _reading(path, TRAIN_TAR) as tar:
      for member in tar:
        if not member.isfile():
          continue
        match = _SYNSET_TAR.match(os.path.basename(member.name))
        if not match or match.group(1) not in self._synsets:
          raise SourceError(
              f'{path} holds {member.name!r}: {TRAIN_TAR} holds one tar per '
              'ImageNet synset (n01440764.tar, ...).')
        synset_tar = io.BytesIO(tar.extractfile(member).read())
        where = f'{path}:{member.name}'
        with _reading(synset_tar, where) as images:
          for image in images:
            if not image.isfile():
              continue
            name = os.path.basename(image.name)
            data = _fix_image(name, images.extractfile(image).read())
            yield name, {'file_name': name, 'image': data,
                         'label': match.group(1)}


class _reading:  # pylint: disable=invalid-name
  """tarfile stream over `path`; read errors become one SourceError."""

  def __init__(self, path_or_file, what: str):
    self._what = what if isinstance(path_or_file, io.BytesIO) else path_or_file
    self._source = path_or_file
    self._tar = None

  def __enter__(self):
    try:
      if isinstance(self._source, io.BytesIO):
        self._tar = tarfile.open(fileobj=self._source, mode='r|')
      else:
        self._tar = tarfile.open(self._source, mode='r|')
    except (tarfile.TarError, EOFError, OSError) as e:
      raise self._error(e) from e
    return _Members(self._tar, self._error)

  def _error(self, e):
    return SourceError(
        f'{self._what} is not a readable tar ({unreadable(e)}): '
        'the download is truncated or damaged. '
        'Download it again.')

  def __exit__(self, *exc):
    if self._tar is not None:
      self._tar.close()


class _Members:
  """Iterates a stream tar; a truncated one raises SourceError."""

  def __init__(self, tar, error):
    self._tar = tar
    self._error = error

  def __iter__(self):
    while True:
      try:
        member = self._tar.next()
      except (tarfile.TarError, EOFError, OSError) as e:
        raise self._error(e) from e
      if member is None:
        return
      yield member

  def extractfile(self, member):
    tar, error = self._tar, self._error

    class _Reader:
      def read(self):
        try:
          data = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
          raise error(e) from e
        if len(data) != member.size:
          raise error(EOFError(f'{member.name} is cut short'))
        return data
    return _Reader()


def _fix_image(name: str, data: bytes) -> bytes:
  """TFDS's fixes: its CMYK JPEGs and one PNG become RGB JPEGs (quality 100)."""
  if name not in tfds_imagenet.CMYK_IMAGES and (
      name not in tfds_imagenet.PNG_IMAGES):
    return data
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    image = images.decode(data, name)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=100)
    return buffer.getvalue()
  if name in tfds_imagenet.CMYK_IMAGES:
    return tfds.core.utils.jpeg_cmyk_to_rgb(data)
  return tfds.core.utils.png_to_jpeg(data)

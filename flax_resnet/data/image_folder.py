"""Your own images: torchvision's ImageFolder layout, ROOT/SPLIT/CLASS/*.jpg.

  ROOT/train/cat/001.jpg
  ROOT/train/dog/xyz.png
  ROOT/val/cat/...

Classes are the folder names under the train split in sorted order (as
torchvision's `ImageFolder` numbers them), the same for every split; there
must be at least 2, and no other split may have a class train lacks. Files
are those with an image extension torchvision accepts; hidden files and
folders are skipped. Symlinked folders are followed, but each folder is read
once: a link back to a folder already read (a loop such as `cat/again -> .`)
or to a folder holding the split is skipped. A class folder that is (or
holds) another class folder, such as a link `dog -> cat`, is refused: its
images would carry two labels.

Use it directly with `--config.dataset=folder:/path/to/ROOT` (files are read
as training goes, like torchvision), or write it once as a TFDS dataset with
`python -m flax_resnet.data.prepare NAME --source ROOT --data_dir DIR`.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterator

import numpy as np

from flax_resnet.data import images
from flax_resnet.data.cifar_source import SourceError

PREFIX = 'folder:'
# torchvision.datasets.folder.IMG_EXTENSIONS
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff',
              '.webp')
# Stored as they are; other formats, and PNGs of more than 8 bits per gray
# sample, are stored as 8-bit RGB PNGs of images.decode's pixels.
_KEEP_AS_IS = {'JPEG', 'PNG'}
_DEEP_GRAY = ('I', 'F')  # PIL modes 'I', 'I;16', 'I;16B', ..., 'F'
MIN_CLASSES = 2
# ImageFolder's usual split folder names, for config.eval_split='validation'.
_ALIASES = {'validation': ('val', 'valid'), 'val': ('validation', 'valid'),
            'test': ('val', 'validation')}


def is_folder_dataset(name: str) -> bool:
  return name.startswith(PREFIX)


def root_of(name: str) -> str:
  return os.path.abspath(os.path.expanduser(name[len(PREFIX):]))


def looks_like_image_folder(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'train'))


def _visible_dirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if e.is_dir() and not e.name.startswith('.'))


class ImageFolder:
  """The splits, classes and files of ROOT; raises SourceError if unusable."""

  def __init__(self, root: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(self.root):
      raise SourceError(
          f'{self.root} is not a folder; an image folder dataset is '
          'ROOT/train/CLASS/*.jpg (plus ROOT/val/CLASS/*.jpg).')
    self.splits = _visible_dirs(self.root)
    if 'train' not in self.splits:
      raise SourceError(
          f'{self.root} has no train/ folder (it has {self.splits}); an image '
          'folder dataset is ROOT/train/CLASS/*.jpg (plus '
          'ROOT/val/CLASS/*.jpg).')
    self.classes = _visible_dirs(os.path.join(self.root, 'train'))
    if len(self.classes) < MIN_CLASSES:
      found = (f'only 1 class folder ({self.classes[0]!r})' if self.classes
               else 'no class folders')
      raise SourceError(
          f'{self.root}/train has {found}; a classifier needs >= '
          f'{MIN_CLASSES} class folders (one per class: '
          'ROOT/train/CLASS/*.jpg).')
    self._files: dict[str, list[tuple[str, int]]] = {}

  def split_name(self, split: str) -> str:
    """The folder serving `split` (e.g. 'validation' -> 'val')."""
    if split in self.splits:
      return split
    for alias in _ALIASES.get(split, ()):
      if alias in self.splits:
        return alias
    raise SourceError(
        f'split {split!r} is not a folder of {self.root}; it has '
        f'{self.splits}.')

  def files(self, split: str) -> list[tuple[str, int]]:
    """(path, label) of every image of `split`, sorted by class then name."""
    split = self.split_name(split)
    if split not in self._files:
      base = os.path.join(self.root, split)
      unknown = sorted(set(_visible_dirs(base)) - set(self.classes))
      if unknown:
        raise SourceError(
            f'{base} has class folders {unknown} that train/ does not have; '
            f'every split must use the classes of train/: {self.classes}.')
      _check_classes_apart(base, self.classes)
      files = []
      walk = _Walk(os.path.realpath(base),
                   [os.path.join(base, name) for name in self.classes])
      for label, name in enumerate(self.classes):
        folder = os.path.join(base, name)
        if os.path.isdir(folder):
          files.extend((path, label) for path in walk.images(folder))
      if not files:
        raise SourceError(f'{base} holds no images ({", ".join(EXTENSIONS)}).')
      self._files[split] = files
    return self._files[split]

  @staticmethod
  def encoded(path: str) -> bytes:
    """The file's bytes if JPEG/PNG, else a PNG of it; SourceError names it.

    The PNG holds images.decode's pixels, as training would decode the file.
    """
    where = images.printable(path)
    try:
      data = images.read_file(path)
      image = images.open_image(data, where)
      if (image.format in _KEEP_AS_IS
          and not image.mode.startswith(_DEEP_GRAY)):
        image.verify()
        return data
      buffer = io.BytesIO()
      images.to_rgb(image, where).save(buffer, format='PNG')
      return buffer.getvalue()
    except images.ImageError as e:
      raise SourceError(str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
      raise SourceError(f'{where}: not a readable image ({e}); fix or '
                        'remove it.') from e

  def unreadable(self, split: str) -> list[str]:
    """Files of `split` that do not decode (fully), each with the reason."""
    bad = []
    for path, _ in self.files(split):
      try:
        images.decode(images.read_file(path), images.printable(path))
      except images.ImageError as e:
        fix = '' if e.fix == images.FIX else f'; {e.fix}'
        bad.append(f'{e.where} ({e.reason}{fix})')
    return bad


def _check_classes_apart(base: str, classes: list[str]) -> None:
  """Refuses two class folders of which one is (or holds) the other.

  A class folder linked to another class (`dog -> cat`, or `all -> .`) would
  put the same images under two labels.
  """
  real = {}
  for name in classes:
    folder = os.path.join(base, name)
    if os.path.isdir(folder):
      real[name] = os.path.realpath(folder)
  for name, path in real.items():
    for other, other_path in real.items():
      if other != name and (path == other_path or
                            other_path.startswith(path + os.sep)):
        link = name if os.path.islink(os.path.join(base, name)) else other
        raise SourceError(
            f'{images.printable(base)}: class folders '
            f'{images.printable(name)!r} and {images.printable(other)!r} '
            f'lead to the same images ({images.printable(path)}), which '
            f'would be read under two labels; replace the link '
            f'{images.printable(os.path.join(base, link))} with a folder of '
            'its own images, or remove it.')


class _Walk:
  """Image files below a split's class folders, each folder read once.

  Symlinked folders are followed, except a link to a folder read already (a
  second link to it, or a loop), to the split or above it, or into any class
  folder of the split: those files are read under their own class, or are
  not images of this split.
  """

  def __init__(self, split: str, class_folders: list[str]):
    self._seen = set()
    self._classes = [os.path.realpath(f) for f in class_folders]
    self._above = {split}
    while os.path.dirname(split) != split:
      split = os.path.dirname(split)
      self._above.add(split)

  def images(self, folder: str) -> Iterator[str]:
    """The images below `folder`, in os.walk's (topdown) order, sorted."""
    try:
      entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
      raise SourceError(f'{images.printable(folder)} cannot be read '
                        f'({e.strerror}); fix its permissions.') from e
    subfolders = []
    for entry in entries:
      if entry.name.startswith('.'):
        continue
      if entry.is_dir():
        if self._enter(entry):
          subfolders.append(entry.path)
      elif entry.name.lower().endswith(EXTENSIONS):
        yield entry.path
    for subfolder in subfolders:
      yield from self.images(subfolder)

  def _enter(self, entry: os.DirEntry) -> bool:
    real = os.path.realpath(entry.path)
    if real in self._seen or real in self._above or (
        entry.is_symlink() and any(real == c or real.startswith(c + os.sep)
                                   for c in self._classes)):
      return False
    self._seen.add(real)
    return True


def images_below(folder: str) -> list[str]:
  """The image files below `folder` (hidden ones skipped), sorted per folder;
  symlinked folders followed, each folder read once (no loops).

  Raises:
    SourceError: a folder cannot be read.
  """
  return list(_Walk(os.path.realpath(folder), []).images(folder))


class FolderSource:
  """Random access to one split: {'image': encoded bytes, 'label': int,
  'file_name': the file's path} (the path names the file in decode errors)."""

  def __init__(self, folder: ImageFolder, split: str):
    self._folder = folder
    self._files = folder.files(split)
    self._split = split

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, label = self._files[index]
    return {'image': self._folder.encoded(path), 'label': np.int64(label),
            'file_name': path}

  def __repr__(self) -> str:
    return (f'FolderSource({self._folder.root!r}, split={self._split!r}, '
            f'{len(self)} images)')

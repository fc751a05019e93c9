"""Your own images: torchvision's ImageFolder layout, ROOT/SPLIT/CLASS/*.jpg.

  ROOT/train/cat/001.jpg
  ROOT/train/dog/xyz.png
  ROOT/val/cat/...

Classes are the folder names under the train split in sorted order (as
torchvision's `ImageFolder` numbers them), the same for every split. Files
are those with an image extension torchvision accepts; hidden files and
folders are skipped.

Use it directly with `--config.dataset=folder:/path/to/ROOT` (files are read
as training goes, like torchvision), or write it once as a TFDS dataset with
`python -m flax_resnet.data.prepare NAME --source ROOT --data_dir DIR`.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image as PilImage

from flax_resnet.data.cifar_source import SourceError

PREFIX = 'folder:'
# torchvision.datasets.folder.IMG_EXTENSIONS
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff',
              '.webp')
# Stored as they are; other formats are re-encoded as PNG (lossless).
_KEEP_AS_IS = {'JPEG', 'PNG'}
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
    if not self.classes:
      raise SourceError(f'{self.root}/train has no class folders; put each '
                        "class's images in ROOT/train/CLASS/.")
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
      files = []
      for label, name in enumerate(self.classes):
        folder = os.path.join(base, name)
        if not os.path.isdir(folder):
          continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
          dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
          for filename in sorted(filenames):
            if (filename.lower().endswith(EXTENSIONS)
                and not filename.startswith('.')):
              files.append((os.path.join(dirpath, filename), label))
      if not files:
        raise SourceError(f'{base} holds no images ({", ".join(EXTENSIONS)}).')
      self._files[split] = files
    return self._files[split]

  def encoded(self, path: str) -> bytes:
    """The file's bytes if JPEG/PNG, else a PNG of it; SourceError names it."""
    try:
      with open(path, 'rb') as f:
        data = f.read()
      with PilImage.open(io.BytesIO(data)) as image:
        image.verify()
        kind = image.format
      if kind in _KEEP_AS_IS:
        return data
      with PilImage.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert('RGB').save(buffer, format='PNG')
        return buffer.getvalue()
    except (OSError, SyntaxError, ValueError) as e:
      raise SourceError(f'{path} is not a readable image ({e}); fix or '
                        'remove it.') from e

  def unreadable(self, split: str) -> list[str]:
    """Paths of `split` that do not decode (fully), with the reason."""
    bad = []
    for path, _ in self.files(split):
      try:
        with PilImage.open(path) as image:
          image.load()
      except (OSError, SyntaxError, ValueError) as e:
        bad.append(f'{path} ({e})')
    return bad


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

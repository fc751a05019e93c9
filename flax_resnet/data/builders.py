"""TFDS builders that write from what users have on disk, without TensorFlow.

TFDS 4.9.10 writes array_record datasets without TensorFlow (its writer,
shuffler, example serializer and DatasetInfo are plain Python + protos). Only
one step needs TF: `tfds.features.Image` encodes numpy images with
`tf.image.encode_png`. It takes already-encoded bytes unchanged, so these
builders hand it PNG bytes from Pillow (lossless: the same pixels) or the
source's own JPEG bytes.

Each builder subclasses TFDS's own (so name, version, features, description
and split names are TFDS's) and replaces only where the examples come from;
the keys are TFDS's too, so the stored order is the one TFDS's builder writes.
They are not registered: `tfds.builder('cifar10')` stays TFDS's, and reads
what these wrote.
"""

from __future__ import annotations

import io
import os
from typing import Callable, Optional

from etils import epath
import numpy as np
from PIL import Image as PilImage
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as tfds_imagenet
from tensorflow_datasets.image_classification import cifar as tfds_cifar

from flax_resnet.data import cifar_source
from flax_resnet.data import image_folder
from flax_resnet.data import images
from flax_resnet.data import imagenet_source

# Called with (split, examples done, examples expected or None) as examples
# are generated; prepare.py turns it into a progress bar.
ProgressFn = Callable[[str, int, Optional[int]], None]


def png_bytes(image: np.ndarray) -> bytes:
  """Lossless PNG of a (H, W, C) uint8 image, as tf.image.encode_png stores."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  PilImage.fromarray(np.ascontiguousarray(image)).save(buffer, format='PNG')
  return buffer.getvalue()


def _same_metadata_as(parent):
  """Class attributes that keep TFDS's metadata for a subclass elsewhere."""
  code = epath.Path(tfds_module_file(parent))

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=unused-argument
    return code

  return {'name': parent.name, 'pkg_dir_path': parent._get_pkg_dir_path(),  # pylint: disable=protected-access
          'code_path': code_path}


def tfds_module_file(cls) -> str:
  import sys  # pylint: disable=g-import-not-at-top
  return sys.modules[cls.__module__].__file__


class QuietBuilder:
  """Mixin: prepare.py prints where the data goes (TFDS would name the
  temporary folder) and shows its own progress."""

  progress: Optional[ProgressFn] = None

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _report(self, split: str, done: int, total: Optional[int]):
    if self.progress is not None:
      self.progress(split, done, total)


# ---------------------------------------------------------------------------
# CIFAR


class _CifarFromSource(QuietBuilder):
  """Shared by cifar10/cifar100: TFDS's features, keys and ids."""

  source: cifar_source.CifarSource

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is in self.source.
    counts = self.source.check_splits()
    for key, names in self.source.label_names.items():
      self.info.features[key].names = names
    return {split: self._generate_examples(f'{split}_', split, counts[split])
            for split in ('train', 'test')}

  def _generate_examples(self, split_prefix, split, expected=None):  # pylint: disable=arguments-renamed
    keys = self.source.label_keys
    index = 0
    for labels, image in self.source.examples(split):
      record = dict(zip(keys, labels))
      record['id'] = f'{split_prefix}{index:05d}'
      record['image'] = png_bytes(image)
      yield index, record
      index += 1
      self._report(split, index, expected)


class Cifar10FromSource(_CifarFromSource, tfds_cifar.Cifar10,
                        skip_registration=True):
  locals().update(_same_metadata_as(tfds_cifar.Cifar10))


class Cifar100FromSource(_CifarFromSource, tfds_cifar.Cifar100,
                         skip_registration=True):
  locals().update(_same_metadata_as(tfds_cifar.Cifar100))


# ---------------------------------------------------------------------------
# ImageNet


class Imagenet2012FromSource(QuietBuilder, tfds_imagenet.Builder,
                             skip_registration=True):
  """imagenet2012 from ILSVRC2012_img_{train,val}.tar, as TFDS reads them."""

  locals().update(_same_metadata_as(tfds_imagenet.Builder))
  source: imagenet_source.ImagenetSource

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._examples('train'),
            'validation': self._examples('validation')}

  def _examples(self, split):
    expected = self.source.num_examples(split)
    for done, (key, record) in enumerate(self.source.examples(split), 1):
      yield key, record
      self._report(split, done, expected)

  def _generate_examples(self, *args, **kwargs):  # pylint: disable=unused-argument
    raise NotImplementedError('examples come from _examples')


# ---------------------------------------------------------------------------
# A torchvision-style ImageFolder


def image_folder_builder(name: str, folder: image_folder.ImageFolder,
                         **kwargs) -> tfds.core.GeneratorBasedBuilder:
  """A builder writing `folder` as TFDS dataset `name` (version 1.0.0)."""

  class ImageFolderBuilder(QuietBuilder, tfds.core.GeneratorBasedBuilder,
                           skip_registration=True):
    """Images under ROOT/SPLIT/CLASS/, labels the sorted class folders."""

    VERSION = tfds.core.Version('1.0.0')
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=unused-argument
      return epath.Path(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f'Images from {folder.root} (ROOT/SPLIT/CLASS/*), '
                      'labels are the class folders in sorted order.',
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3)),
              'label': tfds.features.ClassLabel(names=folder.classes),
              'file_name': tfds.features.Text(),
          }),
          supervised_keys=('image', 'label'),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split)
              for split in folder.splits}

    def _generate_examples(self, split):
      files = folder.files(split)
      for done, (path, label) in enumerate(files, 1):
        # A name that is not UTF-8 (b'caf\xe9.jpg') is stored escaped.
        relative = images.printable(os.path.relpath(path, folder.root))
        yield relative, {'image': folder.encoded(path), 'label': label,
                         'file_name': relative}
        self._report(split, done, len(files))

  ImageFolderBuilder.name = name
  return ImageFolderBuilder(**kwargs)


def cifar_builder(name: str, source: cifar_source.CifarSource, **kwargs):
  cls = {'cifar10': Cifar10FromSource, 'cifar100': Cifar100FromSource}[name]
  builder = cls(**kwargs)
  builder.source = source
  return builder


def imagenet_builder(source: imagenet_source.ImagenetSource, **kwargs):
  builder = Imagenet2012FromSource(**kwargs)
  builder.source = source
  return builder


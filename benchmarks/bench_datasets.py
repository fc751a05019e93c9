"""Generated TFDS datasets for benchmarks/input_pipeline.py.

They live in their own module, not in the script, because grain pickles the
data source (and with it the builder class) for its worker processes: classes
of `__main__` are pickled by value, which TFDS builders do not support, while
this module's are pickled by reference and re-imported by the workers.
"""

import io

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

CIFAR_EXAMPLES = 2048
JPEG_EXAMPLES = 256
JPEG_HEIGHT, JPEG_WIDTH = 375, 500


def photo_like(index: int, height: int, width: int) -> np.ndarray:
  """Smooth colour structure plus sensor-like noise, so JPEG sizes are real."""
  rng = np.random.default_rng(index)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  period = 5 + index % 11
  image = np.stack([
      128 + 100 * np.sin(x / period + y / 13),
      128 + 100 * np.cos(y / (period + 3)),
      128 + 60 * np.sin(x * y / 900),
  ], -1)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


class _BenchBuilder(tfds.core.GeneratorBasedBuilder):
  """Abstract base: TFDS finds no package for a script's builders."""

  VERSION = tfds.core.Version('1.0.0')
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


class BenchCifarPng(_BenchBuilder):
  """CIFAR-shaped: 32x32x3 PNG, 10 classes."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(32, 32, 3)),
        'label': tfds.features.ClassLabel(num_classes=10),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(CIFAR_EXAMPLES):
      image = rng.integers(0, 256, (32, 32, 3), np.uint8)
      yield i, {'image': image, 'label': i % 10}


class BenchImagenetJpeg(_BenchBuilder):
  """ImageNet-shaped: 500x375 JPEG (quality 90), 1000 classes."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=1000),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(JPEG_EXAMPLES):
      buffer = io.BytesIO()
      Image.fromarray(photo_like(i, JPEG_HEIGHT, JPEG_WIDTH)).save(
          buffer, format='JPEG', quality=90)
      # Bytes are stored as given: the JPEG quality above is what is read.
      yield i, {'image': buffer.getvalue(), 'label': i % 1000}

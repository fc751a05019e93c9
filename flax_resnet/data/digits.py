"""`sklearn_digits`: a real, offline TFDS image-classification dataset.

The 1,797 8x8 handwritten digits of the UCI "Optical Recognition of
Handwritten Digits" set travel inside this package (`digits.csv.gz`, 57 KB,
byte for byte the file scikit-learn ships for `load_digits`, BSD-3-Clause), so
this dataset builds without any network access and without scikit-learn (about
60 MB of install for one small file). The name stays `sklearn_digits`: the
examples are exactly `sklearn.datasets.load_digits()`'s, which a test checks. It lets every part of the pipeline (TFDS
array_record files, `tfds.data_source`, grain) run on real images in tests and
small demos.

Split (fixed and documented, so results are comparable across machines):
  - 'test': 360 examples, stratified by class. Each class gets its share of the
    360 by largest remainder of 360 * class_count / 1797, and its examples are
    picked with `np.random.RandomState(0).permutation` (the legacy generator,
    whose stream NumPy keeps stable across versions), class by class in order
    0..9.
  - 'train': the remaining 1,437 examples.
  TFDS stores each split in its own fixed (key-hashed) order.

Features: 'image' uint8 (8, 8, 1), the 0..16 ink levels scaled to 0..255 and
rounded; 'label' ClassLabel(num_classes=10).

Importing this module registers the builder, so `tfds.builder('sklearn_digits')`
finds it. Neither building nor reading needs TensorFlow: the images are handed
to TFDS as PNG bytes (Pillow, lossless), which TFDS stores unchanged.
"""

import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from flax_resnet.data import builders

NAME = 'sklearn_digits'
NUM_TEST = 360
SPLIT_SEED = 0
_CSV = os.path.join(os.path.dirname(__file__), 'digits.csv.gz')
_MAX_INK = 16  # load_digits pixels are counts of set bits in 4x4 blocks: 0..16


def stratified_test_indices(labels: np.ndarray, num_test: int,
                            seed: int) -> np.ndarray:
  """Sorted indices of a stratified test split of exactly `num_test` items."""
  classes, counts = np.unique(labels, return_counts=True)
  exact = num_test * counts / counts.sum()
  quotas = np.floor(exact).astype(int)
  # Largest remainder: the classes closest to the next integer get the rest;
  # a stable sort keeps ties in class order so the split is reproducible.
  leftover = num_test - quotas.sum()
  order = np.argsort(-(exact - quotas), kind='stable')
  quotas[order[:leftover]] += 1
  rng = np.random.RandomState(seed)
  picked = [
      rng.permutation(np.flatnonzero(labels == c))[:q]
      for c, q in zip(classes, quotas)
  ]
  return np.sort(np.concatenate(picked))


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 8, 8, 1), labels int64 (N,)) of 'train' or 'test'."""
  table = np.loadtxt(_CSV, delimiter=',')  # 64 ink levels, then the label
  images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255 / _MAX_INK)
                    ).astype(np.uint8)
  labels = table[:, -1].astype(np.int64)
  test = np.zeros(len(labels), dtype=bool)
  test[stratified_test_indices(labels, NUM_TEST, SPLIT_SEED)] = True
  keep = {'train': ~test, 'test': test}[split]
  return images[keep][..., None], labels[keep]


class SklearnDigits(builders.QuietBuilder, tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 1,797 real 8x8 handwritten digits (no download)."""

  VERSION = tfds.core.Version('1.0.0')
  ORIGIN = "scikit-learn's copy (no download)"
  RELEASE_NOTES = {'1.0.0': 'Stratified 1,437 / 360 train / test split.'}

  # TFDS 4.9.10's default `code_path` needs the `importlib_resources` backport
  # (declared only for Python < 3.9) for builders that live inside a package;
  # this file's own path is what it would compute.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {split: self._generate_examples(split)
            for split in ('train', 'test')}

  def _generate_examples(self, split):
    images, labels = load_split(split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': builders.png_bytes(image), 'label': label}
      self._report(split, index + 1, len(labels))


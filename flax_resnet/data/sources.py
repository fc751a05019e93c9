"""Random-access example sources: prepared TFDS datasets and synthetic data.

Prepared TFDS datasets are read through `tfds` array_record data sources, which
need no TensorFlow. Images come back still encoded (JPEG/PNG bytes) so that the
grain workers decode them (and JPEGs can be decoded at reduced size).

Only the offline `sklearn_digits` dataset is built on demand; every other
missing dataset raises `DatasetNotFoundError` with the command that prepares
it (`python -m flax_resnet.data.prepare`). `folder:ROOT` reads a torchvision
ImageFolder tree directly (see image_folder.py).
"""

import dataclasses
import functools
import os
from typing import Any
import zlib

import numpy as np
import tensorflow_datasets as tfds

from flax_resnet.data import digits
from flax_resnet.data import image_folder
from flax_resnet.data import names

SYNTHETIC = 'synthetic'
# Datasets that `dataset_info` and the iterators build themselves when missing:
# they need no download.
LOCAL_DATASETS = (digits.NAME,)
_FILE_FORMAT = 'array_record'  # the only TFDS format with random access


class DatasetNotFoundError(ValueError):
  """The dataset, or one of its splits, is not prepared where asked for."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about a dataset, without decoding.

  Attributes:
    name: `config.dataset`.
    num_classes: number of label classes.
    num_train: examples in `config.train_split`.
    num_eval: examples in `config.eval_split`.
    image_shape: stored image shape; None for unknown (ragged) dimensions,
      e.g. (None, None, 3) for imagenet2012.
  """
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  image_shape: tuple[int | None, ...]


class SyntheticSource:
  """Random uint8 images and labels, the same every time for a given index."""

  def __init__(self, num_examples: int, image_size: int, num_classes: int,
               split_seed: int):
    self._num_examples = num_examples
    self._image_size = image_size
    self._num_classes = num_classes
    self._split_seed = split_seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._num_examples:
      raise IndexError(f'index {index} out of range [0, {self._num_examples})')
    rng = np.random.default_rng((self._split_seed, index))
    shape = (self._image_size, self._image_size, 3)
    return {
        'image': rng.integers(0, 256, shape, dtype=np.uint8),
        'label': rng.integers(0, self._num_classes, dtype=np.int64),
    }

  def __repr__(self) -> str:
    return (f'SyntheticSource(num_examples={self._num_examples}, '
            f'image_size={self._image_size}, num_classes={self._num_classes}, '
            f'split_seed={self._split_seed})')


def dataset_info(config) -> DatasetInfo:
  """Sizes, classes and image shape of `config.dataset`; checks the config.

  Cheap: reads dataset metadata only. Builds `sklearn_digits` if it is missing.

  Args:
    config: the run config (dataset, data_dir, train_split, eval_split,
      num_classes, and for 'synthetic' image_size and synthetic_num_examples).

  Returns:
    The dataset's `DatasetInfo`.

  Raises:
    DatasetNotFoundError: the dataset or a split is not prepared.
    ValueError: the dataset is unusable, or config.num_classes disagrees with
      the dataset.
  """
  if config.dataset == SYNTHETIC:
    _check_synthetic_config(config)
    n = config.synthetic_num_examples
    return DatasetInfo(SYNTHETIC, config.num_classes, n, n,
                       (config.image_size, config.image_size, 3))
  if image_folder.is_folder_dataset(config.dataset):
    folder = _image_folder(config)
    return DatasetInfo(
        name=config.dataset,
        num_classes=len(folder.classes),
        num_train=len(_folder_split(folder, config, 'train_split')),
        num_eval=len(_folder_split(folder, config, 'eval_split')),
        image_shape=(None, None, 3))
  builder, num_classes = _checked_builder(config)
  return DatasetInfo(
      name=config.dataset,
      num_classes=num_classes,
      num_train=_split_size(builder, config.train_split, 'train_split'),
      num_eval=_split_size(builder, config.eval_split, 'eval_split'),
      image_shape=tuple(builder.info.features['image'].shape),
  )


def open_source(config, split_field: str):
  """Random-access source (dicts of numpy) of one split of `config.dataset`.

  Args:
    config: the run config.
    split_field: 'train_split' or 'eval_split', the config field naming the
      split (and named in errors).

  Returns:
    A sequence-like source; TFDS image features come back encoded (bytes).
  """
  split = config[split_field]
  if config.dataset == SYNTHETIC:
    _check_synthetic_config(config)
    # Different split names give different (but fixed) examples.
    return SyntheticSource(config.synthetic_num_examples, config.image_size,
                           config.num_classes, zlib.crc32(split.encode()))
  if image_folder.is_folder_dataset(config.dataset):
    folder = _image_folder(config)
    _folder_split(folder, config, split_field)
    return image_folder.FolderSource(folder, split)
  builder, _ = _checked_builder(config)
  _split_size(builder, split, split_field)
  decoders = None
  if isinstance(builder.info.features['image'], tfds.features.Image):
    decoders = {'image': tfds.decode.SkipDecoding()}
  return builder.as_data_source(split=split, decoders=decoders)


def _prepare_lib():
  # Imported on use: `python -m flax_resnet.data.prepare` must be able to run
  # it as __main__ after this package is imported.
  from flax_resnet.data import prepare  # pylint: disable=g-import-not-at-top
  return prepare


@functools.lru_cache(maxsize=8)
def _walked_folder(root: str) -> image_folder.ImageFolder:
  # One instance per root, so dataset_info and each open_source share its
  # file lists: walking an ImageNet-sized tree once is enough.
  return image_folder.ImageFolder(root)


def _image_folder(config) -> image_folder.ImageFolder:
  """The folder of `folder:ROOT`, checked against config.num_classes."""
  try:
    folder = _walked_folder(image_folder.root_of(config.dataset))
  except image_folder.SourceError as e:
    raise DatasetNotFoundError(f'config.dataset={config.dataset!r}: {e}') from e
  if config.num_classes != len(folder.classes):
    raise ValueError(
        f'config.num_classes is {config.num_classes} but '
        f'{config.dataset!r} has {len(folder.classes)} classes (the folders '
        f'of train/: {folder.classes[:5]}{"..." if len(folder.classes) > 5 else ""}'
        f'); set config.num_classes to {len(folder.classes)}.')
  return folder


def _folder_split(folder, config, field: str):
  try:
    folder.split_name(config[field])
  except image_folder.SourceError as e:  # it lists the splits there are
    raise DatasetNotFoundError(
        f'config.{field}={config[field]!r}: {e} Set config.{field} to one of '
        'them.') from e
  try:
    return folder.files(config[field])
  except image_folder.SourceError as e:  # the split's own folders or files
    raise DatasetNotFoundError(f'config.{field}={config[field]!r}: {e}') from e


def _check_synthetic_config(config) -> None:
  if config.synthetic_num_examples <= 0:
    raise ValueError(
        f'config.synthetic_num_examples is {config.synthetic_num_examples}; '
        "dataset='synthetic' needs a positive number of examples.")


def _display_data_dir(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def prepared_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name`, prepared in array_record format.

  Prepares the offline datasets (LOCAL_DATASETS) on first use.

  Raises:
    DatasetNotFoundError: not a TFDS name, not prepared, or stored in
      another format; the message says how to prepare it.
  """
  problem = names.tfds_name_error(name)
  if problem:
    raise DatasetNotFoundError(
        f'config.dataset: {problem} Or use {SYNTHETIC!r}, or '
        f'{image_folder.PREFIX}ROOT for an image folder.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f'config.dataset={name!r} is not a TFDS dataset. Use '
        f"'{image_folder.PREFIX}ROOT' (your images, ROOT/train/CLASS/*.jpg), "
        f"{SYNTHETIC!r}, {digits.NAME!r} (offline) or a name from "
        '`tfds.list_builders()`, e.g. cifar10 or imagenet2012.') from e
  if not builder.is_prepared() and builder.name in LOCAL_DATASETS:
    try:
      _prepare_lib().prepare(name, data_dir, progress=False)
    except _prepare_lib().PrepareError as e:
      raise DatasetNotFoundError(f'config.dataset={name!r}: {e}') from e
    builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_how_to_prepare(builder, name, data_dir))
  formats = {f.value for f in builder.info.available_file_formats()}
  if _FILE_FORMAT not in formats:
    raise DatasetNotFoundError(
        f'Dataset {name!r} in {builder.data_dir} is stored as '
        f'{sorted(formats)}, but reading it without TensorFlow needs '
        f'{_FILE_FORMAT}. Prepare it again (move the old folder away first) '
        'with\n  ' + _prepare_lib().command(name, _display_data_dir(data_dir)))
  return builder


def _how_to_prepare(builder, name: str, data_dir: str | None) -> str:
  """Error text naming the dataset, data_dir and the command to prepare it."""
  shown_dir = _display_data_dir(data_dir)
  message = (f'Dataset {name!r} is not prepared in data_dir={shown_dir} '
             f'(config.data_dir={data_dir!r}; looked for {builder.data_dir}).')
  if builder.name == 'imagenet2012':
    return (f'{message}\nImageNet cannot be downloaded automatically:\n'
            '  1. get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            'from https://image-net.org/download-images into one FOLDER\n'
            '  2. run: ' + _prepare_lib().command(name, shown_dir, 'FOLDER') +
            '\n(about 150 GB of disk for the prepared dataset).')
  if builder.name in ('cifar10', 'cifar100'):
    number = builder.name[len('cifar'):]
    return (f'{message}\nPrepare it from the archive you have '
            f'(cifar-{number}-python.tar.gz, cifar-{number}-binary.tar.gz or '
            "torchvision's extracted folder):\n  " +
            _prepare_lib().command(name, shown_dir, 'PATH') +
            '\nor download it:\n  ' + _prepare_lib().command(name, shown_dir))
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    return (f'{message}\nThis dataset needs a manual download into '
            f'{os.path.join(shown_dir, "downloads", "manual")}/:\n{manual}\n'
            'then run: ' + _prepare_lib().command(name, shown_dir))
  return (f'{message}\nDownload and prepare it with:\n  ' +
          _prepare_lib().command(name, shown_dir))


def _checked_builder(config):
  """(prepared builder, number of classes), checked against the config."""
  builder = prepared_builder(config.dataset, config.data_dir)
  features = builder.info.features
  missing = [key for key in ('image', 'label') if key not in features]
  if missing:
    raise ValueError(
        f'Dataset {builder.name!r} has features {sorted(features.keys())} but '
        f'the pipeline reads "image" and "label" (missing: {missing}); choose '
        'an image-classification dataset for config.dataset.')
  num_classes = getattr(features['label'], 'num_classes', None)
  if num_classes is None:
    # Without a ClassLabel feature the per-example label check in the
    # transforms is the only guard; trust the config here.
    return builder, config.num_classes
  if config.num_classes != num_classes:
    raise ValueError(
        f'config.num_classes is {config.num_classes} but dataset '
        f'{config.dataset!r} has {num_classes} classes (its label feature is '
        f'ClassLabel(num_classes={num_classes})); set config.num_classes to '
        f'{num_classes}.')
  return builder, num_classes


def _split_size(builder, split: str, field: str) -> int:
  """Examples in `split`; raises if it does not exist or is empty."""
  available = sorted(builder.info.splits.keys())
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise DatasetNotFoundError(
        f'config.{field}={split!r} is not a split of dataset '
        f'{builder.name!r} (in {builder.data_dir}); available splits: '
        f'{available}. Set config.{field} to one of them (slices such as '
        "'train[:90%]' also work).") from e
  if num_examples == 0:
    raise ValueError(
        f'config.{field}={split!r} of dataset {builder.name!r} is empty (0 '
        f'examples); available splits: {available}.')
  return num_examples

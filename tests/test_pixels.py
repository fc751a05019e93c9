"""The table normaliser of uint8 pixels (flax_resnet/data/pixels.py).

Its floats must be numpy's `(image.astype(float32) - mean) / std`, bit for
bit, for every pixel value and channel, whatever the strides of the image;
where it cannot help it writes nothing and the numpy path runs instead.
"""

import textwrap

import conftest
import numpy as np
import pytest

from flax_resnet.data import pixels
from flax_resnet.data import preprocess

IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
CIFAR = ((125.307, 122.95, 113.865), (62.9932, 62.0887, 66.7048))


@pytest.fixture(autouse=True)
def extension():
  conftest.require_extension(pixels, 'pixel normaliser')


def numpy_formula(image, mean, std):
  return ((image.astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


def assert_bitwise_equal(got, want):
  assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def every_value_image(channels: int, seed: int = 0) -> np.ndarray:
  """(16, 48, C): every value 0..255 in every channel, shuffled per channel."""
  rng = np.random.default_rng(seed)
  planes = [rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 3))
            for _ in range(channels)]
  return np.stack(planes, -1).reshape(16, 48, channels)


@pytest.mark.parametrize('mean,std', [
    IMAGENET, CIFAR, ((0.0,) * 3, (1.0,) * 3), ((85.0,) * 3, (110.0,) * 3),
    ((-3.5, 300.0, 0.1), (1e-3, 7e4, 0.3))])
def test_every_value_of_every_channel_equals_numpy(mean, std):
  image = every_value_image(3)
  out = np.empty(image.shape, np.float32)
  table = pixels.normalization_table(mean, std)
  assert pixels.normalize_into(image, table, out)
  assert_bitwise_equal(out, numpy_formula(image, mean, std))


@pytest.mark.parametrize('view', [
    'contiguous', 'left-right flip', 'upside down', 'crop', 'strided crop',
    'both flips'])
def test_views_of_any_row_and_pixel_strides(view):
  base = every_value_image(3, seed=1)
  image = {'contiguous': base, 'left-right flip': base[:, ::-1],
           'upside down': base[::-1], 'crop': base[3:-2, 5:-7],
           'strided crop': base[1::3, ::-2], 'both flips': base[::-1, ::-1]
           }[view]
  out = np.full(image.shape, np.nan, np.float32)
  assert pixels.normalize_into(image, pixels.normalization_table(*IMAGENET),
                               out)
  assert_bitwise_equal(out, numpy_formula(image, *IMAGENET))


@pytest.mark.parametrize('channels', [1, 2, 4])
def test_other_channel_counts(channels):
  image = every_value_image(channels, seed=channels)
  mean, std = (100.0, 50.0, 3.0, 200.0)[:channels], (
      60.0, 2.0, 0.5, 70.0)[:channels]
  out = np.empty(image.shape, np.float32)
  assert pixels.normalize_into(image, pixels.normalization_table(mean, std),
                               out)
  assert_bitwise_equal(out, numpy_formula(image, mean, std))


def test_arrays_it_does_not_take_are_left_to_numpy_untouched():
  image = every_value_image(3)
  table = pixels.normalization_table(*IMAGENET)
  out = np.full(image.shape, 7.0, np.float32)
  refused = [
      (image.astype(np.float32), table, out),  # not uint8
      (image[..., ::-1], table, out),  # channels not adjacent
      (image[0], table, out[0]),  # not (H, W, C)
      (image, table, np.empty(image.shape, np.float64)),
      (image, table, np.empty((16, 47, 3), np.float32)),
      (image, pixels.normalization_table((1.0,) * 4, (1.0,) * 4),
       np.empty(image.shape, np.float32)),  # table for 4 channels
      (image, table.astype(np.float64), out),
      (image, np.asfortranarray(table), out),
  ]
  for args in refused:
    assert not pixels.normalize_into(*args)
  strided_out = np.full((16, 96, 3), 7.0, np.float32)
  assert not pixels.normalize_into(image, table, strided_out[:, ::2])
  read_only = np.full(image.shape, 7.0, np.float32)
  read_only.flags.writeable = False
  assert not pixels.normalize_into(image, table, read_only)
  assert (out == 7.0).all() and (strided_out == 7.0).all()
  assert (read_only == 7.0).all()


@pytest.mark.parametrize('shape', [(224, 224, 3), (5, 7, 3), (1, 1, 3)])
def test_batches_equal_with_and_without_the_extension(shape, monkeypatch):
  options = preprocess.PreprocessOptions(
      dataset='d', split='train', num_classes=10, image_size=shape[0],
      augment='none', eval_crop_ratio=0.875, mean_rgb=IMAGENET[0],
      std_rgb=IMAGENET[1])
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, shape, dtype=np.uint8),
               'label': np.int32(i)} for i in range(4)]
  examples[1]['image'] = examples[1]['image'][:, ::-1]  # a flip view
  fast = preprocess.NormalizedBatch(options)(examples)
  monkeypatch.setattr(pixels.extension, 'library', None)
  monkeypatch.setattr(pixels.extension, 'failure', 'switched off by the test')
  slow = preprocess.NormalizedBatch(options)(examples)
  assert_bitwise_equal(fast['image'], slow['image'])
  for example, image in zip(examples, fast['image']):
    assert_bitwise_equal(image, numpy_formula(example['image'], *IMAGENET))


def test_switch_off_and_build_failure_warn_once_and_fall_back(tmp_path):
  script = textwrap.dedent('''
      import numpy as np
      from flax_resnet.data import pixels, preprocess
      options = preprocess.PreprocessOptions(
          dataset='d', split='train', num_classes=10, image_size=4,
          augment='none', eval_crop_ratio=0.875, mean_rgb=(1.0, 2.0, 3.0),
          std_rgb=(4.0, 5.0, 6.0))
      image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
      for _ in range(3):
        batch = preprocess.NormalizedBatch(options)(
            [{'image': image, 'label': np.int32(0)}])
      want = (image.astype(np.float32) - np.float32([1, 2, 3])) / np.float32(
          [4, 5, 6])
      assert (batch['image'][0] == want).all()
      print('available', pixels.available(), pixels.unavailable_reason())
  ''')
  conftest.check_extension_fallback(script, 'FLAX_RESNET_PIXELS', 'pixel',
                                    tmp_path / 'cache')

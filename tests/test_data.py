"""Input pipeline: TFDS array_record sources, grain iterators, preprocessing.

The TFDS datasets here are real array_record files, built in a temporary
directory by tiny builders defined below (plus the offline sklearn_digits), not
`tfds.testing.mock_data`: in tensorflow-datasets 4.9.10 mock_data serves
`data_source` reads but leaves `builder.is_prepared()` False and
`builder.info.splits` empty (no metadata ships for cifar10/imagenet2012), so
the preparedness, split and file-format checks this package makes could only
be tested by patching them away. Real files exercise the actual read path.
"""

import io
import subprocess
import sys
import textwrap
import threading

import chex
from etils import epath
import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import base
from flax_resnet import data
from flax_resnet.data import digits
from flax_resnet.data import preprocess
from flax_resnet.data import sources

tfds.disable_progress_bar()

CIFAR_TRAIN, CIFAR_TEST = 24, 13
JPEG_SIZES = [(48, 64), (64, 48), (40, 40), (30, 90), (90, 30), (57, 71),
              (33, 47)]
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)


# ----------------------------------------------------------------------------
# Tiny real TFDS datasets.


class _TestBuilder(tfds.core.GeneratorBasedBuilder):
  """Abstract (so unregistered) base for builders defined in a test module.

  TFDS looks for a builder's code and metadata through its package, which a
  top-level test module does not have; point both at this file.
  """

  VERSION = tfds.core.Version('1.0.0')
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def cifar_images(split: str) -> np.ndarray:
  """Random (so unambiguous after any shift or flip) 32x32 RGB images."""
  n, seed = {'train': (CIFAR_TRAIN, 0), 'test': (CIFAR_TEST, 1)}[split]
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), np.uint8)


class FrTestCifar(_TestBuilder):
  """cifar10's features (id, 32x32x3 PNG image, 10 classes); label = i % 10."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'id': tfds.features.Text(),
        'image': tfds.features.Image(shape=(32, 32, 3)),
        'label': tfds.features.ClassLabel(num_classes=10),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    for i, image in enumerate(cifar_images(split)):
      yield i, {'id': f'{split}_{i}', 'image': image, 'label': i % 10}


def jpeg_image(index: int) -> np.ndarray:
  """Smooth (JPEG-friendly) image of size JPEG_SIZES[index]."""
  h, w = JPEG_SIZES[index]
  y, x = np.mgrid[0:h, 0:w]
  image = np.stack([255 * x / w, 255 * y / h,
                    127 + 120 * np.sin((x + y + 7 * index) / 5)], -1)
  return image.astype(np.uint8)


class FrTestJpeg(_TestBuilder):
  """imagenet2012's features (file_name, variable-size JPEG, ClassLabel)."""

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'file_name': tfds.features.Text(),
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=5),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(range(5)),
            'validation': self._generate_examples(range(5, 7))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {'file_name': f'{i}.jpeg', 'image': jpeg_image(i),
                'label': i % 5}


class FrTestBad(_TestBuilder):
  """Datasets the pipeline must refuse, one per builder config."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n)
                     for n in ('rank', 'dtype', 'channels', 'label')]

  def _info(self):
    image = {
        'rank': tfds.features.Tensor(shape=(6,), dtype=np.uint8),
        'dtype': tfds.features.Tensor(shape=(6, 6, 3), dtype=np.int32),
        'channels': tfds.features.Tensor(shape=(6, 6, 4), dtype=np.uint8),
        'label': tfds.features.Image(shape=(6, 6, 3)),
    }[self.builder_config.name]
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        'image': image,
        # A plain integer, not a ClassLabel: only the per-example check can
        # catch an out-of-range label.
        'label': tfds.features.Scalar(dtype=np.int64),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    shape = self.info.features['image'].shape
    dtype = self.info.features['image'].np_dtype
    for i in range(6):
      label = 12 if i == 3 else i  # one bad label among good ones
      yield i, {'image': np.full(shape, i, dtype), 'label': label}


def build(name: str, data_dir, file_format: str = 'array_record') -> str:
  builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare(file_format=file_format)
  return str(data_dir)


@pytest.fixture(scope='session')
def cifar_dir(tmp_path_factory):
  return build('fr_test_cifar', tmp_path_factory.mktemp('cifar'))


@pytest.fixture(scope='session')
def jpeg_dir(tmp_path_factory):
  return build('fr_test_jpeg', tmp_path_factory.mktemp('jpeg'))


@pytest.fixture(scope='session')
def bad_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('bad')
  for name in ('rank', 'dtype', 'channels', 'label'):
    build(f'fr_test_bad/{name}', data_dir)
  return str(data_dir)


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """An empty data_dir in which the first dataset_info call builds digits."""
  data_dir = str(tmp_path_factory.mktemp('digits'))
  info = data.dataset_info(make_config(
      dataset='sklearn_digits', data_dir=data_dir, eval_split='test',
      num_classes=10))
  return data_dir, info


def make_config(**overrides):
  config = base.get_config()
  config.worker_count = 0
  config.prefetch_batches = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def cifar_config(cifar_dir, **overrides):
  return make_config(**{
      'dataset': 'fr_test_cifar', 'data_dir': cifar_dir, 'eval_split': 'test',
      'num_classes': 10, 'image_size': 32, 'augment': 'cifar',
      'mean_rgb': CIFAR_MEAN, 'std_rgb': CIFAR_STD, 'batch_size': 8,
      'eval_batch_size': 8, **overrides})


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def to_pixels(images, config):
  """Undo the normalisation; checks the result is whole uint8 values."""
  pixels = (np.asarray(images, np.float64) * np.asarray(config.std_rgb)
            + np.asarray(config.mean_rgb))
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-3)
  assert np.all((pixels >= -1e-3) & (pixels <= 255 + 1e-3))
  return np.rint(pixels).astype(np.uint8)


def cifar_candidates(images):
  """(N, 9*9, 2, 32, 32, 3): every zero-padded 4-pixel shift, then flip."""
  pad = preprocess.CIFAR_PAD
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shifts = np.stack([padded[:, dy:dy + 32, dx:dx + 32]
                     for dy in range(2 * pad + 1)
                     for dx in range(2 * pad + 1)], 1)
  return np.stack([shifts, shifts[..., ::-1, :]], 2)


def identify(image, candidates):
  """(index, shift, flipped) of the one candidate equal to `image`."""
  matches = np.argwhere(np.all(candidates == image, axis=(-3, -2, -1)))
  assert len(matches) == 1, f'{len(matches)} matching stored images'
  return tuple(int(m) for m in matches[0])


# ----------------------------------------------------------------------------
# Training stream.


def test_cifar_train_is_padded_shifted_flipped_stored_images(cifar_dir):
  config = cifar_config(cifar_dir)
  candidates = cifar_candidates(cifar_images('train'))
  per_epoch = CIFAR_TRAIN // config.batch_size
  batches = take(data.make_train_iterator(config), 2 * per_epoch)
  found = []
  for batch in batches:
    chex.assert_shape(batch['image'], (8, 32, 32, 3))
    chex.assert_type([batch['image'], batch['label']], [np.float32, np.int32])
    for image, label in zip(to_pixels(batch['image'], config), batch['label']):
      index, shift, flipped = identify(image, candidates)
      assert label == index % 10
      found.append((index, shift, flipped))
  epochs = [found[:CIFAR_TRAIN], found[CIFAR_TRAIN:]]
  orders = [[index for index, _, _ in epoch] for epoch in epochs]
  # Each epoch is a permutation, reshuffled between epochs.
  assert sorted(orders[0]) == sorted(orders[1]) == list(range(CIFAR_TRAIN))
  assert orders[0] != orders[1]
  centre = (2 * preprocess.CIFAR_PAD + 1) ** 2 // 2
  shifts = [shift for _, shift, _ in found]
  assert sum(shift != centre for shift in shifts) > len(found) // 2
  assert len(set(shifts)) > 10
  assert {flipped for _, _, flipped in found} == {0, 1}
  # The same image is augmented differently in the next epoch.
  augment = [dict((i, (s, f)) for i, s, f in epoch) for epoch in epochs]
  assert sum(augment[0][i] != augment[1][i] for i in range(CIFAR_TRAIN)) > 12


def test_train_stream_is_fixed_by_seed(cifar_dir):
  first = take(data.make_train_iterator(cifar_config(cifar_dir)), 4)
  again = take(data.make_train_iterator(cifar_config(cifar_dir)), 4)
  assert_batches_equal(first, again)
  other = take(data.make_train_iterator(cifar_config(cifar_dir, seed=1)), 4)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_process_shards_interleave_to_the_single_process_batch(cifar_dir):
  config = cifar_config(cifar_dir)
  whole = take(data.make_train_iterator(config), 4)
  shards = [take(data.make_train_iterator(config, process_index=p,
                                          process_count=2), 4)
            for p in range(2)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label'):
      local = [shards[p][step][key] for p in range(2)]
      assert local[0].shape[0] == config.batch_size // 2
      interleaved = np.stack(local, 1).reshape(batch[key].shape)
      np.testing.assert_array_equal(interleaved, batch[key])


def test_state_round_trip_resumes_bit_for_bit(cifar_dir):
  config = cifar_config(cifar_dir)
  iterator = data.make_train_iterator(config)
  take(iterator, 5)
  state = iterator.get_state()
  expected = take(iterator, 3)  # crosses into the third epoch
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_state_carries_over_to_another_process_count(cifar_dir):
  config = cifar_config(cifar_dir)
  single = data.make_train_iterator(config)
  take(single, 5)
  state = single.get_state()
  expected = take(single, 2)
  shards = []
  for p in range(2):
    shard = data.make_train_iterator(config, process_index=p, process_count=2)
    shard.set_state(state)
    shards.append(take(shard, 2))
  for step, batch in enumerate(expected):
    interleaved = np.stack([shards[p][step]['image'] for p in range(2)], 1)
    np.testing.assert_array_equal(
        interleaved.reshape(batch['image'].shape), batch['image'])


def test_state_of_another_data_order_is_refused(cifar_dir):
  iterator = data.make_train_iterator(cifar_config(cifar_dir))
  next(iterator)
  state = iterator.get_state()
  other = data.make_train_iterator(cifar_config(cifar_dir, seed=1))
  with pytest.raises(ValueError, match='seed: saved 0, now 1'):
    other.set_state(state)
  other = data.make_train_iterator(cifar_config(cifar_dir, batch_size=4))
  with pytest.raises(ValueError, match='batch_size: saved 8, now 4'):
    other.set_state(state)


def test_state_round_trip_through_orbax_checkpoint_manager(cifar_dir,
                                                           tmp_path):
  config = cifar_config(cifar_dir)
  iterator = data.make_train_iterator(config)
  take(iterator, 5)
  # Two ways: grain's handler, which reads the iterator's state at save(), or
  # the state dict as plain JSON (for a loop that tracks the state itself).
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(5, args=ocp.args.Composite(
        params=ocp.args.StandardSave({'w': np.arange(3.0)}),
        data_iter=grain.checkpoint.CheckpointSave(iterator),
        data_state=ocp.args.JsonSave(iterator.get_state())))
    expected = take(iterator, 3)  # while an async save may still be running
    manager.wait_until_finished()
  resumed = data.make_train_iterator(config)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    restored = manager.restore(5, args=ocp.args.Composite(
        params=ocp.args.StandardRestore({'w': np.zeros(3)}),
        data_iter=grain.checkpoint.CheckpointRestore(resumed),
        data_state=ocp.args.JsonRestore()))
  assert restored['data_iter'] is resumed
  np.testing.assert_array_equal(restored['params']['w'], np.arange(3.0))
  assert_batches_equal(take(resumed, 3), expected)
  from_json = data.make_train_iterator(config)
  from_json.set_state(restored['data_state'])
  assert_batches_equal(take(from_json, 3), expected)


def test_worker_processes_give_the_same_resumable_stream(digits_dir):
  data_dir, _ = digits_dir
  config = make_config(dataset='sklearn_digits', data_dir=data_dir,
                       eval_split='test', num_classes=10, image_size=8,
                       augment='cifar', batch_size=16, prefetch_batches=1)
  in_process = take(data.make_train_iterator(config), 6)
  config.worker_count = 2
  iterator = data.make_train_iterator(config)
  try:
    assert_batches_equal(take(iterator, 3), in_process[:3])
    state = iterator.get_state()
    assert_batches_equal(take(iterator, 3), in_process[3:])
  finally:
    iterator.close()
  # The state is a batch index, so it resumes without workers as well.
  config.worker_count = 0
  resumed = data.make_train_iterator(config)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), in_process[3:])


def test_imagenet_augmentation_on_jpeg_bytes(jpeg_dir):
  config = make_config(dataset='fr_test_jpeg', data_dir=jpeg_dir,
                       num_classes=5, image_size=24, batch_size=4)
  batches = take(data.make_train_iterator(config), 6)
  low = (0 - np.asarray(config.mean_rgb)) / np.asarray(config.std_rgb)
  high = (255 - np.asarray(config.mean_rgb)) / np.asarray(config.std_rgb)
  for batch in batches:
    chex.assert_shape(batch['image'], (4, 24, 24, 3))
    chex.assert_type([batch['image'], batch['label']], [np.float32, np.int32])
    assert np.all(batch['image'] >= low - 1e-5)
    assert np.all(batch['image'] <= high + 1e-5)
    assert np.all((batch['label'] >= 0) & (batch['label'] < 5))
  # Random crops: an example never comes out the same twice in 6 batches.
  images = np.concatenate([b['image'] for b in batches]).reshape(24, -1)
  assert len(np.unique(images, axis=0)) == 24
  assert_batches_equal(take(data.make_train_iterator(config), 6), batches)


def test_train_batches_without_the_jpeg_decoder_take_the_same_crops(
    jpeg_dir, monkeypatch):
  """Switched off, PIL decodes: same crop boxes, flips, shapes and dtypes."""
  from flax_resnet.data import jpeg  # pylint: disable=g-import-not-at-top
  config = make_config(dataset='fr_test_jpeg', data_dir=jpeg_dir,
                       num_classes=5, image_size=24, batch_size=4,
                       prefetch_batches=0)
  calls = []
  original = preprocess.StoredImage.crop_resize
  this_thread = threading.get_ident()

  def recording(self, box, size, reduced_decode=False, flip=False):
    # Read-ahead threads of other tests' iterators may still be running.
    if threading.get_ident() == this_thread:
      calls.append((box, size, reduced_decode, flip))
    return original(self, box, size, reduced_decode, flip)

  monkeypatch.setattr(preprocess.StoredImage, 'crop_resize', recording)
  assert jpeg.available(), jpeg.unavailable_reason()
  with_decoder, with_decoder_calls = take(
      data.make_train_iterator(config), 4), calls[:]
  calls.clear()
  monkeypatch.setattr(jpeg.extension, 'library', None)
  monkeypatch.setattr(jpeg.extension, 'failure', 'switched off by the test')
  with_pil = take(data.make_train_iterator(config), 4)
  assert calls == with_decoder_calls and len(calls) == 1 + 4 * 4
  for ours, pils in zip(with_decoder, with_pil):
    assert ours.keys() == pils.keys()
    chex.assert_equal_shape([ours['image'], pils['image']])
    chex.assert_type([ours['image'], pils['image'], ours['label']],
                     [np.float32, np.float32, np.int32])
    np.testing.assert_array_equal(ours['label'], pils['label'])
    # Same decoded pixels; PIL's resize may round in another pass order on
    # the smaller window (tests/test_jpeg.py): one level, divided by std.
    np.testing.assert_allclose(ours['image'], pils['image'], rtol=0,
                               atol=1.0001 / min(config.std_rgb))


# ----------------------------------------------------------------------------
# Evaluation.


def test_eval_covers_every_example_once_across_two_processes():
  config = make_config(dataset='synthetic', synthetic_num_examples=13,
                       num_classes=7, image_size=8, augment='imagenet',
                       eval_batch_size=4)
  source = sources.open_source(config, 'eval_split')
  stored = {source[i]['image'].tobytes(): i for i in range(13)}
  assert len(stored) == 13
  seen = []
  for p, num_real in ((0, 7), (1, 6)):
    evaluation = data.make_eval_iterator(config, process_index=p,
                                         process_count=2)
    batches = list(evaluation)
    assert len(batches) == 4  # ceil(ceil(13 / 2) / 2): same for both
    assert_batches_equal(list(evaluation), batches)  # re-iterable, same order
    mask = np.concatenate([b['mask'] for b in batches])
    chex.assert_type(mask, bool)
    np.testing.assert_array_equal(mask, np.arange(8) < num_real)
    for batch in batches:
      chex.assert_shape([batch['image'], batch['label']], [(2, 8, 8, 3), (2,)])
      real = batch['mask']
      np.testing.assert_array_equal(batch['image'][~real], 0)
      np.testing.assert_array_equal(batch['label'][~real], 0)
      pixels = to_pixels(batch['image'][real], config)
      for image, label in zip(pixels, batch['label'][real]):
        index = stored[image.tobytes()]
        assert label == source[index]['label']
        seen.append(index)
  assert sorted(seen) == list(range(13))


def test_eval_digits_resized_grayscale_in_stored_order(digits_dir):
  data_dir, _ = digits_dir
  config = make_config(dataset='sklearn_digits', data_dir=data_dir,
                       eval_split='test', num_classes=10, image_size=16,
                       augment='cifar', mean_rgb=(0.0,) * 3,
                       std_rgb=(1.0,) * 3, eval_batch_size=100)
  batches = list(data.make_eval_iterator(config))
  assert len(batches) == 4
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 360 and mask[:360].all()
  images = np.concatenate([b['image'] for b in batches])[:360]
  labels = np.concatenate([b['label'] for b in batches])[:360]
  stored = tfds.data_source('sklearn_digits', split='test', data_dir=data_dir,
                            download=False)
  for i in (0, 1, 359):
    gray = stored[i]['image'][..., 0]
    expected = np.asarray(Image.fromarray(gray).resize(
        (16, 16), Image.Resampling.BILINEAR))
    for channel in range(3):
      np.testing.assert_array_equal(images[i, ..., channel], expected)
    assert labels[i] == stored[i]['label']


def test_eval_imagenet_resize_centre_crop(jpeg_dir):
  config = make_config(dataset='fr_test_jpeg', data_dir=jpeg_dir,
                       num_classes=5, image_size=16, eval_batch_size=4,
                       mean_rgb=(0.0,) * 3, std_rgb=(1.0,) * 3)
  batches = list(data.make_eval_iterator(config))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]['mask'], [True, True, False, False])
  stored = tfds.data_source('fr_test_jpeg', split='validation',
                            data_dir=jpeg_dir, download=False)
  for i in range(2):
    decoded = stored[i]['image']  # full-size decode by TFDS
    h, w = decoded.shape[:2]
    # Reference: resize shorter side to round(16 / 0.875) = 18, centre crop.
    new_h, new_w = (18, int(18 * w / h)) if h <= w else (int(18 * h / w), 18)
    resized = np.asarray(Image.fromarray(decoded).resize(
        (new_w, new_h), Image.Resampling.BILINEAR), np.float32)
    top, left = round((new_h - 16) / 2), round((new_w - 16) / 2)
    reference = resized[top:top + 16, left:left + 16]
    # Same decoder (PIL's libjpeg); resizing only the kept box samples the same
    # positions, up to rounding in PIL's fixed-point filter weights.
    assert np.abs(batches[0]['image'][i] - reference).max() <= 1


# ----------------------------------------------------------------------------
# Preprocessing functions.


def test_resize_centre_crop_box_equals_resize_then_crop():
  image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), np.uint8)
  options = preprocess.PreprocessOptions('d', 's', 10, 32, 'imagenet', 0.875,
                                         (0.0,) * 3, (1.0,) * 3)
  ours = preprocess.eval_image(preprocess.StoredImage(image, 'd'), options)
  resized = np.asarray(Image.fromarray(image).resize(
      (int(37 * 70 / 45), 37), Image.Resampling.BILINEAR), np.int16)
  top, left = round((37 - 32) / 2), round((resized.shape[1] - 32) / 2)
  reference = resized[top:top + 32, left:left + 32]
  assert np.abs(ours.astype(np.int16) - reference).max() <= 1


def test_jpeg_reduced_decode_keeps_the_crop_box():
  image = jpeg_image(0)  # 48 x 64
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  encoded = buffer.getvalue()
  box = (10, 6, 42, 38)  # 32 x 32 -> 8 x 8: decodable at 1/4 scale
  from_bytes = preprocess.StoredImage(encoded, 'd').crop_resize(
      box, 8, reduced_decode=True)
  decoded = np.asarray(Image.open(io.BytesIO(encoded)))
  full = preprocess.StoredImage(decoded, 'd').crop_resize(box, 8)
  shifted = preprocess.StoredImage(decoded, 'd').crop_resize(
      (0, 0, 32, 32), 8)
  error = np.abs(from_bytes.astype(float) - full).mean()
  assert 0 < error < 3  # > 0: the reduced decode really happened
  assert np.abs(shifted.astype(float) - full).mean() > 5 * error


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(500):
    left, top, right, bottom = preprocess.random_resized_crop_box(rng, 80, 100)
    assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
    w, h = right - left, bottom - top
    areas.append(w * h / 8000)
    aspects.append(w / h)
  # Rounding to whole pixels moves area and aspect a little past the ranges.
  assert 0.08 * 0.9 <= min(areas) and max(areas) <= 1.0
  assert min(areas) < 0.15 and max(areas) > 0.8
  assert 0.75 * 0.9 <= min(aspects) and max(aspects) <= 4 / 3 / 0.9
  # No crop of 8%-100% area and aspect <= 4/3 fits a 10-pixel-high strip:
  # the fallback is the centre 13 x 10 (the widest allowed aspect).
  box = preprocess.random_resized_crop_box(rng, 10, 200)
  assert box == (93, 0, 106, 10)


def test_to_rgb_array_accepts_grayscale_and_float():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  rgb = preprocess.to_rgb_array(gray, 'd')
  chex.assert_shape(rgb, (3, 4, 3))
  np.testing.assert_array_equal(rgb[..., 2], gray)
  floats = preprocess.to_rgb_array(np.full((2, 2, 3), 254.6), 'd')
  assert floats.dtype == np.uint8 and (floats == 255).all()
  with pytest.raises(ValueError, match='0..255 scale'):
    preprocess.to_rgb_array(np.full((2, 2, 3), 300.0), 'd')


def test_synthetic_dataset():
  config = make_config(dataset='synthetic', synthetic_num_examples=20,
                       num_classes=3, image_size=12, batch_size=8)
  info = data.dataset_info(config)
  assert info == data.DatasetInfo('synthetic', 3, 20, 20, (12, 12, 3))
  batches = take(data.make_train_iterator(config), 5)  # wraps past 20
  for batch in batches:
    chex.assert_shape([batch['image'], batch['label']], [(8, 12, 12, 3), (8,)])
    assert set(np.unique(batch['label'])) <= {0, 1, 2}
  assert len(np.unique(np.concatenate([b['label'] for b in batches]))) == 3
  train = sources.open_source(config, 'train_split')
  np.testing.assert_array_equal(train[4]['image'], train[4]['image'])
  evaluation = sources.open_source(config, 'eval_split')
  assert not np.array_equal(train[4]['image'], evaluation[4]['image'])


# ----------------------------------------------------------------------------
# The offline digits dataset.


def test_digits_built_on_first_use_with_fixed_stratified_split(digits_dir):
  data_dir, info = digits_dir
  assert info == data.DatasetInfo('sklearn_digits', 10, 1437, 360, (8, 8, 1))
  files = list(epath.Path(data_dir).glob('sklearn_digits/1.0.0/*'))
  assert any('array_record' in f.name for f in files)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  target = datasets.load_digits().target
  test = digits.stratified_test_indices(target, digits.NUM_TEST, 0)
  assert len(np.unique(test)) == 360
  counts = np.bincount(target, minlength=10)
  np.testing.assert_allclose(np.bincount(target[test], minlength=10),
                             360 * counts / counts.sum(), atol=1)
  for split, size in (('train', 1437), ('test', 360)):
    stored = tfds.data_source('sklearn_digits', split=split,
                              data_dir=data_dir, download=False)
    expected_images, expected_labels = digits.load_split(split)
    assert len(stored) == size
    examples = [stored[i] for i in range(size)]
    assert set(int(e['label']) for e in examples) == set(range(10))
    got = sorted((int(e['label']), e['image'].tobytes()) for e in examples)
    want = sorted(zip(expected_labels.tolist(),
                      (im.tobytes() for im in expected_images)))
    assert got == want
    assert examples[0]['image'].dtype == np.uint8
    assert max(e['image'].max() for e in examples) == 255
  # The packaged file holds exactly scikit-learn's digits, in its order.
  images = np.concatenate([digits.load_split(s)[0] for s in ('train', 'test')])
  labels = np.concatenate([digits.load_split(s)[1] for s in ('train', 'test')])
  order = np.argsort(np.concatenate([np.flatnonzero(~np.isin(
      np.arange(1797), test)), test]))
  np.testing.assert_array_equal(labels[order], target)
  np.testing.assert_array_equal(
      images[order][..., 0],
      np.round(datasets.load_digits().images * 255 / 16).astype(np.uint8))


def test_reading_needs_no_tensorflow(digits_dir):
  data_dir, _ = digits_dir
  script = textwrap.dedent(f"""
      import sys
      from configs import base
      from flax_resnet import data
      c = base.get_config()
      c.update(dict(dataset='sklearn_digits', data_dir={data_dir!r},
                    eval_split='test', num_classes=10, image_size=8,
                    augment='cifar', batch_size=4, eval_batch_size=4,
                    worker_count=0))
      next(data.make_train_iterator(c))
      next(iter(data.make_eval_iterator(c)))
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
      """)
  root = str(epath.Path(__file__).parent.parent)
  result = subprocess.run([sys.executable, '-c', script], cwd=root,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]


# ----------------------------------------------------------------------------
# Errors.


def test_missing_downloadable_dataset_says_how_to_build_it(tmp_path):
  config = make_config(dataset='cifar10', data_dir=str(tmp_path),
                       num_classes=10)
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.dataset_info(config)
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert (f'python -m flax_resnet.data.prepare cifar10 --data_dir {tmp_path} '
          '--source PATH') in message
  assert 'cifar-10-python.tar.gz, cifar-10-binary.tar.gz' in message
  assert not list(tmp_path.iterdir())  # nothing downloaded or built
  with pytest.raises(data.DatasetNotFoundError):
    data.make_train_iterator(config)


def test_missing_imagenet_says_where_the_tars_go(tmp_path):
  config = make_config(dataset='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.make_eval_iterator(config)
  message = str(error.value)
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in message
  assert (f'python -m flax_resnet.data.prepare imagenet2012 --data_dir '
          f'{tmp_path} --source FOLDER') in message


def test_unknown_dataset_name():
  with pytest.raises(data.DatasetNotFoundError, match="'no_such_set'"):
    data.dataset_info(make_config(dataset='no_such_set'))


def test_missing_split_names_the_available_ones(digits_dir):
  data_dir, _ = digits_dir
  config = make_config(dataset='sklearn_digits', data_dir=data_dir,
                       num_classes=10, eval_split='valid')
  with pytest.raises(data.DatasetNotFoundError,
                     match=r"config.eval_split='valid'.*\['test', 'train'\]"):
    data.dataset_info(config)
  config.eval_split, config.train_split = 'test', 'training'
  with pytest.raises(data.DatasetNotFoundError, match='config.train_split'):
    data.make_train_iterator(config)


def test_empty_split_is_an_error(digits_dir):
  data_dir, _ = digits_dir
  config = make_config(dataset='sklearn_digits', data_dir=data_dir,
                       num_classes=10, eval_split='test[5:5]')
  with pytest.raises(ValueError, match=r"eval_split='test\[5:5\]'.*empty"):
    data.make_eval_iterator(config)


def test_num_classes_must_match_the_dataset(digits_dir):
  data_dir, _ = digits_dir
  config = make_config(dataset='sklearn_digits', data_dir=data_dir,
                       eval_split='test', num_classes=100)
  with pytest.raises(ValueError, match='set config.num_classes to 10'):
    data.dataset_info(config)


def test_tfrecord_dataset_asks_for_array_record(tmp_path):
  build('fr_test_cifar', tmp_path, file_format='tfrecord')
  config = cifar_config(str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError,
                     match='(?s)array_record.*python -m flax_resnet.data.prepare fr_test_cifar'):
    data.dataset_info(config)


@pytest.mark.parametrize('name, match', [
    ('rank', r'rank 1'),
    ('dtype', r'dtype int32'),
    ('channels', r'4 channels'),
])
def test_bad_images_fail_at_iterator_creation(bad_dir, name, match):
  config = make_config(dataset=f'fr_test_bad/{name}', data_dir=bad_dir,
                       eval_split='train', num_classes=20, image_size=6)
  for make_iterator in (data.make_train_iterator, data.make_eval_iterator):
    with pytest.raises(ValueError, match=match):
      make_iterator(config)


def test_out_of_range_label_is_caught_per_example(bad_dir):
  config = make_config(dataset='fr_test_bad/label', data_dir=bad_dir,
                       eval_split='train', num_classes=10, image_size=6,
                       eval_batch_size=2)
  with pytest.raises(ValueError, match=(
      r"config.num_classes is 10 but label 12 appeared.*set "
      r"config.num_classes to the dataset's")):
    list(data.make_eval_iterator(config))
  config.num_classes = 13
  batches = list(data.make_eval_iterator(config))
  assert sorted(np.concatenate([b['label'] for b in batches])) == [
      0, 1, 2, 4, 5, 12]


@pytest.mark.parametrize('overrides, process_count, match', [
    ({'batch_size': 10}, 3, 'config.batch_size=10 must be a positive multiple'),
    ({'eval_batch_size': 9}, 2, 'config.eval_batch_size=9'),
    ({'augment': 'random'}, 1, 'config.augment'),
    ({'eval_crop_ratio': 0.0}, 1, 'config.eval_crop_ratio'),
    ({'mean_rgb': (1.0, 2.0)}, 1, 'config.mean_rgb'),
    ({'std_rgb': (1.0, 0.0, 1.0)}, 1, 'config.std_rgb'),
    ({'worker_count': -1}, 1, 'config.worker_count'),
    ({'synthetic_num_examples': 0}, 1, 'config.synthetic_num_examples'),
])
def test_bad_config_fields_are_named(overrides, process_count, match):
  config = make_config(dataset='synthetic', num_classes=10, image_size=8,
                       batch_size=12, eval_batch_size=12)
  config.update(overrides)
  for make_iterator in (data.make_train_iterator, data.make_eval_iterator):
    with pytest.raises(ValueError, match=match):
      make_iterator(config, process_index=0, process_count=process_count)


@pytest.mark.parametrize('shape', [(224, 224, 3), (5, 7, 3), (1, 1, 3)])
def test_normalizer_rows_equal_the_plain_formula_bit_for_bit(shape):
  options = preprocess.PreprocessOptions(
      dataset='d', split='train', num_classes=10, image_size=shape[0],
      augment='none', eval_crop_ratio=0.875,
      mean_rgb=(123.675, 116.28, 103.53), std_rgb=(58.395, 57.12, 57.375))
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  flipped = image[:, ::-1]  # what the random flip hands over: a view
  got = preprocess._Normalizer(options)(flipped)
  mean = np.asarray(options.mean_rgb, np.float32)
  std = np.asarray(options.std_rgb, np.float32)
  want = (flipped.astype(np.float32) - mean) / std
  assert got.dtype == np.float32 and got.shape == shape
  np.testing.assert_array_equal(got, want)

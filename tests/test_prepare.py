"""prepare: upstream CIFAR/ImageNet archives and image folders -> TFDS datasets.

Every source is synthesized in its exact upstream layout (upstream_archives.py),
prepared, and read back with `tfds.data_source` as training reads it. Where
TensorFlow is installed, TFDS's own cifar10/cifar100/imagenet2012 builders
build the same archives, and the two datasets must agree example by example.
No test touches the network.
"""

import io
import os
import re
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import upstream_archives as ua
from flax_resnet.data import imagenet_source
from flax_resnet.data import prepare as prepare_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tfds.disable_progress_bar()


def prepare(name, data_dir, source=None):
  return prepare_lib.prepare(name, str(data_dir), source and str(source),
                             progress=False, log=lambda *_: None)


def read_split(name, data_dir, split):
  """Decoded examples in stored order, as lists of dicts of numpy."""
  source = tfds.data_source(name, split=split, data_dir=str(data_dir))
  return [source[i] for i in range(len(source))]


def by_id(examples):
  return {e['id'].decode(): e for e in examples}


def has_tensorflow():
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def check_cifar(name, data_dir, data):
  """The prepared dataset holds exactly `data`, in TFDS's ids and names."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  assert builder.is_prepared()
  assert builder.info.file_format.value == 'array_record'
  label = builder.info.features['label']
  if name == 'cifar10':
    assert label.names == ua.CIFAR10_NAMES
  else:
    assert label.names == ua.CIFAR100_FINE
    assert builder.info.features['coarse_label'].names == ua.CIFAR100_COARSE
  for split, (labels, images) in data.items():
    examples = by_id(read_split(name, data_dir, split))
    assert builder.info.splits[split].num_examples == len(images)
    assert sorted(examples) == [f'{split}_{i:05d}' for i in range(len(images))]
    for i, image in enumerate(images):
      example = examples[f'{split}_{i:05d}']
      np.testing.assert_array_equal(example['image'], image)
      assert example['label'] == labels[i, -1]
      if name == 'cifar100':
        assert example['coarse_label'] == labels[i, 0]


def dataset_files(data_dir, name):
  """{file name: bytes} of the prepared version folder."""
  (version,) = os.listdir(os.path.join(data_dir, name))
  folder = os.path.join(data_dir, name, version)
  return {f: open(os.path.join(folder, f), 'rb').read()
          for f in sorted(os.listdir(folder))}


# ---------------------------------------------------------------------------
# CIFAR in every upstream form


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('form', ['binary', 'python', 'torchvision_folder',
                                  'extracted_binary', 'folder_with_archive'])
def test_cifar_source_gives_its_examples(tmp_path, name, form):
  data = ua.cifar_data(name, seed=3)
  kind = 'binary' if form in ('binary', 'extracted_binary') else 'python'
  archive = ua.cifar_archive(tmp_path, name, kind, data)
  files = (ua.cifar_binary_files if kind == 'binary' else
           ua.cifar_python_files)(name, data)
  source = {
      'binary': archive, 'python': archive,
      # torchvision's root: ROOT/cifar-10-batches-py (and its tar.gz).
      'torchvision_folder': ua.extract(files, tmp_path / 'torchvision_root'),
      'extracted_binary': os.path.join(
          ua.extract(files, tmp_path / 'x'), next(iter(files)).split('/')[0]),
      'folder_with_archive': tmp_path,
  }[form]
  prepare(name, tmp_path / 'data', source)
  check_cifar(name, tmp_path / 'data', data)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_binary_and_python_archives_give_identical_datasets(tmp_path, name):
  data = ua.cifar_data(name, seed=5)
  prepare(name, tmp_path / 'bin', ua.cifar_archive(tmp_path, name, 'binary',
                                                   data))
  prepare(name, tmp_path / 'py', ua.cifar_archive(tmp_path, name, 'python',
                                                  data))
  # The same bytes: same PNGs, same order, same metadata.
  assert dataset_files(tmp_path / 'bin', name) == dataset_files(
      tmp_path / 'py', name)


@pytest.mark.skipif(not has_tensorflow(), reason='TFDS\'s own cifar builder '
                    'encodes with TensorFlow')
@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_equals_what_tfds_own_builder_writes(tmp_path, monkeypatch,
                                                    name):
  """TFDS's cifar builder on the same archive (its download replaced)."""
  data = ua.cifar_data(name, seed=7)
  archive = ua.cifar_archive(tmp_path, name, 'binary', data)
  extracted = tmp_path / 'extracted'
  with tarfile.open(archive) as tar:
    tar.extractall(extracted)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, url: str(extracted))
  theirs = tmp_path / 'tfds'
  tfds.builder(name, data_dir=str(theirs), file_format='array_record'
               ).download_and_prepare(file_format='array_record')
  ours = tmp_path / 'ours'
  prepare(name, ours, archive)

  info = lambda d: tfds.builder(name, data_dir=str(d)).info  # pylint: disable=unnecessary-lambda-assignment
  assert info(ours).features.to_json() == info(theirs).features.to_json()
  assert info(ours).version == info(theirs).version
  assert info(ours).supervised_keys == info(theirs).supervised_keys
  for split in ('train', 'test'):
    assert (info(ours).splits[split].shard_lengths ==
            info(theirs).splits[split].shard_lengths)
    mine, tfds_own = (read_split(name, d, split) for d in (ours, theirs))
    # Same examples in the same stored order (TFDS's keys), same pixels.
    assert [e['id'] for e in mine] == [e['id'] for e in tfds_own]
    for a, b in zip(mine, tfds_own):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert (dataset_files(ours, name)['label.labels.txt'] ==
          dataset_files(theirs, name)['label.labels.txt'])


# ---------------------------------------------------------------------------
# ImageNet


def test_imagenet_tars_give_their_images_and_tfds_labels(tmp_path):
  train, val = ua.imagenet_files()
  source = ua.imagenet_tars(tmp_path / 'manual', train, val)
  prepare('imagenet2012', tmp_path / 'data', source)
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path / 'data'))
  assert builder.is_prepared()
  assert builder.info.features['label'].names == imagenet_source.synsets()
  names = builder.info.features['label'].names
  stored = tfds.data_source('imagenet2012', data_dir=str(tmp_path / 'data'),
                            decoders={'image': tfds.decode.SkipDecoding()})
  got = {e['file_name'].decode(): e for e in
         (stored['train'][i] for i in range(len(stored['train'])))}
  assert len(got) == len(train) * ua.IMAGENET_PER_SYNSET
  for synset, images in train.items():
    for file_name, jpeg in images.items():
      assert got[file_name]['image'] == jpeg  # the JPEG bytes, unchanged
      assert names[got[file_name]['label']] == synset
  val_labels = imagenet_source.validation_synsets()
  got = {e['file_name'].decode(): e for e in
         (stored['validation'][i] for i in range(len(stored['validation'])))}
  assert sorted(got) == sorted(val)
  for number, file_name in enumerate(sorted(val), 1):
    assert got[file_name]['image'] == val[file_name]
    assert names[got[file_name]['label']] == val_labels[number - 1]
  # The real first validation image is a snake (n01751748, sea snake).
  assert names[got['ILSVRC2012_val_00000001.JPEG']['label']] == 'n01751748'


@pytest.mark.skipif(not has_tensorflow(), reason='TFDS\'s own imagenet '
                    'builder reads with TensorFlow')
def test_imagenet_equals_what_tfds_own_builder_writes(tmp_path):
  train, val = ua.imagenet_files()
  # One of TFDS's CMYK images, which both must re-encode as RGB.
  train['n01440764']['n01739381_1309.JPEG'] = ua.jpeg(99, mode='CMYK')
  manual = ua.imagenet_tars(tmp_path / 'manual', train, val)
  theirs = tmp_path / 'tfds'
  tfds.builder('imagenet2012', data_dir=str(theirs),
               file_format='array_record').download_and_prepare(
                   file_format='array_record',
                   download_config=tfds.download.DownloadConfig(
                       manual_dir=manual))
  ours = tmp_path / 'ours'
  prepare('imagenet2012', ours, manual)
  for split in ('train', 'validation'):
    raw = {'image': tfds.decode.SkipDecoding()}
    mine = tfds.data_source('imagenet2012', split=split, data_dir=str(ours),
                            decoders=raw)
    tfds_own = tfds.data_source('imagenet2012', split=split,
                                data_dir=str(theirs), decoders=raw)
    assert len(mine) == len(tfds_own)
    for i in range(len(mine)):
      a, b = mine[i], tfds_own[i]
      assert a['file_name'] == b['file_name']  # same stored order
      assert a['label'] == b['label']
      assert a['image'] == b['image']  # identical JPEG bytes


# ---------------------------------------------------------------------------
# Your own images


def make_image_folder(root, bad=False):
  """ROOT/{train,val}/{cat,dog,eel}/ images of several formats and sizes."""
  rng = np.random.default_rng(0)
  images = {}
  for split, n in (('train', 3), ('val', 2)):
    for c, cls in enumerate(('eel', 'cat', 'dog')):  # created out of order
      folder = os.path.join(root, split, cls)
      os.makedirs(folder)
      for i in range(n):
        pixels = rng.integers(0, 256, (12 + i, 10 + c, 3), dtype=np.uint8)
        ext = ('png', 'jpg', 'bmp')[i % 3]
        path = os.path.join(folder, f'{i}.{ext}')
        Image.fromarray(pixels).save(path)
        images[path] = pixels
  with open(os.path.join(root, 'train', 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image, and not an image extension: skipped')
  if bad:
    with open(os.path.join(root, 'train', 'dog', 'broken.jpg'), 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return images


def test_image_folder_prepared_keeps_sorted_classes_and_pixels(tmp_path):
  images = make_image_folder(tmp_path / 'pets')
  prepare('my_pets', tmp_path / 'data', tmp_path / 'pets')
  builder = tfds.builder('my_pets', data_dir=str(tmp_path / 'data'))
  assert builder.info.features['label'].names == ['cat', 'dog', 'eel']
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'val')
          } == {'train': 9, 'val': 6}
  for split in ('train', 'val'):
    for example in read_split('my_pets', tmp_path / 'data', split):
      path = os.path.join(tmp_path, 'pets', example['file_name'].decode())
      cls = path.split(os.sep)[-2]
      assert builder.info.features['label'].names[example['label']] == cls
      if not path.endswith('.jpg'):  # PNG and BMP are stored losslessly
        np.testing.assert_array_equal(example['image'], images[path])


def test_image_folder_unreadable_files_are_named(tmp_path, capsys):
  make_image_folder(tmp_path / 'pets', bad=True)
  rc = prepare_lib.main(['my_pets', '--data_dir', str(tmp_path / 'data'),
                         '--source', str(tmp_path / 'pets')])
  err = capsys.readouterr().err
  assert rc == 1
  assert err.startswith('error: 1 unreadable image(s)')
  assert os.path.join(str(tmp_path), 'pets', 'train', 'dog', 'broken.jpg') in err
  assert not os.path.exists(tmp_path / 'data' / 'my_pets')


def test_folder_dataset_reads_the_tree_directly(tmp_path):
  from configs import base  # pylint: disable=g-import-not-at-top
  from flax_resnet import data  # pylint: disable=g-import-not-at-top
  make_image_folder(tmp_path / 'pets')
  config = base.get_config()
  config.dataset = f'folder:{tmp_path / "pets"}'
  config.num_classes, config.image_size = 3, 8
  config.train_split, config.eval_split = 'train', 'validation'  # -> val/
  config.batch_size = config.eval_batch_size = 3
  config.worker_count, config.augment = 0, 'none'
  info = data.dataset_info(config)
  assert (info.num_classes, info.num_train, info.num_eval) == (3, 9, 6)
  batches = list(data.make_eval_iterator(config))
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # cat, dog, eel: sorted
  config.num_classes = 4
  with pytest.raises(ValueError, match=r'has 3 classes .*\[.cat., .dog., '
                     r'.eel.\]'):
    data.dataset_info(config)


def test_folder_dataset_names_a_truncated_jpeg(tmp_path):
  """Its header reads fine (it passes the start-up check); its pixels do not."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from flax_resnet import data  # pylint: disable=g-import-not-at-top
  make_image_folder(tmp_path / 'pets')
  path = os.path.join(str(tmp_path), 'pets', 'train', 'cat', 'big.jpg')
  pixels = np.random.default_rng(1).integers(0, 256, (64, 80, 3), np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, format='JPEG', quality=90)
  with open(path, 'wb') as f:
    f.write(encoded.getvalue()[:len(encoded.getvalue()) // 2])
  config = base.get_config()
  config.dataset = f'folder:{tmp_path / "pets"}'
  config.num_classes, config.image_size = 3, 8
  config.batch_size, config.worker_count = 10, 0
  iterator = data.make_train_iterator(config)
  with pytest.raises(ValueError, match=re.escape(f"file_name '{path}'")):
    next(iterator)
  iterator.close()

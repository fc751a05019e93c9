"""Hostile image folders and prepare arguments.

Symlink loops, one-class folders, splits with classes train lacks, dataset
names that escape --data_dir or that training cannot find, a --data_dir
inside the image folder, file names that are not UTF-8, and a decompression
bomb: each gets one `error:` line naming the file or field and the fix (or,
for loops and odd names, just works), and nothing is written outside
--data_dir or half-written inside it.
"""

import os
import re

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from flax_resnet.data import image_folder
from flax_resnet.data import images
from flax_resnet.data import names
from flax_resnet.data import prepare as prepare_lib
from flax_resnet.data import sources
from test_prepare import make_image_folder, prepare, read_split

tfds.disable_progress_bar()
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def image_tree(root, classes=('cat', 'dog'), per_class=6, splits=('train',)):
  """ROOT/SPLIT/CLASS/i.png, tiny images whose pixel value is unique."""
  paths = []
  for split in splits:
    for c, name in enumerate(classes):
      folder = os.path.join(root, split, name)
      os.makedirs(folder)
      for i in range(per_class):
        path = os.path.join(folder, f'{i}.png')
        Image.new('L', (2, 2), 10 * c + i).save(path)
        paths.append(path)
  return paths


def listed(root, split='train'):
  return image_folder.ImageFolder(str(root)).files(split)


def snapshot(root):
  """Every path under root (links not followed), for "nothing written"."""
  found = set()
  for folder, dirs, files in os.walk(root):
    found.update(os.path.join(folder, n) for n in dirs + files)
  return found


def run_main(capsys, *args):
  rc = prepare_lib.main([*map(str, args), '--no_progress'])
  err = capsys.readouterr().err
  return rc, err


def assert_one_error_line(rc, err):
  assert rc == 1
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert 'Traceback' not in err


# ---------------------------------------------------------------------------
# Walking a folder: each folder once, links followed


@pytest.mark.parametrize('link, target', [
    ('cat/again', '.'),  # the loop: 252 files for 12 before
    ('cat/up', '..'),  # the split: would read dog/ into cat
    ('cat/top', '../..'),  # the root: other splits too
    ('cat/dogs', '../dog'),  # another class: its files twice
])
def test_links_back_into_the_tree_are_read_once(tmp_path, link, target):
  paths = image_tree(tmp_path, splits=('train', 'val'))
  os.symlink(target, tmp_path / 'train' / link)
  files = listed(tmp_path)
  assert sorted(files) == sorted(
      (p, 0 if '/cat/' in p else 1) for p in paths if '/train/' in p)


@pytest.mark.parametrize('link, target', [
    ('dog', 'cat'),  # before: cat's images listed again as dog's
    ('all', '.'),  # a class holding every other class
    ('pets', '../..'),  # the root: every split under one more class
])
def test_a_class_folder_linked_to_another_class_is_refused(tmp_path, capsys,
                                                          link, target):
  """A leftover of round 7: `dog -> cat` read each image under both labels."""
  image_tree(tmp_path / 'pets',
             classes=('cat', 'eel') if link == 'dog' else ('cat', 'dog'))
  os.symlink(target, tmp_path / 'pets' / 'train' / link)
  with pytest.raises(image_folder.SourceError) as e:
    listed(tmp_path / 'pets')
  message = str(e.value)
  real = os.path.realpath(tmp_path / 'pets' / 'train' / link)
  assert f'lead to the same images ({real}), which would be read under two labels' in message, message
  assert f'replace the link {tmp_path}/pets/train/{link} ' in message, message
  # Training says the same, without the advice for a missing split.
  config = folder_config(tmp_path / 'pets',
                         num_classes=len(os.listdir(tmp_path / 'pets/train')))
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.dataset_info(config)
  assert str(e.value) == f"config.train_split='train': {message}", e.value
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert "class folders '" in err and f"'{link}'" in err, err
  assert not os.path.exists(tmp_path / 'data' / 'my_pets')


def test_symlinked_class_and_subfolders_are_followed(tmp_path):
  """Legitimate links: a class kept on another disk, a shared subfolder."""
  image_tree(tmp_path / 'root')
  elsewhere = image_tree(tmp_path / 'elsewhere', classes=('eel', 'more'),
                         per_class=3)
  os.symlink(tmp_path / 'elsewhere' / 'train' / 'eel',
             tmp_path / 'root' / 'train' / 'eel')
  more = tmp_path / 'elsewhere' / 'train' / 'more'
  os.symlink(more, tmp_path / 'root' / 'train' / 'cat' / 'more')
  os.symlink(more, tmp_path / 'root' / 'train' / 'cat' / 'same_again')
  files = listed(tmp_path / 'root')
  labels = {}
  for path, label in files:
    labels.setdefault(label, []).append(os.path.realpath(path))
  assert len(files) == 6 + 3 + 6 + 3
  assert len({os.path.realpath(p) for p, _ in files}) == len(files)
  assert sorted(labels[2]) == sorted(p for p in elsewhere if '/eel/' in p)
  assert sum('/more/' in p for p in labels[0]) == 3  # linked twice, read once


@FAST
@given(links=st.lists(st.tuples(st.sampled_from(['cat', 'dog', 'cat/sub',
                                                   'dog/sub']),
                                st.sampled_from(['.', '..', '../..', 'cat',
                                                 'dog', 'cat/sub', 'dog/sub',
                                                 'train', 'val'])),
                      max_size=5))
def test_any_links_list_each_file_at_most_once_with_its_own_class(tmp_path_factory,
                                                                  links):
  root = tmp_path_factory.mktemp('tree')
  paths = image_tree(root, splits=('train', 'val'))
  for folder in ('cat', 'dog'):
    os.makedirs(root / 'train' / folder / 'sub')
    Image.new('L', (2, 2)).save(root / 'train' / folder / 'sub' / 'x.png')
  for i, (where, target) in enumerate(links):
    # Targets relative to train/ (or to the link's folder for . and ..).
    link = root / 'train' / where / f'link{i}'
    real = (target if target.startswith('.') else
            os.path.relpath(root / ('train/' + target if target not in (
                'train', 'val') else target), link.parent))
    os.symlink(real, link)
  files = listed(root)
  real = [os.path.realpath(p) for p, _ in files]
  assert len(set(real)) == len(real)
  for path, label in zip(real, (label for _, label in files)):
    owner = os.path.relpath(path, root).split(os.sep)
    if owner[0] == 'train':  # its own class, whatever link led there
      assert label == ['cat', 'dog'].index(owner[1]), (path, label)
  # Every file really under train/CLASS is listed.
  assert {os.path.realpath(p) for p in paths if '/train/' in p} <= set(real)


# ---------------------------------------------------------------------------
# Classes: at least 2, and no split with a class train lacks


def folder_config(root, num_classes=2):
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.dataset = f'folder:{root}'
  config.num_classes = num_classes
  config.train_split = config.eval_split = 'train'
  return config


@pytest.mark.parametrize('classes', [('cat',), ()])
def test_fewer_than_two_classes_is_refused_before_training(tmp_path, classes,
                                                           capsys):
  image_tree(tmp_path / 'pets', classes=classes)
  os.makedirs(tmp_path / 'pets' / 'train', exist_ok=True)
  found = "only 1 class folder ('cat')" if classes else 'no class folders'
  message = (f'{tmp_path}/pets/train has {found}; a classifier needs >= 2 '
             'class folders')
  with pytest.raises(sources.DatasetNotFoundError, match=re.escape(message)):
    sources.dataset_info(folder_config(tmp_path / 'pets', 1))
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert message in err
  assert not os.path.exists(tmp_path / 'data' / 'my_pets')


def test_a_split_with_a_class_train_lacks_names_both(tmp_path, capsys):
  image_tree(tmp_path / 'pets', splits=('train',))
  image_tree(tmp_path / 'pets', classes=('cat', 'eel'), splits=('val',))
  config = folder_config(tmp_path / 'pets')
  config.eval_split = 'val'
  message = (f"{tmp_path}/pets/val has class folders ['eel'] that train/ does "
             "not have; every split must use the classes of train/: "
             "['cat', 'dog']")
  with pytest.raises(sources.DatasetNotFoundError, match=re.escape(message)):
    sources.dataset_info(config)
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert message in err


# ---------------------------------------------------------------------------
# Dataset names: the rule training reads them by, in one place


@FAST
@given(name=st.text(alphabet='aZ_9./-:ü \\', max_size=8))
def test_prepare_accepts_exactly_the_names_training_finds(name):
  """An accepted name stays in --data_dir and is the folder TFDS reads."""
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  if names.new_name_error(name) is None:
    assert str(naming.parse_builder_name_kwargs(name)[0]) == name
    assert os.path.dirname(os.path.normpath(os.path.join('/d', name))) == '/d'
    assert names.tfds_name_error(name) is None


@pytest.mark.parametrize('name, message', [
    ('../escaped', "dataset name '../escaped' is not one training can read"),
    ('TMP/abs', "dataset name 'TMP/abs' is not one training can read"),
    ('', "dataset name '' is not one training can read"),
    ('2024_photos', "dataset name '2024_photos' is not one training can read"),
    ('MyPhotos', "dataset name 'MyPhotos': TFDS reads names in snake_case, so "
                 "training would look for 'my_photos'; use the name my_photos"),
])
def test_a_bad_dataset_name_is_refused_and_nothing_written(tmp_path, capsys,
                                                           name, message):
  make_image_folder(tmp_path / 'src' / 'pets')
  name, message = (text.replace('TMP', str(tmp_path)) for text in (name,
                                                                   message))
  before = snapshot(tmp_path)
  rc, err = run_main(capsys, name, '--source', tmp_path / 'src' / 'pets',
                     '--data_dir', tmp_path / 'src' / 'data')
  assert_one_error_line(rc, err)
  assert message in err
  assert snapshot(tmp_path) == before


def test_training_refuses_a_name_tfds_cannot_read_in_one_line():
  config = folder_config('unused')
  config.dataset = '../escaped'
  with pytest.raises(sources.DatasetNotFoundError) as error:
    sources.dataset_info(config)
  assert str(error.value).startswith(
      "config.dataset: dataset name '../escaped' is not one TFDS reads")
  assert '\n' not in str(error.value)


def test_a_folder_named_with_a_digit_first_gets_a_valid_name(tmp_path):
  make_image_folder(tmp_path / '2024 Pets')
  final = prepare(f'folder:{tmp_path / "2024 Pets"}', tmp_path / 'data')
  assert final == str(tmp_path / 'data' / 'folder_2024_pets' / '1.0.0')


# ---------------------------------------------------------------------------
# --data_dir and --source apart


@pytest.mark.parametrize('data_dir', ['.', 'train/cat/prepared', 'val'])
def test_a_data_dir_inside_the_image_folder_is_refused(tmp_path, capsys,
                                                       data_dir):
  make_image_folder(tmp_path / 'pets')
  before = snapshot(tmp_path)
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'pets' / data_dir)
  assert_one_error_line(rc, err)
  assert (f'--data_dir {os.path.normpath(tmp_path / "pets" / data_dir)} is '
          f'inside --source {tmp_path / "pets"}') in err
  assert 'Choose a --data_dir outside the image folder.' in err
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize('inside', ['my_pets/raw', 'downloads/pets'])
def test_an_image_folder_inside_what_prepare_writes_is_refused(
    tmp_path, capsys, inside):
  make_image_folder(tmp_path / 'data' / inside)
  before = snapshot(tmp_path)
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'data' / inside,
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert (f'--source {tmp_path / "data" / inside} is inside '
          f'{tmp_path / "data" / inside.split("/")[0]}, which prepare writes'
          ) in err
  assert snapshot(tmp_path) == before


def test_a_data_dir_beside_the_image_folder_in_one_parent_is_fine(tmp_path):
  make_image_folder(tmp_path / 'data' / 'pets_raw')  # a sibling of my_pets/
  final = prepare('my_pets', tmp_path / 'data', tmp_path / 'data' / 'pets_raw')
  assert final == str(tmp_path / 'data' / 'my_pets' / '1.0.0')


# ---------------------------------------------------------------------------
# File names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_prepared_and_named_escaped(
    tmp_path, capsys):
  make_image_folder(tmp_path / 'pets')
  cat = os.fsencode(tmp_path / 'pets' / 'train' / 'cat')
  pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  Image.fromarray(pixels).save(os.path.join(cat, b'caf\xe9.png'))
  prepare('my_pets', tmp_path / 'data', tmp_path / 'pets')
  examples = {e['file_name'].decode(): e
              for e in read_split('my_pets', tmp_path / 'data', 'train')}
  assert len(examples) == 10
  np.testing.assert_array_equal(examples['train/cat/caf\\xe9.png']['image'],
                                pixels)
  # An unreadable one is named in the one error line, escaped the same way.
  with open(os.path.join(cat, b'\xffbroken.png'), 'wb'):
    pass
  rc, err = run_main(capsys, 'my_pets2', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert (f'{tmp_path}/pets/train/cat/\\xffbroken.png (empty file (0 bytes))'
          in err)


# ---------------------------------------------------------------------------
# One limit for prepare and training


def test_a_decompression_bomb_is_one_error_in_prepare_and_in_training(
    tmp_path, capsys, monkeypatch):
  from flax_resnet import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)
  monkeypatch.setenv(images.MAX_PIXELS_ENV, '400')
  image_tree(tmp_path / 'pets')
  big = tmp_path / 'pets' / 'train' / 'dog' / 'big.png'
  Image.new('RGB', (21, 20)).save(big)
  message = (f'{big} (21x20 = 420 pixels, more than the limit of 400 (a guard '
             'against decompression bombs: decoding it would take 0.0 GB); '
             'resize it, or if it is legitimate raise the limit: '
             'FLAX_RESNET_MAX_IMAGE_PIXELS=420)')
  rc, err = run_main(capsys, 'my_pets', '--source', tmp_path / 'pets',
                     '--data_dir', tmp_path / 'data')
  assert_one_error_line(rc, err)
  assert message in err
  config = folder_config(tmp_path / 'pets')
  config.image_size, config.batch_size, config.worker_count = 8, 13, 0
  iterator = data.make_train_iterator(config)
  with pytest.raises(ValueError) as error:
    next(iterator)
  iterator.close()
  assert str(error.value) == (
      f'{big}: 21x20 = 420 pixels, more than the limit of 400 (a guard '
      'against decompression bombs: decoding it would take 0.0 GB); resize '
      'it, or if it is legitimate raise the limit: '
      'FLAX_RESNET_MAX_IMAGE_PIXELS=420.')

"""python -m flax_resnet.predict: workdirs, folders, registered weights, errors."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import flax_resnet
from flax_resnet import convert, predict, pretrained
from flax_resnet import workdir as workdir_lib
from flax_resnet.pretrained import Weights, transforms
from flax_resnet.data import builders, digits
import inference_runs
from test_faults import flip_a_byte


def run_main(capsys, *argv):
  capsys.readouterr()  # what came before (a training run's console)
  code = predict.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def by_hand_probabilities(workdir, config, images):
  """softmax(model(x)) with x normalised by hand from the config (images
  already at config.image_size), the variables read straight from orbax."""
  model, variables = inference_runs.run_model(workdir, config)
  rgb = np.repeat(np.stack(images)[..., None], 3, -1) if np.ndim(
      images[0]) == 2 else np.stack(images)
  x = (rgb.astype(np.float32) - np.float32(config.mean_rgb[0])) / np.float32(
      config.std_rgb[0])
  logits = model.apply(variables, x, train=False)
  return np.asarray(jax.nn.softmax(np.asarray(logits, np.float64)))


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """Five held-out digits as PNG files (two in a subfolder), and their pixels."""
  folder = tmp_path_factory.mktemp('digits')
  (folder / 'more').mkdir()
  images, _ = digits.load_split('test')
  paths = [folder / 'a.png', folder / 'b.png', folder / 'c.png',
           folder / 'more' / 'd.png', folder / 'more' / 'e.png']
  for path, image in zip(paths, images):
    path.write_bytes(builders.png_bytes(image))
  (folder / 'notes.txt').write_text('not an image, and not looked at')
  return folder, paths, [image[..., 0] for image in images[:5]]


def test_workdir_top_k_equals_the_model_applied_by_hand(capsys, digit_files):
  workdir, config = inference_runs.digits_workdir()
  folder, paths, images = digit_files
  code, out, err = run_main(capsys, folder, '--weights', workdir, '--json',
                            '--top', 3, '--batch_size', 2)
  assert code == 0, err
  assert "[the run's eval pipeline]" in err and 'step 6' in err
  records = [json.loads(line) for line in out.splitlines()]
  # The folder is walked in sorted order; notes.txt is no image.
  assert [r['path'] for r in records] == [str(p) for p in paths]
  want = by_hand_probabilities(workdir, config, images)
  for record, probabilities in zip(records, want):
    order = np.argsort(-probabilities, kind='stable')[:3]
    assert [t['index'] for t in record['top']] == list(order)
    # The digits dataset's class names are its ClassLabel's: '0' .. '9'.
    assert [t['name'] for t in record['top']] == [str(i) for i in order]
    np.testing.assert_allclose([t['probability'] for t in record['top']],
                               probabilities[order], rtol=2e-5)


def test_text_output_is_path_then_names_and_percentages(capsys, digit_files):
  workdir, _ = inference_runs.digits_workdir()
  _, paths, _ = digit_files
  code, out, _ = run_main(capsys, paths[0], '--weights', workdir, '--top', 2)
  assert code == 0
  line, = out.splitlines()
  path, scores = line.split(': ')
  assert path == str(paths[0])
  names = [s.split(' (')[0] for s in scores.split(', ')]
  percents = [float(s.split(' (')[1].rstrip('%)')) for s in scores.split(', ')]
  assert len(names) == 2 and set(names) <= {str(i) for i in range(10)}
  assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.1


def test_best_checkpoint_is_the_highest_logged_eval(capsys, digit_files):
  workdir, _ = inference_runs.digits_workdir()
  logged = workdir_lib.logged_top1(workdir)
  assert sorted(logged) == [3, 6]
  best = max(logged, key=lambda s: (logged[s], s))
  _, paths, _ = digit_files
  code, _, err = run_main(capsys, paths[0], '--weights', workdir,
                          '--checkpoint', 'best')
  assert code == 0 and f'step {best};' in err
  code, _, err = run_main(capsys, paths[0], '--weights', workdir,
                          '--checkpoint', '3')
  assert code == 0 and 'step 3;' in err


def test_folder_run_shows_its_class_folder_names(capsys, tmp_path):
  workdir, config, root = inference_runs.folder_workdir()
  val = sorted((root / 'val').glob('*/*.png'))
  code, out, err = run_main(capsys, *val[:4], '--weights', workdir, '--json',
                            '--top', 3)
  assert code == 0, err
  classes = sorted(inference_runs.FOLDER_CLASSES)  # one, seven, zero
  images = [np.asarray(Image.open(p).convert('L')) for p in val[:4]]
  want = by_hand_probabilities(workdir, config, images)
  for line, probabilities in zip(out.splitlines(), want):
    top = json.loads(line)['top']
    order = np.argsort(-probabilities, kind='stable')
    assert [t['name'] for t in top] == [classes[i] for i in order]
    np.testing.assert_allclose([t['probability'] for t in top],
                               probabilities[order], rtol=2e-5)


def test_unreadable_image_is_one_error_line_and_the_rest_are_scored(
    capsys, tmp_path, digit_files):
  workdir, _ = inference_runs.digits_workdir()
  _, paths, _ = digit_files
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG but not really')
  code, out, err = run_main(capsys, paths[0], broken, paths[1], '--weights',
                            workdir)
  assert code == 1
  assert [line.split(': ')[0] for line in out.splitlines()] == [
      str(paths[0]), str(paths[1])]
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 2 and str(broken) in errors[0]
  assert '1 of 3 images' in errors[1] and 'the others are scored' in errors[1]
  code, out, err = run_main(capsys, broken, '--weights', workdir)
  assert code == 1 and not out
  assert err.splitlines()[-1].endswith('1 of 1 images could not be read '
                                       '(named above); none was scored.'), err


def test_damaged_checkpoint_is_named_and_left_where_it_is(capsys, tmp_path,
                                                          digit_files):
  workdir, _ = inference_runs.digits_workdir()
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  flip_a_byte(copy / 'checkpoints' / '6')
  _, paths, _ = digit_files
  code, out, err = run_main(capsys, paths[0], '--weights', copy)
  assert code == 2 and not out
  error, = [line for line in err.splitlines() if line.startswith('error:')]
  assert error.startswith('error: --checkpoint: step 6') and (
      '--checkpoint STEP' in err), err
  assert (copy / 'checkpoints' / '6').is_dir()  # read-only: not moved aside
  code, out, _ = run_main(capsys, paths[0], '--weights', copy,
                          '--checkpoint', '3')
  assert code == 0 and out.startswith(str(paths[0]))


BAD_INPUTS = [
    (['--model', 'resnet5', '--weights', 'x.pth'], '--model resnet5',
     'Did you mean'),
    (['--model', 'resnet20', '--weights', 'NO_SUCH_TAG'], '--weights '
     'NO_SUCH_TAG', 'neither a registry tag'),
    (['--weights', 'IMAGENET1K_V2'], '--model is needed', 'resnet50'),
    (['--model', 'resnet20', '--weights', '{empty}'], 'without checkpoints',
     'train.py'),
    (['--weights', '{workdir}', '--model', 'resnet50'], '--model resnet50',
     'trained resnet20'),
    (['--weights', '{workdir}', '--checkpoint', '99'], '--checkpoint 99',
     'steps [3, 6]'),
    (['--weights', '{workdir}', '--transform', 'resnet50:IMAGENET1K_V2'],
     '--transform', 'own preprocessing'),
    (['--model', 'resnet20', '--weights', '{file}', '--transform', 'resnet50'],
     '--transform resnet50', 'PRESET:TAG'),
]


@pytest.mark.parametrize('argv,names,fix', BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(capsys, tmp_path, digit_files,
                                                argv, names, fix):
  workdir, _ = inference_runs.digits_workdir()
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'w.pth').write_bytes(b'not weights')
  fill = {'{empty}': tmp_path / 'empty', '{workdir}': workdir,
          '{file}': tmp_path / 'w.pth'}
  argv = [str(fill.get(a, a)) for a in argv]
  code, out, err = run_main(capsys, digit_files[1][0], *argv)
  assert code == 2 and not out
  assert err.startswith('error: ') and names in err and fix in err, err


@pytest.mark.parametrize('images,names', [
    (['{missing}'], 'IMAGE {missing} does not exist'),
    (['{no_images}'], 'holds no images'),
])
def test_bad_image_arguments_are_refused_before_loading(capsys, tmp_path,
                                                        images, names):
  (tmp_path / 'no_images').mkdir()
  (tmp_path / 'no_images' / 'readme.txt').write_text('x')
  fill = {'{missing}': str(tmp_path / 'missing.jpg'),
          '{no_images}': str(tmp_path / 'no_images')}
  argv = [fill.get(a, a) for a in images]
  # A weights tag that would need a download: never reached.
  code, _, err = run_main(capsys, *argv, '--model', 'resnet50', '--weights',
                          'IMAGENET1K_V2')
  assert code == 2
  assert err.count('\n') == 1 and names.format(
      missing=fill['{missing}']) in err


def test_console_error_has_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'flax_resnet.predict', str(tmp_path), '--model',
       'resnet20', '--weights', str(tmp_path / 'nothing.pth')],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith('error: IMAGE') and (
      result.stderr.count('\n') == 1), result.stderr


def test_flag_values_are_checked_by_argparse(capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['x.jpg', '--top', '0', '--weights', 'w'])
  assert e.value.code == 2
  assert 'error: argument --top: 0 must be at least 1' in capsys.readouterr().err


# ------------------------------------------------ registered weights, files

SMALL_TORCHVISION = transforms.torchvision(resize_size=36, crop_size=32)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Downloads (file:// copies) go to a folder of this test's own."""
  monkeypatch.setenv('FLAX_RESNET_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def weight_files(tmp_path_factory):
  """resnet20 weights with a 10- and a 1000-class head, and a photo."""
  tmp_path = tmp_path_factory.mktemp('weights')
  files = {}
  for classes in (10, 1000):
    model = flax_resnet.create_model('resnet20', num_classes=classes)
    variables = jax.jit(lambda k, m=model: m.init(
        k, np.zeros((1, 32, 32, 3)), train=False))(jax.random.key(classes))
    files[classes] = tmp_path / f'resnet20_{classes}.safetensors'
    convert.save_safetensors(variables, model, files[classes])
    files[classes, 'variables'] = variables
  rng = np.random.default_rng(0)
  files['photo'] = tmp_path / 'photo.jpg'
  Image.fromarray(rng.integers(0, 256, (45, 60, 3), np.uint8)).save(
      files['photo'], quality=95)
  return files


def by_hand_top(variables, classes, transform, photo, k):
  model = flax_resnet.create_model('resnet20', num_classes=classes)
  x = transform(Image.open(photo))[None]
  logits = np.asarray(model.apply(variables, x, train=False), np.float64)
  p = np.asarray(jax.nn.softmax(logits[0]))
  order = np.argsort(-p, kind='stable')[:k]
  return order, p[order]


def test_registry_tag_uses_its_transform_and_reports_it(capsys, weight_files,
                                                        registered):
  registered(Weights('resnet20', 'TINY_TEST', weight_files[10].as_uri(),
                     None, None, 'user', num_classes=10,
                     transform=SMALL_TORCHVISION))
  code, out, err = run_main(capsys, weight_files['photo'], '--model',
                            'resnet20', '--weights', 'TINY_TEST', '--json')
  assert code == 0, err
  assert SMALL_TORCHVISION.describe() in err
  assert "resnet20:TINY_TEST (the publisher's)" in err
  top = json.loads(out)['top']
  order, p = by_hand_top(weight_files[10, 'variables'], 10, SMALL_TORCHVISION,
                         weight_files['photo'], 5)
  assert [t['index'] for t in top] == list(order)
  assert [t['name'] for t in top] == [f'class {i}' for i in order]
  np.testing.assert_allclose([t['probability'] for t in top], p, rtol=2e-5)


def test_weights_file_with_1000_outputs_gets_imagenet_names(
    capsys, weight_files, registered):
  registered(Weights('resnet20', 'TINY_TEST', weight_files[10].as_uri(),
                     None, None, 'user', num_classes=10,
                     transform=SMALL_TORCHVISION))
  # The file's classifier has 1000 outputs (resnet20's preset has 10): it is
  # loaded whole, and the outputs named as ImageNet's.
  code, out, err = run_main(capsys, weight_files['photo'], '--model',
                            'resnet20', '--weights', weight_files[1000],
                            '--json', '--top', 3)
  assert code == 0, err
  # No --transform: the preset's registered preprocessing, and it says so.
  assert 'resnet20:TINY_TEST (a weights file\'s default; choose another ' \
      'with --transform PRESET:TAG)' in err
  top = json.loads(out)['top']
  order, p = by_hand_top(weight_files[1000, 'variables'], 1000,
                         SMALL_TORCHVISION, weight_files['photo'], 3)
  names = pretrained.imagenet_categories()
  assert [t['name'] for t in top] == [names[i] for i in order]
  np.testing.assert_allclose([t['probability'] for t in top], p, rtol=2e-5)


def test_weights_file_transform_chosen_with_flag(capsys, weight_files,
                                                 registered):
  other = transforms.torchvision(resize_size=40, crop_size=40)
  for tag, transform in (('TINY_TEST', SMALL_TORCHVISION), ('BIG', other)):
    registered(Weights('resnet20', tag, weight_files[10].as_uri(), None, None,
                       'user', num_classes=10, transform=transform))
  code, out, err = run_main(capsys, weight_files['photo'], '--model',
                            'resnet20', '--weights', weight_files[10],
                            '--transform', 'resnet20:BIG', '--json')
  assert code == 0, err
  assert 'resnet20:BIG (chosen with --transform)' in err
  order, _ = by_hand_top(weight_files[10, 'variables'], 10, other,
                         weight_files['photo'], 5)
  assert [t['index'] for t in json.loads(out)['top']] == list(order)


@pytest.mark.parametrize('weights', ['file', 'http://127.0.0.1:9/w.pth'])
def test_weights_file_without_any_known_transform_is_refused(
    capsys, weight_files, weights):
  # Before any download: nothing listens on port 9.
  weights = weight_files[10] if weights == 'file' else weights
  code, out, err = run_main(capsys, weight_files['photo'], '--model',
                            'resnet20', '--weights', weights)
  assert code == 2 and not out
  assert err.startswith('error: --weights') and '--transform PRESET:TAG' in err
  assert 'no preprocessing is known' in err and err.count('\n') == 1


def test_a_missing_weights_path_is_named_before_model_is_asked_for(
    capsys, tmp_path, digit_files):
  # It said "--model is needed" (or, with --model, "neither a registry tag,
  # a URL nor an existing file ... no weights are registered for resnet20").
  for extra in ([], ['--model', 'resnet20']):
    code, out, err = run_main(capsys, digit_files[1][0], '--weights',
                              tmp_path / 'runs' / 'typo', *extra)
    assert code == 2 and not out
    assert err.count('\n') == 1, err
    assert f'--weights {tmp_path / "runs" / "typo"} does not exist' in err


def test_batch_size_beyond_memory_is_refused_naming_the_largest_that_fits(
    capsys, monkeypatch, digit_files):
  from flax_resnet.train import run_checks  # pylint: disable=g-import-not-at-top
  workdir, _ = inference_runs.digits_workdir()
  # 8x8x3 float32 inputs are 768 bytes; 3 batches of 5 held: 11,520 bytes.
  monkeypatch.setattr(run_checks, 'available_memory', lambda: 10_000)
  code, out, err = run_main(capsys, digit_files[0], '--weights', workdir,
                            '--batch_size', 10**12)
  assert code == 2 and not out
  assert err.count('error:') == 1 and 'Traceback' not in err
  assert '--batch_size 5:' in err and 'use --batch_size <= 4' in err, err


def test_a_symlink_loop_in_an_image_folder_is_walked_once(tmp_path):
  # os.walk(followlinks=True) went round cat/again -> .. until the paths
  # were too long: 4 images listed 164 times.
  (tmp_path / 'cat').mkdir()
  for name in ('a.png', 'b.png'):
    (tmp_path / 'cat' / name).write_bytes(b'x')
  (tmp_path / 'cat' / 'again').symlink_to('..')
  (tmp_path / 'cat' / 'same').symlink_to('.')
  assert predict.image_paths([str(tmp_path)]) == [
      str(tmp_path / 'cat' / 'a.png'), str(tmp_path / 'cat' / 'b.png')]

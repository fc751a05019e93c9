"""python -m flax_resnet.evaluate: scores equal independent computations."""

import io
import json
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import flax_resnet
from flax_resnet import convert, data, evaluate
from flax_resnet.data import imagenet_source
from flax_resnet.data.prepare import prepare
from flax_resnet.pretrained import Weights, categories, transforms
import inference_runs
import upstream_archives as ua


def run_main(capsys, *argv):
  capsys.readouterr()  # what came before (a training run's console)
  code = evaluate.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def run_json(capsys, *argv):
  code, out, err = run_main(capsys, *argv, '--json')
  assert code == 0, err
  return json.loads(out), err


def by_hand(model, variables, images, labels):
  """(top-1, mean cross-entropy) of float32 model inputs, in float64."""
  logits = np.asarray(model.apply(variables, np.stack(images), train=False),
                      np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  labels = np.asarray(labels)
  return (float(np.mean(logits.argmax(-1) == labels)),
          float(-np.mean(log_p[np.arange(len(labels)), labels])))


def test_workdir_scores_equal_the_runs_own_eval_and_a_pass_by_hand(capsys):
  workdir, config = inference_runs.digits_workdir()
  scores, err = run_json(capsys, '--weights', workdir, '--batch_size', 50)
  assert 'sklearn_digits test' in err
  logged = {r['step']: r for r in map(json.loads, (
      workdir / 'metrics.jsonl').read_text().splitlines()) if 'eval_top1' in r}
  assert scores['examples'] == 360  # 7 batches of 50 + 10 (40 padding)
  assert scores['top1'] == pytest.approx(logged[6]['eval_top1'], abs=1e-12)
  assert scores['top5'] == pytest.approx(logged[6]['eval_top5'], abs=1e-12)
  assert scores['loss'] == pytest.approx(logged[6]['eval_loss'], rel=1e-5)
  assert scores['reference'] == (f'the run logged '
                                 f'{logged[6]["eval_top1"] * 100:.3f} % at '
                                 'step 6')
  # The project's eval pipeline, the model applied by hand.
  model, variables = inference_runs.run_model(workdir, config)
  images, labels = [], []
  for batch in data.make_eval_iterator(config):
    images.extend(batch['image'][batch['mask']])
    labels.extend(batch['label'][batch['mask']])
  top1, loss = by_hand(model, variables, images, labels)
  assert scores['top1'] == pytest.approx(top1, abs=1e-12)
  assert scores['loss'] == pytest.approx(loss, rel=1e-5)


def test_a_chosen_step_scores_that_steps_logged_eval(capsys):
  workdir, _ = inference_runs.digits_workdir()
  scores, err = run_json(capsys, '--weights', workdir, '--checkpoint', '3')
  logged = [json.loads(line) for line in
            (workdir / 'metrics.jsonl').read_text().splitlines()]
  at_3 = next(r for r in logged if r['step'] == 3 and 'eval_top1' in r)
  assert 'step 3 ' in err
  assert scores['top1'] == pytest.approx(at_3['eval_top1'], abs=1e-12)


def test_folder_dataset_scored_by_hand_from_the_files(capsys):
  workdir, config, root = inference_runs.folder_workdir()
  scores, _ = run_json(capsys, '--weights', workdir, '--dataset',
                       f'folder:{root}', '--split', 'validation')
  classes = sorted(inference_runs.FOLDER_CLASSES)
  files = sorted((root / 'val').glob('*/*.png'))
  images = [(np.repeat(np.asarray(Image.open(p))[..., None], 3, -1)
             .astype(np.float32) - 85) / 110 for p in files]
  labels = [classes.index(p.parent.name) for p in files]
  model, variables = inference_runs.run_model(workdir, config)
  top1, loss = by_hand(model, variables, images, labels)
  assert scores['examples'] == len(files) == 21
  assert scores['split'] == 'validation'  # found as val/
  assert scores['top1'] == pytest.approx(top1, abs=1e-12)
  assert scores['top5'] == 1.0  # three classes
  assert scores['loss'] == pytest.approx(loss, rel=1e-5)


def test_prepared_cifar10_scored_with_the_runs_preprocessing(capsys, tmp_path):
  workdir, config = inference_runs.digits_workdir()  # also 10 classes
  cifar = ua.cifar_data('cifar10', seed=3)
  prepare('cifar10', tmp_path / 'data',
          ua.cifar_archive(tmp_path, 'cifar10', 'binary', cifar))
  scores, err = run_json(capsys, '--weights', workdir, '--dataset', 'cifar10',
                         '--data_dir', tmp_path / 'data')
  assert scores['split'] == 'test' and 'cifar10 test' in err  # no validation
  assert scores['reference'] is None  # the run logged digits, not this
  labels, pixels = cifar['test']
  # The run's eval preprocessing (augment 'none'): resize to 8x8, bilinear.
  images = [(np.asarray(Image.fromarray(p).resize((8, 8), Image.BILINEAR))
             .astype(np.float32) - 85) / 110 for p in pixels]
  model, variables = inference_runs.run_model(workdir, config)
  top1, loss = by_hand(model, variables, images, labels[:, 0])
  assert scores['examples'] == ua.CIFAR10_TEST
  assert scores['top1'] == pytest.approx(top1, abs=1e-12)
  assert scores['loss'] == pytest.approx(loss, rel=1e-5)


def test_imagenet_labels_are_in_torchvisions_class_order():
  """TFDS imagenet2012 label i is WordNet id i of the names we print."""
  names = tfds.builder('imagenet2012').info.features['label'].names
  assert tuple(names) == categories.wordnet_ids() == tuple(sorted(names))
  assert imagenet_source.synsets() == list(names)
  wordnet = dict(zip(categories.wordnet_ids(), categories.imagenet_categories()))
  assert wordnet['n01440764'] == 'tench'  # torchvision's class 0
  assert wordnet['n15075141'] == 'toilet tissue'  # and class 999


def test_imagenet_registered_weights_print_the_published_top1(
    capsys, tmp_path, monkeypatch, registered):
  monkeypatch.setenv('FLAX_RESNET_CACHE', str(tmp_path / 'cache'))
  train, val = ua.imagenet_files()
  prepare('imagenet2012', tmp_path / 'data',
          ua.imagenet_tars(tmp_path / 'manual', train, val))
  val_labels = [categories.wordnet_ids().index(s) for s in
                imagenet_source.validation_synsets()[:ua.IMAGENET_VAL]]
  model = flax_resnet.create_model('resnet20', num_classes=1000)
  variables = jax.jit(lambda k: model.init(k, np.zeros((1, 32, 32, 3)),
                                           train=False))(jax.random.key(1))
  # A classifier that favours the first image's class: top-1 is not 0.
  bias = np.zeros(1000, np.float32)
  bias[val_labels[0]] = 50.0
  variables['params']['fc']['bias'] = bias
  path = tmp_path / 'tiny_imagenet.safetensors'
  convert.save_safetensors(variables, model, path)
  small = transforms.torchvision(resize_size=36, crop_size=32)
  registered(Weights('resnet20', 'TINY_IN1K', path.as_uri(), None, 12.5,
                     'torchvision', transform=small, label_set=categories.IMAGENET1K))
  code, out, err = run_main(capsys, '--model', 'resnet20', '--weights',
                            'TINY_IN1K', '--dataset', 'imagenet2012',
                            '--data_dir', tmp_path / 'data')
  assert code == 0, err
  files = sorted(val)
  images = [small(Image.open(io.BytesIO(val[f]))) for f in files]
  top1, _ = by_hand(model, variables, images, val_labels)
  assert top1 >= 1 / ua.IMAGENET_VAL
  assert f'top-1 {top1 * 100:.3f} % (published 12.500 %)' in out
  assert 'imagenet2012 validation' in err and small.describe() in err


BAD_INPUTS = [
    (['--model', 'resnet20', '--weights', 'TAG'], '--dataset is needed'),
    (['--weights', '{workdir}', '--dataset', 'cifar10', '--data_dir',
      '{empty}'], "Dataset 'cifar10' is not prepared"),
    (['--weights', '{workdir}', '--split', 'nope'], '--split nope'),
    (['--weights', '{workdir}', '--dataset', 'folder:{folder}'],
     'has 3 classes but the classifier'),
    (['--weights', '{workdir}', '--dataset', 'folder:{empty}'],
     'has no train/ folder'),
    (['--weights', '{workdir}', '--checkpoint', 'best', '--dataset',
      'no_such_dataset'], 'is not a TFDS dataset'),
    # A mistyped workdir said '--dataset is needed'.
    (['--weights', '{empty}/typo'], '--weights {empty}/typo does not exist'),
]


@pytest.mark.parametrize('argv,names', BAD_INPUTS)
def test_bad_input_is_one_error_line_and_exit_2(capsys, tmp_path, argv,
                                                names):
  workdir, _ = inference_runs.digits_workdir()
  _, _, folder = inference_runs.folder_workdir()
  (tmp_path / 'empty').mkdir()
  fill = {'{workdir}': str(workdir), '{empty}': str(tmp_path / 'empty'),
          '{folder}': str(folder)}
  for key, value in fill.items():
    argv = [a.replace(key, value) for a in argv]
    names = names.replace(key, value)
  code, out, err = run_main(capsys, *argv)
  assert code == 2 and not out
  assert err.startswith('error: ') and err.count('error:') == 1
  assert names in err, err
  assert 'Traceback' not in err


def test_dataset_is_checked_before_a_download(capsys, tmp_path, registered):
  # The registered file does not exist: reaching the download would fail
  # with another message.
  registered(Weights('resnet20', 'NOT_THERE', (tmp_path / 'x').as_uri(), None,
                     None, 'user', num_classes=10,
                     transform=transforms.torchvision(36, 32)))
  code, _, err = run_main(capsys, '--model', 'resnet20', '--weights',
                          'NOT_THERE', '--dataset', 'cifar10', '--data_dir',
                          tmp_path)
  assert code == 2 and "Dataset 'cifar10' is not prepared" in err


def test_console_error_has_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'flax_resnet.evaluate', '--weights',
       str(tmp_path), '--dataset', 'cifar10'],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith('error: --weights') and (
      result.stderr.count('\n') == 1), result.stderr


@pytest.mark.parametrize('augment', ['imagenet', 'none'])
def test_run_preprocessing_equals_the_training_eval_pipeline(augment):
  """JPEG bytes become exactly what the run's eval fed the model (with
  'imagenet', only the crop box is decoded: a whole decoded image can resize
  1/255 apart)."""
  from test_train_loop import digits_config  # pylint: disable=g-import-not-at-top
  from flax_resnet import inference  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import preprocess  # pylint: disable=g-import-not-at-top
  config = digits_config(augment=augment, image_size=24, eval_crop_ratio=0.8,
                         mean_rgb=(120.0, 110.0, 100.0),
                         std_rgb=(60.0, 61.0, 62.0))
  pipeline = preprocess.EvalPreprocess(
      preprocess.PreprocessOptions.from_config(config, 'eval_split'))
  transform = transforms.from_config(config)
  for seed, size in enumerate([(37, 53), (61, 29), (24, 24), (100, 75)]):
    jpeg = ua.jpeg(seed, size=size)
    want = pipeline.map({'image': jpeg, 'label': 0, 'mask': True})['image']
    got = inference.model_input(transform, jpeg, 'test image')
    np.testing.assert_array_equal(got, want, err_msg=str(size))


def test_batch_size_beyond_the_split_is_capped_not_padded(capsys):
  # 10**8 - 360 zero images of padding were 286 GB: a MemoryError traceback.
  workdir, _ = inference_runs.digits_workdir()
  capped, _ = run_json(capsys, '--weights', workdir, '--batch_size', 10**8)
  scores, _ = run_json(capsys, '--weights', workdir, '--batch_size', 360)
  assert capped['examples'] == scores['examples'] == 360
  for key in ('top1', 'top5', 'loss'):
    assert capped[key] == pytest.approx(scores[key], rel=1e-6), key


def test_batch_size_beyond_memory_is_refused_naming_the_largest_that_fits(
    capsys, monkeypatch):
  from flax_resnet.train import run_checks  # pylint: disable=g-import-not-at-top
  workdir, _ = inference_runs.digits_workdir()
  # 8x8x3 float32 inputs are 768 bytes; 2 threads + 2 batches of 64 held.
  monkeypatch.setattr(run_checks, 'available_memory', lambda: 100_000)
  code, out, err = run_main(capsys, '--weights', workdir, '--threads', 2)
  assert code == 2 and not out
  assert err.count('error:') == 1 and 'Traceback' not in err
  assert '--batch_size 64:' in err and 'use --batch_size <= 32' in err, err

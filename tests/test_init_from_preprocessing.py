"""config.init_from checks that the weights were trained on inputs normalised
as this run normalises them (issue 18 item 1).

Offline: the registry entries are registered here with file:// URLs of a tiny
resnet20 (tests/fault_config.py, 8x8 digits), so every run is seconds once
its steps are in the test compilation cache.
"""

import ast
import logging
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flax_resnet import convert
from flax_resnet import inference
from flax_resnet import predict
from flax_resnet import pretrained
from flax_resnet.data import preprocess
from flax_resnet.model import ResNet
from flax_resnet.pretrained import Weights
from flax_resnet.pretrained import transforms
from flax_resnet.train import checkpoint
from flax_resnet.train import config_check
from flax_resnet.train import init_from
from flax_resnet.train import loop
from fault_config import with_fields as fault_config  # tests/ is on sys.path

TAG = 'TEST_PREPROCESSING'
# The flags the refusal of a torchvision-normalised entry names.
TORCHVISION_FLAGS = ("--config.mean_rgb='(123.675,116.28,103.53)' "
                     "--config.std_rgb='(58.395,57.12,57.375)'")
# A Keras 'caffe' rule at the digits' 8 px: BGR, 0..255 minus the caffe means.
CAFFE_8PX = transforms.keras('caffe', 8)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('FLAX_RESNET_CACHE', str(tmp_path / 'cache'))
  monkeypatch.delenv('FLAX_RESNET_MIRROR', raising=False)


@pytest.fixture(scope='module')
def weights_url(tmp_path_factory):
  config = fault_config()
  spec = config_check.validate_config(config)
  model = ResNet(spec)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)),
                                           train=False))(jax.random.key(3))
  path = tmp_path_factory.mktemp('weights') / 'r20.safetensors'
  convert.save_safetensors(variables, spec, path)
  return path.as_uri()


@pytest.fixture
def publish(weights_url):
  """publish(transform): registers resnet20 TAG with that eval transform."""
  def register(transform, publisher='torchvision'):
    pretrained.register(Weights('resnet20', TAG, weights_url, None, None,
                                publisher, num_classes=10,
                                transform=transform), replace=True)
  yield register
  pretrained.unregister('resnet20', TAG)


def _refusal(config) -> str:
  with pytest.raises(config_check.ConfigError) as e:
    init_from.check_preprocessing(config)
  return str(e.value)


def _apply_suggested_flags(config, message: str):
  """Sets what the message's --config.FIELD=VALUE flags say, as a shell and
  absl would."""
  flags = re.findall(r'--config\.(\w+)=(\S+)', message.split(' or --')[0])
  assert flags, message
  for field, text in flags:
    text = shlex.split(text)[0]
    config[field] = text if field == 'channel_order' else ast.literal_eval(
        text)
  return [field for field, _ in flags]


def test_a_mismatched_normalisation_is_refused_before_compiling_and_the_named_flags_fix_it(
    publish, tmp_path, capsys):
  publish(transforms.torchvision(256, 224))
  config = fault_config(init_from=TAG, num_train_steps=2)  # mean 85, std 110
  with pytest.raises(config_check.ConfigError) as e:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert message == (
      'config.init_from: torchvision resnet20 TEST_PREPROCESSING was trained '
      'on inputs normalised with mean_rgb (123.675,116.28,103.53), std_rgb '
      '(58.395,57.12,57.375), but this config normalises with mean_rgb '
      '(85,85,85), std_rgb (110,110,110), so fine-tuning would start from '
      f'features of other inputs. Pass {TORCHVISION_FLAGS} (0..255 scale, R, '
      'G, B order), or --config.init_from_check_preprocessing=False to keep '
      'yours.')
  assert 'compil' not in capsys.readouterr().out
  assert not list((tmp_path / 'run').glob('checkpoints/*'))

  assert _apply_suggested_flags(config, message) == ['mean_rgb', 'std_rgb']
  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()


def test_the_opt_out_trains_with_the_configs_own_normalisation(
    publish, tmp_path, caplog):
  publish(transforms.torchvision(256, 224))
  config = fault_config(init_from=TAG, num_train_steps=2,
                        init_from_check_preprocessing=False)
  with caplog.at_level(logging.WARNING, logger=init_from.__name__):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()
  warnings = [r.getMessage() for r in caplog.records
              if r.name == init_from.__name__]
  assert warnings == [
      'config.init_from: torchvision resnet20 TEST_PREPROCESSING expects '
      'inputs normalised with mean_rgb (123.675,116.28,103.53), std_rgb '
      '(58.395,57.12,57.375); this run uses mean_rgb (85,85,85), std_rgb '
      '(110,110,110) (kept: init_from_check_preprocessing is False).']


def test_the_opt_out_without_init_from_is_refused():
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_config(
        fault_config(init_from_check_preprocessing=False))
  assert str(e.value).startswith(
      'config.init_from_check_preprocessing: is False but config.init_from '
      'is not set')


def test_a_matching_normalisation_only_logs_both_transforms(publish, caplog):
  # The fault config's (pixel - 85) / 110, stated the publishers' way (/255).
  publish(transforms.EvalTransform(
      'a 1/255 publisher', 'shorter', 10, 8, mean=(85 / 255,) * 3,
      std=(110 / 255,) * 3))
  config = fault_config(init_from=TAG)
  with caplog.at_level(logging.INFO, logger=init_from.__name__):
    init_from.check_preprocessing(config)
  assert [r.getMessage() for r in caplog.records] == [
      'config.init_from: torchvision resnet20 TEST_PREPROCESSING evaluates '
      'with resize shorter side to 10 (bilinear, PIL, antialias) -> centre '
      'crop 8 -> RGB /255, mean (0.333333, 0.333333, 0.333333), std '
      '(0.431373, 0.431373, 0.431373); this run evaluates with resize both '
      'sides to 8 (bilinear, PIL, antialias) -> RGB, mean (85, 85, 85), std '
      '(110, 110, 110)']


@pytest.mark.parametrize('mean_rgb, std_rgb', [
    ((123.68, 116.78, 103.94), (58.393, 57.12, 57.375)),  # TF's ImageNet
    ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # the flags' rounding
])
def test_a_normalisation_within_a_grey_level_of_the_publishers_passes(
    publish, mean_rgb, std_rgb, caplog):
  publish(transforms.torchvision(256, 224))
  config = fault_config(init_from=TAG, mean_rgb=mean_rgb, std_rgb=std_rgb)
  with caplog.at_level(logging.WARNING, logger=init_from.__name__):
    init_from.check_preprocessing(config)
  assert not caplog.records
  config.mean_rgb = (128.0, 128.0, 128.0)  # 4 grey levels off: refused
  assert "Pass --config.mean_rgb='(123.675,116.28,103.53)' (0..255" in (
      _refusal(config))


def test_a_file_or_an_entry_without_a_transform_says_nothing(
    publish, weights_url, caplog):
  publish(None, publisher='user')
  with caplog.at_level(logging.INFO, logger=init_from.__name__):
    for source in (TAG, weights_url, weights_url.removeprefix('file://')):
      init_from.check_preprocessing(fault_config(init_from=source))
  assert not caplog.records


def test_a_workdir_trained_with_another_normalisation_is_refused(tmp_path):
  source = tmp_path / 'source'
  loop.train_and_evaluate(fault_config(num_train_steps=2), str(source))
  config = fault_config(init_from=str(source), mean_rgb=(128.0,) * 3)
  message = _refusal(config)
  assert message.startswith(
      f'config.init_from: the run in {source} was trained on inputs '
      'normalised with mean_rgb (85,85,85), but this config normalises with '
      'mean_rgb (128,128,128),'), message
  assert "Pass --config.mean_rgb='(85,85,85)' (0..255" in message
  assert _apply_suggested_flags(config, message) == ['mean_rgb']
  init_from.check_preprocessing(config)
  for folder in (source / 'checkpoints', source / 'checkpoints' / '2'):
    config.init_from = str(folder)
    init_from.check_preprocessing(config)


def test_keras_caffe_weights_train_on_bgr_inputs_as_keras_makes_them(
    publish, tmp_path, monkeypatch):
  """channel_order='BGR': what the first conv sees in training and in eval
  is the publisher's transform of the same image, bit for bit."""
  publish(CAFFE_8PX, publisher='keras')
  config = fault_config(init_from=TAG, num_train_steps=2)
  message = _refusal(config)
  assert ("Pass --config.mean_rgb='(123.68,116.779,103.939)' "
          "--config.std_rgb='(1,1,1)' --config.channel_order=BGR") in message
  _apply_suggested_flags(config, message)
  init_from.check_preprocessing(config)

  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  want = CAFFE_8PX(image)
  np.testing.assert_array_equal(  # blue first, minus the caffe blue mean
      want[..., 0], image[..., 2].astype(np.float32) - np.float32(103.939))
  options = preprocess.PreprocessOptions.from_config(config, 'train_split')
  batch = preprocess.NormalizedBatch(options)([{'image': image,
                                                'label': np.int32(0)}])
  np.testing.assert_array_equal(batch['image'][0], want)
  with monkeypatch.context() as patch:  # numpy's path, without pixels.cc
    patch.setattr(preprocess.pixels, 'normalize_into', lambda *args: False)
    batch = preprocess.NormalizedBatch(options)([{'image': image,
                                                  'label': np.int32(0)}])
  np.testing.assert_array_equal(batch['image'][0], want)
  evaluated = preprocess.EvalPreprocess(options).map(
      {'image': image, 'label': np.int32(0), 'mask': True})
  np.testing.assert_array_equal(evaluated['image'], want)
  np.testing.assert_array_equal(transforms.from_config(config)(image), want)

  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'checkpoints' / '2').is_dir()


def test_channel_order_is_validated():
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate_config(fault_config(channel_order='GBR'))
  assert str(e.value) == ("config.channel_order: 'GBR' is not valid; choose "
                          "one of 'RGB', 'BGR'.")


# ------------------------------------------------ provenance (issue 18 item 1)


def test_a_run_records_the_published_weights_it_started_from_and_predict_names_them(
    publish, weights_url, tmp_path, capsys):
  publish(CAFFE_8PX, publisher='keras')
  config = fault_config(init_from=TAG, num_train_steps=2,
                        mean_rgb=(123.68, 116.779, 103.939),
                        std_rgb=(1.0, 1.0, 1.0), channel_order='BGR')
  run = tmp_path / 'run'
  loop.train_and_evaluate(config, str(run))
  meta = checkpoint.load_meta(run / 'checkpoints', 2)
  assert meta[init_from.PROVENANCE_KEY] == {
      'init_from': TAG, 'publisher': 'keras', 'preset': 'resnet20',
      'tag': TAG, 'url': weights_url}

  image = tmp_path / 'digit.png'
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
  assert predict.main([str(image), '--weights', str(run)]) == 0
  header = capsys.readouterr().err.strip().splitlines()[-1]
  assert header.startswith(
      f'resnet20 from {run}/checkpoints, step 2 (initialised from keras '
      f'resnet20 {TAG}); transform: resize both sides to 8 ')
  assert '-> BGR, mean (103.939, 116.779, 123.68)' in header  # its own order

  # A run started from that run names both links of the chain.
  config = fault_config(init_from=str(run), num_train_steps=2,
                        mean_rgb=(123.68, 116.779, 103.939),
                        std_rgb=(1.0, 1.0, 1.0), channel_order='BGR')
  loop.train_and_evaluate(config, str(tmp_path / 'second'))
  loaded = inference.load(None, str(tmp_path / 'second'))
  assert loaded.source.endswith(
      f', step 2 (initialised from {run} (itself initialised from keras '
      f'resnet20 {TAG}))')


def test_a_run_from_random_weights_names_no_origin(tmp_path):
  loop.train_and_evaluate(fault_config(num_train_steps=2), str(tmp_path))
  assert init_from.PROVENANCE_KEY not in checkpoint.load_meta(
      tmp_path / 'checkpoints', 2)
  assert inference.load(None, str(tmp_path)).source == (
      f'resnet20 from {tmp_path}/checkpoints, step 2')

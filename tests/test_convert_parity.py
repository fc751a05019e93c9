"""Logits of the real Gluon, Keras and timm nets against ours, on their files.

Each library runs in its own interpreter (tests/library_side/*.py): it builds
its own model, draws random weights and random, non-trivial BatchNorm
statistics, saves them in its own file formats and computes logits. Here the
files go through `convert.load_weights` into the exact preset, and our logits
must agree within 1e-5 (relative to the largest logit) at 224 and at an odd
size. MXNet lives in a side virtualenv ($FLAX_RESNET_MXNET_PYTHON, made by
.ci/run); under CI=true its absence fails the test instead of skipping it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from flax_resnet import convert
from flax_resnet import layout
from flax_resnet import zoo
from flax_resnet.references import probe_gluon

LIBRARY_SIDE = pathlib.Path(__file__).with_name('library_side')
SIZES = (224, 97)  # 97: odd at every stage, where padding rules show
TOLERANCE = 1e-5


def _relative_error(ours, theirs) -> float:
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@functools.lru_cache(maxsize=None)
def _apply_fn(preset: str, **overrides):
  model = zoo.create_model(preset, **overrides)
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _logits(preset, variables, images, **overrides) -> np.ndarray:
  return np.asarray(_apply_fn(preset, **overrides)(variables, images))


def _run(command, what, **env):
  result = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **env}, check=False,
                          timeout=600)
  assert result.returncode == 0, f'{what} failed:\n{result.stderr[-4000:]}'


def _mxnet_python() -> str:
  reason = probe_gluon.unavailable()
  if reason:
    if os.environ.get('CI') == 'true':
      pytest.fail(f'CI=true, but MXNet is not available: {reason}')
    pytest.skip(f'MXNet is not available: {reason}')
  return str(probe_gluon.mxnet_python())


# ------------------------------------------------------------------- Gluon

GLUON = ('gluon_resnet18_v1', 'gluon_resnet50_v1', 'gluon_resnet18_v2',
         'gluon_resnet50_v2')


@pytest.fixture(scope='module')
def gluon_runs(tmp_path_factory):
  python = _mxnet_python()
  cache = {}

  def run(preset):
    if preset not in cache:
      out = tmp_path_factory.mktemp(preset)
      _run([python, str(LIBRARY_SIDE / 'gluon_net.py'),
            preset[len('gluon_'):],
            str(out), *map(str, SIZES)], f'MXNet {preset}')
      cache[preset] = out
    return cache[preset]
  return run


@pytest.mark.parametrize('preset', GLUON)
def test_gluon_logits_match_mxnet(preset, gluon_runs):
  out = gluon_runs(preset)
  results = np.load(out / 'gluon.npz')
  for file in ('structural.params', 'prefixed.params'):
    variables = convert.load_weights(out / file, preset)
    for size in SIZES:
      images = results[f'images_{size}'].transpose(0, 2, 3, 1)
      error = _relative_error(_logits(preset, variables, images),
                              results[f'logits_{size}'])
      assert error < TOLERANCE, (file, size, error)
  # Gluon's trainable count equals ours; everything Gluon stores equals our
  # params + batch_stats, plus the data BN's gamma and beta that V2 holds at 1
  # and 0 (3 + 3 numbers we do not store).
  derived = layout.layout_of(preset)
  assert derived.total_params == int(results['library_trainable'])
  fixed = 6 if zoo.get_spec(preset).input_norm else 0
  assert derived.total_variables + fixed == int(results['library_params'])


def test_flax_weights_load_into_mxnet(gluon_runs, tmp_path):
  # The reverse direction: our variables, written by save_gluon, loaded by
  # Gluon's own load_parameters, give Gluon the same logits.
  preset = 'gluon_resnet18_v2'
  source = gluon_runs(preset)
  variables = convert.load_weights(source / 'structural.params', preset)
  convert.save_gluon(variables, preset, tmp_path / 'flax.params')
  _run([_mxnet_python(), str(LIBRARY_SIDE / 'gluon_net.py'), 'resnet18_v2',
        str(tmp_path), *map(str, SIZES)], 'MXNet load_parameters')
  theirs = np.load(tmp_path / 'gluon.npz')
  for size in SIZES:
    images = theirs[f'images_{size}'].transpose(0, 2, 3, 1)
    assert _relative_error(_logits(preset, variables, images),
                           theirs[f'logits_{size}']) < TOLERANCE


# ------------------------------------------------------------------- Keras

KERAS = {'keras_resnet50': 'ResNet50', 'keras_resnet50_v2': 'ResNet50V2'}


@pytest.fixture(scope='module')
def keras_runs(tmp_path_factory):
  cache = {}

  def run(preset):
    if preset not in cache:
      out = tmp_path_factory.mktemp(preset)
      _run([sys.executable, str(LIBRARY_SIDE / 'keras_net.py'),
            KERAS[preset], str(out), *map(str, SIZES)], f'Keras {preset}',
           KERAS_BACKEND='jax')
      cache[preset] = out
    return cache[preset]
  return run


@pytest.mark.slow
@pytest.mark.parametrize('preset', KERAS)
def test_keras_logits_match_keras(preset, keras_runs):
  out = keras_runs(preset)
  results = np.load(out / 'keras.npz')
  for file in ('model.weights.h5', 'legacy.h5'):
    variables = convert.load_weights(out / file, preset)
    for size in SIZES:
      error = _relative_error(
          _logits(preset, variables, results[f'images_{size}']),
          results[f'logits_{size}'])
      assert error < TOLERANCE, (file, size, error)
  derived = layout.layout_of(preset)
  assert derived.total_params == int(results['library_trainable'])
  # Keras' count_params() includes BN moving statistics.
  assert derived.total_variables == int(results['library_params'])


@pytest.mark.slow
def test_keras_v2_max_pool_pads_with_zeros(keras_runs):
  # Keras V2's stem has no ReLU before its max-pool: padding with -inf (as
  # torch does) instead of zeros changes border outputs, hence the logits,
  # by far more than the parity tolerance (measured: 2.7e-4 relative).
  preset = 'keras_resnet50_v2'
  results = np.load(keras_runs(preset) / 'keras.npz')
  variables = convert.load_weights(keras_runs(preset) / 'model.weights.h5',
                                   preset)
  images = results['images_224']
  error = _relative_error(
      _logits(preset, variables, images, pool_padding='-inf'),
      results['logits_224'])
  assert error > 10 * TOLERANCE


@pytest.mark.slow
def test_flax_weights_set_into_keras(keras_runs):
  # The reverse direction: flax_to_keras gives each Keras layer its weights
  # in Keras' order; the weights Keras saved come back unchanged.
  preset = 'keras_resnet50'
  out = keras_runs(preset)
  variables = convert.load_weights(out / 'legacy.h5', preset)
  by_layer = convert.flax_to_keras(variables, preset)
  stored = convert.read_h5(out / 'legacy.h5')
  assert sum(len(w) for w in by_layer.values()) == len(stored)
  for layer, weights in by_layer.items():
    for weight, leaf in zip(weights, [n.split('/')[1] for n in stored
                                      if n.split('/')[0] == layer]):
      np.testing.assert_array_equal(weight, stored[f'{layer}/{leaf}'])


# -------------------------------------------------------------------- timm


def test_timm_resnet_d_logits_match_timm(tmp_path):
  # Not imported here: timm's package __init__ needs torchvision; the child
  # imports timm's resnet.py as the reference probe does.
  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed (pip install --no-deps timm)')
  _run([sys.executable, str(LIBRARY_SIDE / 'timm_net.py'), 'resnet50d',
        str(tmp_path), *map(str, SIZES)], 'timm resnet50d')
  results = np.load(tmp_path / 'timm.npz')
  for file in ('timm.pth', 'timm.safetensors'):
    variables = convert.load_weights(tmp_path / file, 'resnet50d')
    for size in SIZES:
      images = results[f'images_{size}'].transpose(0, 2, 3, 1)
      error = _relative_error(_logits('resnet50d', variables, images),
                              results[f'logits_{size}'])
      assert error < TOLERANCE, (file, size, error)
  assert layout.layout_of('resnet50d').total_params == int(
      results['library_trainable'])

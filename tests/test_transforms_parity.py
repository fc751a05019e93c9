"""Every registry entry's EvalTransform against its publisher's own code.

The publishers' preprocessing runs in child interpreters
(tests/library_side/transforms_side.py: torchvision's weights-enum
transforms from its wheel, timm's create_transform from its pretrained_cfg,
Keras' load_img + preprocess_input; gluon_transforms.py: MXNet's Gluon
transforms in MXNet's virtualenv) on two photographs that scikit-learn ships
(china.jpg, flower.jpg, 427x640) and on generated images of odd sizes and
PIL modes (grayscale, RGBA, palette). Ours must give the same float32
arrays: measured bit for bit equal on all of them, so equality is asserted
(no tolerance). Under CI=true a missing torchvision wheel or MXNet fails
instead of skipping.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import flax_resnet
from flax_resnet.pretrained import transforms
from flax_resnet.references import probe_gluon
from flax_resnet.references import torchvision_source

pytestmark = pytest.mark.slow  # ~20 s: three libraries imported in a child

LIBRARY_SIDE = pathlib.Path(__file__).with_name('library_side')
# (height, width, PIL mode): odd sizes, both orientations, smaller than the
# crop (upsampling; at 5x9 so much that OpenCV's top-border rows reach the
# crop), exactly 2x the resize (OpenCV switches to INTER_AREA), exactly the
# resize, and every mode the loaders convert from.
GENERATED = ((223, 225, 'RGB'), (500, 97, 'L'), (97, 500, 'RGBA'),
             (256, 256, 'P'), (300, 231, 'RGB'), (512, 600, 'RGB'),
             (13, 11, 'RGB'), (5, 9, 'RGB'), (448, 448, 'RGB'))


def _generated(height: int, width: int, mode: str,
               rng: np.random.Generator) -> Image.Image:
  """Gradients plus noise: every pixel's rounding differs from its
  neighbour's, where a real photo has flat regions that hide errors."""
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                   (x + y) * 7 % 256], axis=-1)
  pixels = np.clip(base + rng.integers(-40, 41, (height, width, 3)), 0,
                   255).astype(np.uint8)
  image = Image.fromarray(pixels)
  if mode == 'L':
    return image.convert('L')
  if mode == 'RGBA':
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    return Image.fromarray(np.concatenate([pixels, alpha], axis=-1))
  if mode == 'P':
    return image.quantize(200)
  return image


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp('images')
  photos = importlib.resources.files('sklearn.datasets') / 'images'
  for name in ('china.jpg', 'flower.jpg'):
    with importlib.resources.as_file(photos / name) as path:
      shutil.copy(path, folder / name)
  rng = np.random.default_rng(0)
  for height, width, mode in GENERATED:
    _generated(height, width, mode, rng).save(
        folder / f'{height}x{width}_{mode}.png')
  return folder


def _unavailable(message: str):
  if os.environ.get('CI') == 'true':
    pytest.fail(f'CI=true, but {message}')
  pytest.skip(message)


def _run(command, what):
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False, timeout=600)
  assert result.returncode == 0, f'{what} failed:\n{result.stderr[-4000:]}'


@pytest.fixture(scope='module')
def publisher_outputs(image_dir, tmp_path_factory):
  """{'preset/tag|image': float32 HWC} from torchvision, timm and Keras."""
  if importlib.util.find_spec('timm') is None:
    _unavailable('timm is not installed (pip install --no-deps timm)')
  try:
    wheel = torchvision_source.find_wheel()
  except FileNotFoundError as e:
    _unavailable(f'no torchvision wheel: {e}')
  entries = [f'{w.publisher}:{w.preset}/{w.tag}'
             for w in flax_resnet.list_pretrained()
             if w.publisher in ('torchvision', 'timm', 'keras')]
  out = tmp_path_factory.mktemp('publishers') / 'out.npz'
  _run([sys.executable, str(LIBRARY_SIDE / 'transforms_side.py'), str(wheel),
        str(image_dir), str(out), *entries], 'the publishers\' transforms')
  return dict(np.load(out))


def _ours(transform: transforms.EvalTransform, path: pathlib.Path):
  with Image.open(path) as image:
    return transform(image)


@pytest.mark.parametrize('publisher', ['torchvision', 'timm', 'keras'])
def test_transforms_equal_the_publishers_own(publisher, publisher_outputs,
                                             image_dir):
  entries = flax_resnet.list_pretrained(publisher=publisher)
  images = sorted(image_dir.iterdir())
  assert entries and len(images) == 11
  for w in entries:
    for path in images:
      theirs = publisher_outputs[f'{w.preset}/{w.tag}|{path.name}']
      ours = _ours(w.transform, path)
      assert ours.dtype == np.float32
      np.testing.assert_array_equal(ours, theirs,
                                    err_msg=f'{w.preset} {w.tag} {path.name}')


def test_gluon_transform_equals_mxnet(image_dir, tmp_path):
  reason = probe_gluon.unavailable()
  if reason:
    _unavailable(f'MXNet is not available: {reason}')
  gluon = flax_resnet.list_pretrained(publisher='gluon')
  assert {w.transform for w in gluon} == {transforms.gluon(256, 224)}
  transform = gluon[0].transform
  # Decoded here, by PIL, for both sides: what is compared is the resize,
  # crop and normalisation (MXNet's imdecode is OpenCV's JPEG decoder).
  arrays = {}
  for path in sorted(image_dir.iterdir()):
    with Image.open(path) as image:
      arrays[path.name] = np.asarray(image.convert('RGB'))
  np.savez(tmp_path / 'in.npz', **arrays)
  _run([str(probe_gluon.mxnet_python()), str(LIBRARY_SIDE / 'gluon_transforms.py'),
        str(tmp_path / 'in.npz'), str(tmp_path / 'out.npz')],
       'MXNet Gluon transforms')
  theirs = np.load(tmp_path / 'out.npz')
  assert sorted(theirs.files) == sorted(arrays)
  for name, array in arrays.items():
    np.testing.assert_array_equal(transform(array), theirs[name],
                                  err_msg=name)

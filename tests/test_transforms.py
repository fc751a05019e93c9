"""EvalTransform itself, the registry's transforms and class names, the CLI.

The comparisons with the publishers' own code are in
test_transforms_parity.py; here: a training config's transform against the
training pipeline's eval, the registry against torchvision's and timm's own
tables, input checking, and `python -m flax_resnet.pretrained`.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import pathlib
import zipfile

import numpy as np
import pytest
from PIL import Image

import flax_resnet
from flax_resnet.data import preprocess
from flax_resnet.pretrained import __main__ as cli
from flax_resnet.pretrained import categories, transforms
from flax_resnet.references import torchvision_source
from flax_resnet.train import config as config_lib

SIZES = ((223, 225), (500, 97), (97, 500), (256, 256), (300, 231), (32, 32),
         (427, 640))


def _image(height, width, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(
      0, 256, (height, width, 3), dtype=np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, quality=90)
  return buffer.getvalue()


def _config(**fields):
  config = config_lib.default_config()
  config.update(fields)
  return config


@pytest.mark.parametrize('fields', [
    {},  # imagenet, 224, crop ratio 0.875, ImageNet mean/std on 0..255
    {'image_size': 32, 'eval_crop_ratio': 0.9,
     'mean_rgb': (125.3, 123.0, 113.9), 'std_rgb': (63.0, 62.1, 66.7)},
    {'image_size': 32, 'augment': 'cifar'},
    {'image_size': 32, 'augment': 'none'},
])
def test_from_config_is_what_the_eval_pipeline_feeds_the_model(fields):
  config = _config(**fields)
  transform = transforms.from_config(config)
  pipeline = preprocess.EvalPreprocess(
      preprocess.PreprocessOptions.from_config(config, 'eval_split'))
  size = config.image_size
  for seed, (height, width) in enumerate(SIZES + ((size, size),)):
    array = _image(height, width, seed)
    png, jpeg = _encoded(array, 'PNG'), _encoded(array, 'JPEG')
    for stored, ours in [(array, transform(array)),
                         (array[..., :1], transform(array[..., 0])),
                         (png, transform(Image.open(io.BytesIO(png)))),
                         (png, transform(png)), (jpeg, transform(jpeg))]:
      want = pipeline.map({'image': stored, 'label': 0, 'mask': True})
      np.testing.assert_array_equal(ours, want['image'],
                                    err_msg=f'{height}x{width}')
    # A JPEG decoded by PIL first: the pipeline decodes only the crop box
    # (jpeg.py), and PIL's resize of that window rounds up to one level of
    # 255 apart (measured: 1 level on up to 26% of the pixels of a 500x97
    # image; data/preprocess.py says so). Bytes give its exact result.
    want = pipeline.map({'image': jpeg, 'label': 0, 'mask': True})['image']
    levels = np.abs(transform(Image.open(io.BytesIO(jpeg))) - want) * np.asarray(
        config.std_rgb, np.float32)
    assert levels.max() <= 1 + 1e-4, (height, width, levels.max())
  assert transform.image_size == size


def test_describe_states_the_rule_in_one_line():
  v2 = flax_resnet.pretrained.REGISTRY[('resnet50', 'IMAGENET1K_V2')]
  assert v2.transform.describe() == (
      'resize shorter side to 232 (bilinear, PIL, antialias) -> centre crop '
      '224 -> RGB /255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, '
      '0.225)')
  keras = flax_resnet.pretrained.REGISTRY[('keras_resnet50', 'imagenet')]
  assert keras.transform.describe() == (
      'resize both sides to 224 (nearest, PIL) -> BGR, mean (103.939, '
      '116.779, 123.68)')
  gluon = flax_resnet.pretrained.REGISTRY[('gluon_resnet50_v1', 'imagenet')]
  assert 'OpenCV, no antialias, crop offset floored' in (
      gluon.transform.describe())
  assert transforms.from_config(_config()).describe().startswith(
      'resize the centre box that "shorter side to 256, centre crop 224"')


def test_batch_stacks_single_calls_and_every_mode_is_converted():
  transform = transforms.torchvision(40, 32)
  array = _image(50, 61)
  rgb = Image.fromarray(array)
  images = [array, rgb, rgb.convert('L'), rgb.convert('RGBA'),
            rgb.quantize(50), array[..., 0]]
  batch = transform.batch(images)
  assert batch.shape == (6, 32, 32, 3) and batch.dtype == np.float32
  for image, row in zip(images, batch):
    np.testing.assert_array_equal(transform(image), row)
  np.testing.assert_array_equal(batch[0], batch[1])
  np.testing.assert_array_equal(
      batch[2], transform(np.asarray(rgb.convert('L').convert('RGB'))))
  np.testing.assert_array_equal(batch[5], transform(np.repeat(
      array[..., :1], 3, axis=-1)))


@pytest.mark.parametrize('bad', [
    np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
    np.zeros((4,), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_a_bad_image_array_is_refused_by_name(bad):
  with pytest.raises(ValueError, match=r'^image: '):
    transforms.torchvision()(bad)


@pytest.mark.parametrize('fields, mentions', [
    ({'resize': 'longer'}, 'resize='),
    ({'interpolation': 'lanczos'}, 'interpolation='),
    ({'resampler': 'opencv', 'interpolation': 'bicubic'}, 'opencv'),
    ({'crop_size': 300}, 'crop_size=300'),
    ({'mean': (0.5, 0.5)}, 'mean needs 3 values'),
    ({'resize': 'box'}, 'needs crop_pct'),
    ({'std': (1, 0, 1)}, 'none may be 0'),
])
def test_an_inconsistent_transform_is_refused(fields, mentions):
  base = dict(name='x', resize='shorter', resize_size=256, crop_size=224)
  with pytest.raises(ValueError, match=mentions):
    transforms.EvalTransform(**{**base, **fields})


# ---------------------------------------------------------- the registry


def test_every_published_entry_has_a_transform_and_the_imagenet_names():
  entries = flax_resnet.list_pretrained()
  assert {w.publisher for w in entries} == {'torchvision', 'timm', 'gluon',
                                            'keras'}
  for w in entries:
    assert isinstance(w.transform, transforms.EvalTransform), w.key
    assert w.categories == flax_resnet.pretrained.imagenet_categories()


def _torchvision_wheel() -> pathlib.Path:
  try:
    return torchvision_source.find_wheel()
  except FileNotFoundError as e:
    pytest.skip(f'no torchvision wheel: {e}')


def test_torchvision_entries_resize_as_their_weights_enums_say():
  """resize_size/crop_size of each enum's transforms=partial(...)."""
  _torchvision_wheel()
  resnet = torchvision_source.load_resnet_module()
  published = {}
  for name, enum in vars(resnet).items():
    if name.endswith('_Weights') and name != 'Weights':
      for member in enum:
        keywords = member.value.transforms.keywords
        published[(name[:-len('_Weights')].lower(), member.name)] = (
            transforms.torchvision(keywords.get('resize_size', 256),
                                   keywords['crop_size']))
  ours = {w.key: w.transform
          for w in flax_resnet.list_pretrained(publisher='torchvision')}
  assert ours == published
  # ImageClassification's defaults, which the partials leave out.
  with zipfile.ZipFile(_torchvision_wheel()) as wheel:
    presets = wheel.read('torchvision/transforms/_presets.py').decode()
  assert ('resize_size: int = 256,\n        mean: tuple[float, ...] = '
          '(0.485, 0.456, 0.406),\n        std: tuple[float, ...] = '
          '(0.229, 0.224, 0.225),\n        interpolation: InterpolationMode '
          '= InterpolationMode.BILINEAR,\n        antialias: Optional[bool] = '
          'True,') in presets


def test_class_names_are_torchvisions_and_ids_are_timms():
  names = flax_resnet.pretrained.imagenet_categories()
  ids = categories.wordnet_ids()
  assert len(names) == len(set(names)) == 1000 and len(ids) == 1000
  assert ids == tuple(sorted(ids))  # class index = sorted WordNet ID
  assert (names[0], names[134], names[517], names[638], names[639],
          names[999]) == ('tench', 'crane bird', 'crane', 'maillot',
                          'maillot tank suit', 'toilet tissue')
  with zipfile.ZipFile(_torchvision_wheel()) as wheel:
    meta = ast.parse(wheel.read('torchvision/models/_meta.py').decode())
  published = next(ast.literal_eval(node.value) for node in meta.body
                   if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], 'id', '') ==
                   '_IMAGENET_CATEGORIES')
  assert names == tuple(published)
  spec = importlib.util.find_spec('timm')
  if spec is None:
    pytest.skip('timm is not installed (pip install --no-deps timm)')
  info = pathlib.Path(spec.origin).parent / 'data' / '_info'
  assert ids == tuple((info / 'imagenet_synsets.txt').read_text().split())
  lemmas = dict(line.split('\t', 1) for line in (
      info / 'imagenet_synset_to_lemma.txt').read_text().splitlines())
  differ = [i for i, (wnid, name) in enumerate(zip(ids, names))
            if lemmas[wnid].split(',')[0] != name]
  assert differ == [134, 639]  # torchvision's two disambiguated homonyms


# ------------------------------------------------------------------- CLI


def test_cli_prints_each_entrys_transform(capsys):
  assert cli.main(['resnet50']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ['preset', 'tag', 'top-1', 'checksum', 'url']
  v2 = next(i for i, line in enumerate(lines) if 'IMAGENET1K_V2' in line)
  assert lines[v2 + 1].startswith('    eval: resize shorter side to 232 ')


def test_cli_help_and_an_unknown_preset(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['--help'])
  assert e.value.code == 0
  assert 'usage: python -m flax_resnet.pretrained' in capsys.readouterr().out
  assert cli.main(['resnet5O']) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  assert captured.err.count('\n') == 1
  assert captured.err.startswith("error: no weights are registered for preset "
                                 "'resnet5O'. Did you mean 'resnet50'?")
  assert cli.main(['resnet20']) == 2
  assert capsys.readouterr().err.startswith(
      "error: preset 'resnet20' has no registered weights (load your own")

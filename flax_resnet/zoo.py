"""Named presets (torchvision / timm / Gluon / paper names) and create_model."""

from __future__ import annotations

import difflib
from typing import Any

from flax_resnet.model import ResNet
from flax_resnet.spec import ResNetSpec

_IMAGENET_DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}


def _imagenet(depth: int, **fields) -> ResNetSpec:
  block, depths = _IMAGENET_DEPTHS[depth]
  return ResNetSpec(block=block, depths=depths, **fields)


def _cifar(depth: int, **fields) -> ResNetSpec:
  """He et al. 2015 section 4.2: 6n+2 layers, widths 16/32/64, option A."""
  n = (depth - 2) // 6
  return ResNetSpec(block='basic', depths=(n, n, n), widths=(16, 32, 64),
                    stem='cifar', stem_width=16, shortcut='A', num_classes=10,
                    **fields)


def _cifar_preact_bottleneck(depth: int) -> ResNetSpec:
  """He et al. 2016: 9n+2 layers, bottleneck outputs 64/128/256."""
  n = (depth - 2) // 9
  return ResNetSpec(block='bottleneck', depths=(n, n, n), widths=(16, 32, 64),
                    stem='cifar', stem_width=16, shortcut='B', preact=True,
                    num_classes=10, reference=None)


PRESETS: dict[str, ResNetSpec] = {}

# torchvision ("v1.5": stride on the 3x3, option B).
for _d in _IMAGENET_DEPTHS:
  PRESETS[f'resnet{_d}'] = _imagenet(
      _d, reference='torchvision' if _d != 200 else 'timm')
PRESETS['resnext50_32x4d'] = _imagenet(50, groups=32, width_per_group=4,
                                       reference='torchvision')
PRESETS['resnext101_32x8d'] = _imagenet(101, groups=32, width_per_group=8,
                                        reference='torchvision')
PRESETS['resnext101_64x4d'] = _imagenet(101, groups=64, width_per_group=4,
                                        reference='torchvision')
PRESETS['wide_resnet50_2'] = _imagenet(50, width_per_group=128,
                                       reference='torchvision')
PRESETS['wide_resnet101_2'] = _imagenet(101, width_per_group=128,
                                        reference='torchvision')
# Bag of Tricks ResNet-D (timm resnet50d): deep stem + avg-pool shortcut.
PRESETS['resnet50d'] = _imagenet(50, stem='deep', shortcut='D',
                                 reference='timm')
PRESETS['resnet101d'] = _imagenet(101, stem='deep', shortcut='D',
                                  reference='timm')
# True v1 (Caffe, Keras, Gluon V1): stride on the first 1x1.
for _d in _IMAGENET_DEPTHS:
  if _d != 200:
    PRESETS[f'resnet{_d}_v1'] = _imagenet(_d, stride_in='1x1' if _d >= 50 else
                                          '3x3', reference='gluon_v1')
# Pre-activation (He et al. 2016, Gluon V2).
for _d in _IMAGENET_DEPTHS:
  if _d != 200:
    PRESETS[f'resnet{_d}_v2'] = _imagenet(_d, preact=True,
                                          reference='gluon_v2')
# Exact library networks: the layout above plus every convention that changes
# the weights, so each library's own files load (flax_resnet.convert).
# Gluon model zoo V1: BottleneckV1's two 1x1 convs carry biases.
for _d in (18, 34, 50, 101, 152):
  PRESETS[f'gluon_resnet{_d}_v1'] = _imagenet(
      _d, stride_in='1x1' if _d >= 50 else '3x3',
      conv_bias=('conv1', 'conv3') if _d >= 50 else (),
      reference='gluon_v1')
# Gluon model zoo V2: a scale- and shift-free BatchNorm on the raw image, and
# BN + ReLU after the stem conv although the blocks are pre-activation.
for _d in (18, 34, 50, 101, 152):
  PRESETS[f'gluon_resnet{_d}_v2'] = _imagenet(
      _d, preact=True, input_norm=True, stem_norm=True, reference='gluon_v2')
# keras.applications ResNet50/101/152 (true v1): every conv has a bias.
_KERAS_BN = dict(bn_eps=1.001e-5, bn_momentum=0.99)
for _d in (50, 101, 152):
  PRESETS[f'keras_resnet{_d}'] = _imagenet(
      _d, stride_in='1x1',
      conv_bias=('stem', 'conv1', 'conv2', 'conv3', 'shortcut'),
      reference='keras', **_KERAS_BN)
# keras.applications ResNet50V2/101V2/152V2: the stride on the last block of
# stages 1-3 with a max-pool shortcut, no BN/ReLU in the stem (so its max-pool
# sees negative values and zero padding matters), biases on the stem, the
# projection and each block's last conv.
for _d in (50, 101, 152):
  PRESETS[f'keras_resnet{_d}_v2'] = _imagenet(
      _d, preact=True, stem_norm=False, strides=(2, 2, 2, 1),
      stride_block='last', pool_shortcut=True, pool_padding='zeros',
      conv_bias=('stem', 'conv3', 'shortcut'), reference='keras_v2',
      **_KERAS_BN)
# CIFAR paper nets.
for _d in (20, 32, 44, 56, 110, 1202):
  PRESETS[f'resnet{_d}'] = _cifar(_d, reference='paper')
PRESETS['preact_resnet110'] = _cifar(110, preact=True, reference=None)
PRESETS['preact_resnet164'] = _cifar_preact_bottleneck(164)

del _d, _KERAS_BN


def list_models() -> list[str]:
  """Names accepted by create_model, sorted."""
  return sorted(PRESETS)


def get_spec(name: str, **overrides: Any) -> ResNetSpec:
  """The validated spec of preset `name` with field overrides applied."""
  if name not in PRESETS:
    close = difflib.get_close_matches(str(name), PRESETS, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(
        f'model={name!r} is not a known preset.{hint} Valid choices: '
        f'{", ".join(list_models())}.')
  return PRESETS[name].replace(**overrides).validate()


def create_model(name: str, **overrides: Any) -> ResNet:
  """Builds preset `name`; overrides replace any ResNetSpec field.

  >>> model = create_model('resnet50', num_classes=10, shortcut='C')
  >>> variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
  """
  return ResNet(get_spec(name, **overrides))

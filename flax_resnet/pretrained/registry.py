"""Published ImageNet weights for the presets: where each file is, its checksum.

Every URL, checksum and top-1 below is copied from its publisher; where the
publisher gives none, the field is None (nothing is guessed):

* torchvision (`torchvision/models/resnet.py`, `*_Weights` enums): the URL,
  and `acc@1` from the weights' meta. The checksum is the sha256 prefix in the
  file name, which is what torchvision itself checks (`check_hash=True`).
  torchvision publishes IMAGENET1K_V2 only for resnet50/101/152,
  resnext50_32x4d, resnext101_32x8d and the wide nets; resnet18, resnet34 and
  resnext101_64x4d have IMAGENET1K_V1 only.
* timm (`timm/models/resnet.py` pretrained tags, files on the Hugging Face
  hub under `timm/<model>.<tag>`): timm records no checksum and no top-1 in
  its configs, so both are None.
* Gluon model zoo (`mxnet/gluon/model_zoo/model_store.py`, mxnet 1.9.1): a
  `.zip` holding `<name>-<sha1[:8]>.params`; the sha1 is of that `.params`.
* Keras applications (`keras/src/applications/resnet.py`): legacy `.h5`
  files, the md5 `file_hash` Keras passes to `get_file`; top-1 from the
  keras.io applications table.

Each entry also carries its publisher's evaluation preprocessing
(`transform`, see transforms.py; the sizes are copied from the same sources:
torchvision's `transforms=partial(ImageClassification, ...)`, timm's
pretrained_cfg input_size / crop_pct / interpolation / mean / std) and its
label set (`categories`: the class names, categories.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from flax_resnet.pretrained import categories as categories_lib
from flax_resnet.pretrained import transforms
from flax_resnet.pretrained.transforms import EvalTransform


@dataclasses.dataclass(frozen=True)
class Weights:
  """One published checkpoint.

  Attributes:
    preset: the flax_resnet preset the file loads into.
    tag: the publisher's name for it ('IMAGENET1K_V2', 'a1_in1k', 'imagenet').
    url: where the publisher serves it.
    checksum: 'ALGO:HEX' (sha256, sha1 or md5) of the file, or of `member`
      for an archive; a shorter HEX is a prefix (torchvision's file names).
      None where the publisher gives none.
    top1: the publisher's ImageNet-1k top-1 in percent, or None.
    publisher: 'torchvision', 'timm', 'gluon', 'keras' or 'user'.
    member: the file to take out of a .zip download (Gluon), else None.
    num_classes: outputs of the published classifier.
    transform: the publisher's evaluation preprocessing, or None if unknown.
    label_set: name of the class-name list (categories.py), or None.
  """
  preset: str
  tag: str
  url: str
  checksum: Optional[str]
  top1: Optional[float]
  publisher: str
  member: Optional[str] = None
  num_classes: int = 1000
  transform: Optional[EvalTransform] = None
  label_set: Optional[str] = None

  @property
  def key(self) -> tuple[str, str]:
    return (self.preset, self.tag)

  @property
  def categories(self) -> Optional[tuple[str, ...]]:
    """Class names, index i = output i; None without a label set."""
    if self.label_set is None:
      return None
    return categories_lib.categories(self.label_set)


_TORCHVISION = 'https://download.pytorch.org/models/'
# (preset, tag, file, acc@1, resize_size) from torchvision's *_Weights enums;
# every one has crop_size=224.
_TORCHVISION_FILES = (
    ('resnet18', 'IMAGENET1K_V1', 'resnet18-f37072fd.pth', 69.758, 256),
    ('resnet34', 'IMAGENET1K_V1', 'resnet34-b627a593.pth', 73.314, 256),
    ('resnet50', 'IMAGENET1K_V1', 'resnet50-0676ba61.pth', 76.130, 256),
    ('resnet50', 'IMAGENET1K_V2', 'resnet50-11ad3fa6.pth', 80.858, 232),
    ('resnet101', 'IMAGENET1K_V1', 'resnet101-63fe2227.pth', 77.374, 256),
    ('resnet101', 'IMAGENET1K_V2', 'resnet101-cd907fc2.pth', 81.886, 232),
    ('resnet152', 'IMAGENET1K_V1', 'resnet152-394f9c45.pth', 78.312, 256),
    ('resnet152', 'IMAGENET1K_V2', 'resnet152-f82ba261.pth', 82.284, 232),
    ('resnext50_32x4d', 'IMAGENET1K_V1', 'resnext50_32x4d-7cdf4587.pth',
     77.618, 256),
    ('resnext50_32x4d', 'IMAGENET1K_V2', 'resnext50_32x4d-1a0047aa.pth',
     81.198, 232),
    ('resnext101_32x8d', 'IMAGENET1K_V1', 'resnext101_32x8d-8ba56ff5.pth',
     79.312, 256),
    ('resnext101_32x8d', 'IMAGENET1K_V2', 'resnext101_32x8d-110c445d.pth',
     82.834, 232),
    ('resnext101_64x4d', 'IMAGENET1K_V1', 'resnext101_64x4d-173b62eb.pth',
     83.246, 232),
    ('wide_resnet50_2', 'IMAGENET1K_V1', 'wide_resnet50_2-95faca4d.pth',
     78.468, 256),
    ('wide_resnet50_2', 'IMAGENET1K_V2', 'wide_resnet50_2-9ba9bcbe.pth',
     81.602, 232),
    ('wide_resnet101_2', 'IMAGENET1K_V1', 'wide_resnet101_2-32ee1156.pth',
     78.848, 256),
    ('wide_resnet101_2', 'IMAGENET1K_V2', 'wide_resnet101_2-d733dc28.pth',
     82.510, 232),
)

# (preset, timm tag, input_size, crop_pct): timm/<preset>.<tag> on the
# Hugging Face hub; the sizes from its pretrained_cfg (timm 1.0.31), all with
# interpolation 'bicubic', crop_mode 'center' and the ImageNet mean/std.
# input_size, not test_input_size: what resolve_data_config gives by default.
_TIMM_TAGS = (
    ('resnet18', 'a1_in1k', 224, 0.95),
    ('resnet34', 'a1_in1k', 224, 0.95),
    ('resnet50', 'a1_in1k', 224, 0.95),
    ('resnet50', 'a1h_in1k', 176, 0.9),
    ('resnet101', 'a1h_in1k', 224, 0.95),
    ('resnet152', 'a1h_in1k', 224, 0.95),
    ('resnext50_32x4d', 'a1h_in1k', 224, 0.95),
    ('wide_resnet50_2', 'racm_in1k', 224, 0.875),
    ('resnet50d', 'ra2_in1k', 224, 0.875),
    ('resnet101d', 'ra2_in1k', 256, 0.95),
)

_GLUON = 'https://apache-mxnet.s3-accelerate.dualstack.amazonaws.com/gluon/models/'
# model_store.py's _model_sha1 (mxnet 1.9.1).
_GLUON_SHA1 = {
    'resnet18_v1': 'a0666292f0a30ff61f857b0b66efc0228eb6a54b',
    'resnet34_v1': '48216ba99a8b1005d75c0f3a0c422301a0473233',
    'resnet50_v1': '0aee57f96768c0a2d5b23a6ec91eb08dfb0a45ce',
    'resnet101_v1': 'd988c13d6159779e907140a638c56f229634cb02',
    'resnet152_v1': '671c637a14387ab9e2654eafd0d493d86b1c8579',
    'resnet18_v2': 'a81db45fd7b7a2d12ab97cd88ef0a5ac48b8f657',
    'resnet34_v2': '9d6b80bbc35169de6b6edecffdd6047c56fdd322',
    'resnet50_v2': 'ecdde35339c1aadbec4f547857078e734a76fb49',
    'resnet101_v2': '18e93e4f48947e002547f50eabbcc9c83e516aa6',
    'resnet152_v2': 'f2695542de38cf7e71ed58f02893d82bb409415e',
}

_KERAS = 'https://storage.googleapis.com/tensorflow/keras-applications/resnet/'
# keras/src/applications/resnet.py WEIGHTS_HASHES[name][0] (include_top) and
# the keras.io applications table's top-1.
_KERAS_FILES = (
    ('keras_resnet50', 'resnet50', '2cb95161c43110f7111970584f804107', 74.9),
    ('keras_resnet101', 'resnet101', 'f1aeb4b969a6efcfb50fad2f0c20cfc5',
     76.4),
    ('keras_resnet152', 'resnet152', '100835be76be38e30d865e96f2aaae62',
     76.6),
    ('keras_resnet50_v2', 'resnet50v2', '3ef43a0b657b3be2300d5770ece849e0',
     76.0),
    ('keras_resnet101_v2', 'resnet101v2', '6343647c601c52e1368623803854d971',
     77.2),
    ('keras_resnet152_v2', 'resnet152v2', 'a49b44d1979771252814e80f8ec446f9',
     78.0),
)


def _published() -> list[Weights]:
  imagenet = categories_lib.IMAGENET1K
  entries = []
  for preset, tag, file, top1, resize_size in _TORCHVISION_FILES:
    entries.append(Weights(
        preset, tag, _TORCHVISION + file,
        'sha256:' + file.rsplit('-', 1)[1].split('.')[0], top1,
        'torchvision', transform=transforms.torchvision(resize_size, 224),
        label_set=imagenet))
  for preset, tag, input_size, crop_pct in _TIMM_TAGS:
    entries.append(Weights(
        preset, tag, f'https://huggingface.co/timm/{preset}.{tag}/resolve/main/'
        'model.safetensors', None, None, 'timm',
        transform=transforms.timm(input_size, crop_pct), label_set=imagenet))
  for name, sha1 in _GLUON_SHA1.items():
    file = f'{name}-{sha1[:8]}'
    entries.append(Weights(
        f'gluon_{name}', 'imagenet', f'{_GLUON}{file}.zip', f'sha1:{sha1}',
        None, 'gluon', member=f'{file}.params',
        transform=transforms.gluon(256, 224), label_set=imagenet))
  for preset, keras_name, md5, top1 in _KERAS_FILES:
    entries.append(Weights(
        preset, 'imagenet',
        f'{_KERAS}{keras_name}_weights_tf_dim_ordering_tf_kernels.h5',
        f'md5:{md5}', top1, 'keras',
        transform=transforms.keras('tf' if preset.endswith('_v2') else 'caffe'),
        label_set=imagenet))
  return entries


REGISTRY: dict[tuple[str, str], Weights] = {w.key: w for w in _published()}

"""Library side of the preprocessing parity test; runs in a child interpreter.

    python transforms_side.py WHEEL IMAGE_DIR OUT.npz PUBLISHER:PRESET/TAG ...

PUBLISHER is torchvision, timm or keras; WHEEL a torchvision wheel. Applies
each entry's evaluation preprocessing, from its publisher's own code, to
each file in IMAGE_DIR, loaded as its own loader does, and writes the float32
outputs as OUT.npz['<preset>/<tag>|<image file name>'] (HWC, the channel
order the library outputs):

* torchvision: `<Weights enum>.<tag>.transforms()` of torchvision/models/
  resnet.py from the wheel WHEEL, on `Image.open(f).convert('RGB')` (its
  ImageFolder loader). The wheel's compiled _C does not load beside this
  torch, and torchvision/__init__.py needs it, so `torchvision` is registered
  as a bare package over the wheel's folder: torchvision.transforms and
  torchvision.models then import unchanged from the zip.
* timm: `create_transform(**resolve_data_config({}, pretrained_cfg=
  get_pretrained_cfg('<model>.<tag>').to_dict()))`, the installed timm
  (whose import needs torchvision: the same bare package), same loader.
* keras: `keras.utils.load_img(path, target_size=(224, 224))`,
  `img_to_array`, then `keras.applications.resnet.preprocess_input`
  (ResNet50/101/152) or `resnet_v2.preprocess_input` (the V2s).
"""

import os
import sys
import types

import numpy as np

TORCHVISION_ENUMS = {
    'resnet18': 'ResNet18_Weights', 'resnet34': 'ResNet34_Weights',
    'resnet50': 'ResNet50_Weights', 'resnet101': 'ResNet101_Weights',
    'resnet152': 'ResNet152_Weights',
    'resnext50_32x4d': 'ResNeXt50_32X4D_Weights',
    'resnext101_32x8d': 'ResNeXt101_32X8D_Weights',
    'resnext101_64x4d': 'ResNeXt101_64X4D_Weights',
    'wide_resnet50_2': 'Wide_ResNet50_2_Weights',
    'wide_resnet101_2': 'Wide_ResNet101_2_Weights',
}


def bare_torchvision(wheel):
  package = types.ModuleType('torchvision')
  package.__path__ = [os.path.join(wheel, 'torchvision')]
  sys.modules['torchvision'] = package


def pil_loader(path):
  from PIL import Image
  with open(path, 'rb') as f:
    return Image.open(f).convert('RGB')


def torchvision_outputs(entries, images):
  from torchvision.models import resnet
  out = {}
  for entry in entries:
    preset, tag = entry.split('/')
    transform = getattr(getattr(resnet, TORCHVISION_ENUMS[preset]),
                        tag).transforms()
    for path in images:
      out[entry, path] = transform(pil_loader(path)).numpy().transpose(1, 2, 0)
  return out


def timm_outputs(entries, images):
  import timm
  import timm.data
  out = {}
  for entry in entries:
    cfg = timm.models.get_pretrained_cfg(entry.replace('/', '.')).to_dict()
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({}, pretrained_cfg=cfg))
    for path in images:
      out[entry, path] = transform(pil_loader(path)).numpy().transpose(1, 2, 0)
  return out


def keras_outputs(entries, images):
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import keras
  out = {}
  for entry in entries:
    module = (keras.applications.resnet_v2 if entry.split('/')[0].endswith(
        '_v2') else keras.applications.resnet)
    for path in images:
      array = keras.utils.img_to_array(
          keras.utils.load_img(path, target_size=(224, 224)))
      out[entry, path] = np.asarray(module.preprocess_input(array))
  return out


def main(wheel, image_dir, out_path, entries):
  images = sorted(os.path.join(image_dir, name)
                  for name in os.listdir(image_dir))
  bare_torchvision(wheel)
  outputs = {}
  for publisher, run in (('torchvision', torchvision_outputs),
                         ('timm', timm_outputs), ('keras', keras_outputs)):
    mine = [e.split(':', 1)[1] for e in entries
            if e.split(':', 1)[0] == publisher]
    if mine:
      outputs.update(run(mine, images))
  np.savez(out_path, **{f'{entry}|{os.path.basename(path)}': value
                        for (entry, path), value in outputs.items()})


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])

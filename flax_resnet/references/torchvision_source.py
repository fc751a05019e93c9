"""Runs torchvision's own `models/resnet.py` on CPU-only PyTorch.

torchvision's wheels on PyPI carry a compiled `_C` extension built against a
different torch, so `import torchvision` fails beside the CPU torch used here.
The ResNet architecture itself is pure Python, so this module reads
`torchvision/models/resnet.py` straight out of the published wheel and executes
it unchanged. Only its imports of weight metadata, logging and transform
presets (nothing that touches the architecture) are served by small stand-ins.

The wheel is found at $FLAX_RESNET_TORCHVISION_WHEEL, else in the cache folder,
else fetched once with `pip download --no-deps torchvision==VERSION` (7 MB, from
the package index; no model weights are downloaded).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import pathlib
import subprocess
import sys
import types
import zipfile
from typing import Any

from flax_resnet import native

TORCHVISION_VERSION = '0.29.1'
CACHE = pathlib.Path(native.cache_dir())  # the extensions' cache, same rules
_PACKAGE = '_flax_resnet_torchvision_ref'


def find_wheel(download: bool = True) -> pathlib.Path:
  """Path of a torchvision wheel; downloads one (no deps) if allowed."""
  explicit = os.environ.get('FLAX_RESNET_TORCHVISION_WHEEL')
  if explicit:
    path = pathlib.Path(explicit)
    if not path.is_file():
      raise FileNotFoundError(
          f'FLAX_RESNET_TORCHVISION_WHEEL={explicit} does not exist.')
    return path
  found = sorted(CACHE.glob(f'torchvision-{TORCHVISION_VERSION}-*.whl'))
  if found:
    return found[-1]
  if not download:
    raise FileNotFoundError(f'no torchvision wheel in {CACHE}')
  CACHE.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
         '--only-binary=:all:', f'torchvision=={TORCHVISION_VERSION}',
         '-d', str(CACHE)]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  found = sorted(CACHE.glob(f'torchvision-{TORCHVISION_VERSION}-*.whl'))
  if result.returncode or not found:
    raise FileNotFoundError(
        'could not fetch the torchvision wheel with `' + ' '.join(cmd) +
        '`:\n' + result.stderr[-2000:])
  return found[-1]


# ------------------------------------------------- stand-ins for non-arch code


@dataclasses.dataclass
class _Weights:
  url: str
  transforms: Any
  meta: dict[str, Any]


class _WeightsEnum(enum.Enum):

  @classmethod
  def verify(cls, obj):
    if obj is not None:
      raise ValueError('pretrained torchvision weights cannot be downloaded '
                       'here; build with weights=None and load a state_dict.')
    return obj


def _register_model(name=None):
  del name
  return lambda fn: fn


def _handle_legacy_interface(**weights):
  del weights
  return lambda fn: fn


def _ovewrite_named_param(kwargs, param, new_value):
  kwargs[param] = new_value


def _stub_modules() -> dict[str, types.ModuleType]:
  def module(name, **attrs):
    m = types.ModuleType(f'{_PACKAGE}.{name}' if name else _PACKAGE)
    m.__dict__.update(attrs)
    m.__path__ = []  # a package, so relative imports resolve
    return m

  return {
      '': module(''),
      'transforms': module('transforms'),
      'transforms._presets': module('transforms._presets',
                                    ImageClassification=lambda **kw: None),
      'utils': module('utils', _log_api_usage_once=lambda obj: None),
      'models': module('models'),
      'models._api': module('models._api', register_model=_register_model,
                            Weights=_Weights, WeightsEnum=_WeightsEnum),
      'models._meta': module('models._meta', _IMAGENET_CATEGORIES=[
          f'class_{i}' for i in range(1000)]),
      'models._utils': module(
          'models._utils', _ovewrite_named_param=_ovewrite_named_param,
          handle_legacy_interface=_handle_legacy_interface),
  }


@functools.lru_cache(maxsize=1)
def load_resnet_module() -> types.ModuleType:
  """torchvision.models.resnet, executed from the wheel's own source."""
  with zipfile.ZipFile(find_wheel()) as wheel:
    source = wheel.read('torchvision/models/resnet.py').decode()
  for name, mod in _stub_modules().items():
    sys.modules[mod.__name__] = mod
  module = types.ModuleType(f'{_PACKAGE}.models.resnet')
  module.__package__ = f'{_PACKAGE}.models'
  module.__file__ = f'torchvision-{TORCHVISION_VERSION}.whl!/torchvision/models/resnet.py'
  sys.modules[module.__name__] = module
  exec(compile(source, module.__file__, 'exec'), module.__dict__)
  return module


def build(name: str, **kwargs):
  """torchvision.models.<name>(weights=None, **kwargs), e.g. 'resnet50'."""
  module = load_resnet_module()
  if not hasattr(module, name):
    raise ValueError(f'torchvision has no model {name!r}')
  return getattr(module, name)(weights=None, **kwargs)


def randomize_batch_norms(model, seed: int) -> None:
  """Random weights and running statistics for every BatchNorm2d of `model`.

  A fresh BatchNorm is the identity in eval mode, which would hide a wrong
  mapping of its statistics in a weight-conversion check.
  """
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.bias.uniform_(-0.5, 0.5, generator=generator)
        m.running_mean.uniform_(-0.5, 0.5, generator=generator)
        m.running_var.uniform_(0.5, 2.0, generator=generator)

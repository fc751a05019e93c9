"""flax_resnet: ResNets for JAX as pure-functional Flax Linen modules."""

from flax_resnet.model import ResNet
from flax_resnet.pretrained import (EvalTransform, Pretrained,
                                    list_pretrained, load_pretrained)
from flax_resnet.spec import ResNetSpec
from flax_resnet.zoo import PRESETS, create_model, get_spec, list_models

__all__ = ['ResNet', 'ResNetSpec', 'PRESETS', 'create_model', 'get_spec',
           'list_models', 'load_pretrained', 'list_pretrained', 'Pretrained',
           'EvalTransform', 'nnx']
__version__ = '0.1.0'


def __getattr__(name):
  # flax_resnet.nnx imports flax.nnx (about a second); only when asked for.
  if name == 'nnx':
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module('flax_resnet.nnx')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

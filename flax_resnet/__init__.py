"""flax_resnet: ResNets for JAX as pure-functional Flax Linen modules."""

import importlib
import importlib.util

from flax_resnet import host_allocator

# Before JAX starts its CPU backend, or never: see host_allocator.py.
host_allocator.configure()

# Names load on first use (PEP 562): `import flax_resnet` stays instant, so a
# command line (python -m flax_resnet.predict, ...) can take SIGINT/SIGTERM
# before jax is imported; a signal inside jax's import is swallowed by its gc
# callback.
_EXPORTS = {
    'ResNet': 'flax_resnet.model',
    'ResNetSpec': 'flax_resnet.spec',
    'PRESETS': 'flax_resnet.zoo',
    'create_model': 'flax_resnet.zoo',
    'get_spec': 'flax_resnet.zoo',
    'list_models': 'flax_resnet.zoo',
    'load_pretrained': 'flax_resnet.pretrained',
    'list_pretrained': 'flax_resnet.pretrained',
    'Pretrained': 'flax_resnet.pretrained',
    'EvalTransform': 'flax_resnet.pretrained',
}
__all__ = [*_EXPORTS, 'nnx']
__version__ = '0.1.0'


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if importlib.util.find_spec(f'{__name__}.{name}') is not None:
    # A submodule, as `import flax_resnet` used to load (nnx: flax.nnx).
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted({*globals(), *__all__})

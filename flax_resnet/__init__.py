"""flax_resnet: ResNets for JAX as pure-functional Flax Linen modules."""

from flax_resnet import host_allocator
from flax_resnet import lazy_exports

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


__getattr__, __dir__ = lazy_exports.attach(__name__, globals(), _EXPORTS)

"""flax_resnet: ResNets for JAX as pure-functional Flax Linen modules."""

from flax_resnet.model import ResNet
from flax_resnet.spec import ResNetSpec
from flax_resnet.zoo import PRESETS, create_model, get_spec, list_models

__all__ = ['ResNet', 'ResNetSpec', 'PRESETS', 'create_model', 'get_spec',
           'list_models']
__version__ = '0.1.0'

"""Weights of torchvision, timm, Hugging Face, MXNet Gluon and Keras ResNets
<-> Flax ResNet variables.

    variables = load_weights('resnet50_v1.params', 'gluon_resnet50_v1')
    variables = load_weights('resnet50.weights.h5', 'keras_resnet50')
    variables = load_weights('resnet50.pth', 'resnet50')
    logits = create_model('resnet50').apply(variables, images, train=False)
    state_dict = flax_to_torch(variables, 'resnet50')  # OrderedDict of numpy

One module per format, around one shared name map (keymap.py):

    files.py        what a file holds, from its first bytes
    assemble.py     named arrays -> variables (and back), one error report
    pytorch.py      torch .pth/.pt/.bin and .safetensors (torchvision, timm)
    huggingface.py  transformers ResNet names -> torchvision names
    mxnet.py        Gluon .params, read and written with numpy (no MXNet)
    keras.py        Keras 3 .weights.h5 / .keras and legacy .h5 (h5py only)
    weights.py      load_weights: picks the reader and the name map
    cli.py          python -m flax_resnet.convert MODEL SOURCE OUT_DIR

At import this package needs only numpy: the model stack, torch, h5py and
safetensors are imported inside the functions that use them.
"""

from flax_resnet.convert.cli import main
from flax_resnet.convert.files import unreadable_reason
from flax_resnet.convert.huggingface import hf_to_torchvision_keys
from flax_resnet.convert.keras import (flax_to_keras, keras_key_map,
                                       keras_to_flax, read_h5)
from flax_resnet.convert.keymap import (Entry, SourceEntry, StateDictMismatch,
                                        key_map, resolve_model, torch_names)
from flax_resnet.convert.mxnet import (flax_to_gluon, gluon_key_map,
                                       gluon_to_flax, read_params, save_gluon,
                                       write_params)
from flax_resnet.convert.pytorch import (flax_to_torch, load_state_dict,
                                         save_safetensors, save_torch,
                                         torch_to_flax)
from flax_resnet.convert.weights import (NonFiniteWeights, load_weights,
                                         read_arrays)

__all__ = [
    'Entry', 'NonFiniteWeights', 'SourceEntry', 'StateDictMismatch',
    'flax_to_gluon',
    'flax_to_keras', 'flax_to_torch', 'gluon_key_map', 'gluon_to_flax',
    'hf_to_torchvision_keys', 'keras_key_map', 'keras_to_flax', 'key_map',
    'load_state_dict', 'load_weights', 'main', 'read_arrays', 'read_h5',
    'read_params', 'resolve_model', 'save_gluon', 'save_safetensors',
    'save_torch', 'torch_names', 'torch_to_flax', 'unreadable_reason',
    'write_params',
]

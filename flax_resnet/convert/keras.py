"""keras.applications ResNet / ResNetV2 weights <-> Flax variables.

Read with h5py; neither Keras nor TensorFlow is imported. Two files:

  * Keras 3 `.weights.h5` (`model.save_weights`, also inside a `.keras`
    archive): `layers/<snake_case(class)>[_k]/vars/<j>`, where k counts the
    layers of that class in `model.layers` order and j is the variable's
    index in the layer (conv: kernel, bias; BN: gamma, beta, moving_mean,
    moving_variance; Dense: kernel, bias). No layer names are stored, so the
    order below must be Keras' own.
  * legacy whole-model `.h5` (`model.save('x.h5')`) and tf.keras weight files:
    `[model_weights/]<layer>/<layer>/<weight>[:0]`, read through the
    `layer_names` / `weight_names` attributes.

Keras tensors are laid out as Flax's: conv kernel (kh, kw, in, out), Dense
kernel (in, out), so nothing is transposed. Layer names are Keras':
`conv1_conv`, `conv2_block1_1_conv`, `conv2_block1_0_bn` (the projection),
`conv2_block1_preact_bn` and `post_bn` (V2), `predictions`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import re
import zipfile
from typing import Any, Mapping, Union

import numpy as np

from flax_resnet.convert import files
from flax_resnet.convert.assemble import assemble, variables_to_arrays
from flax_resnet.convert.keymap import (ModelLike, SourceEntry, key_map,
                                        resolve_model)

_LEAVES = {
    'conv': {'kernel': 'kernel', 'bias': 'bias'},
    'bn': {'scale': 'gamma', 'bias': 'beta', 'mean': 'moving_mean',
           'var': 'moving_variance'},
    'dense': {'kernel': 'kernel', 'bias': 'bias'},
}
_VARIABLE_ORDER = {'kernel': 0, 'bias': 1, 'gamma': 0, 'beta': 1,
                   'moving_mean': 2, 'moving_variance': 3}
_CLASS = {'conv': 'conv2d', 'bn': 'batch_normalization', 'dense': 'dense'}
# Where Keras' functional graph puts a block's layers in model.layers
# (sorted by depth, the shortcut branch after the main path's 3x3).
_BLOCK_ORDER = ('preact_bn', '1_conv', '1_bn', '2_conv', '2_bn', '0_conv',
                '3_conv', '0_bn', '3_bn')
_KERAS_NAMES = (re.compile(r'^conv\d+_(conv|bn|block\d+_\w+)$|^post_bn$|'
                           r'^predictions$'))


def matches(keys) -> bool:
  """Whether these are Keras names (either file layout)."""
  keys = list(keys)
  return bool(keys) and all(
      k.startswith('layers/') or
      ('/' in k and _KERAS_NAMES.match(k.split('/')[0])) for k in keys)


def _check_keras_like(spec) -> None:
  if spec.stem != 'imagenet' or spec.shortcut != 'B' or spec.groups != 1:
    raise ValueError(
        'keras.applications has no ResNet with this layout (stem '
        f'{spec.stem!r}, shortcut {spec.shortcut!r}); use a keras_resnet* '
        'preset.')


def _keras_layer(path: tuple[str, ...], spec) -> tuple[str, str]:
  """(Keras layer name, kind) of the layer at our module path."""
  first = path[0]
  if first == 'stem':
    return ('conv1_conv', 'conv') if path[1] == 'conv1' else ('conv1_bn', 'bn')
  if first == 'final_bn':
    return 'post_bn', 'bn'
  if first == 'fc':
    return 'predictions', 'dense'
  stage, block = (int(g) for g in
                  re.match(r'^stage(\d+)_block(\d+)$', first).groups())
  prefix = f'conv{stage + 1}_block{block + 1}'
  if path[1] == 'shortcut':
    kind = 'conv' if path[2] == 'conv' else 'bn'
    return f'{prefix}_0_{kind}', kind
  kind, number = re.match(r'^(conv|bn)(\d)$', path[1]).groups()
  number = int(number)
  if kind == 'conv':
    return f'{prefix}_{number}_conv', 'conv'
  if spec.preact:
    return (f'{prefix}_preact_bn' if number == 1 else
            f'{prefix}_{number - 1}_bn'), 'bn'
  return f'{prefix}_{number}_bn', 'bn'


def _layer_rank(layer: str) -> tuple:
  if layer.startswith('conv1_'):
    return (0, 0, 0, layer != 'conv1_conv')
  if layer == 'post_bn':
    return (2, 0, 0, 0)
  if layer == 'predictions':
    return (3, 0, 0, 0)
  stage, block, rest = re.match(r'^conv(\d+)_block(\d+)_(\w+)$',
                                layer).groups()
  return (1, int(stage), int(block), _BLOCK_ORDER.index(rest))


@functools.lru_cache(maxsize=32)
def _entries_for_spec(spec) -> tuple[SourceEntry, ...]:
  """Legacy names (`layer/variable`), in model.layers and variable order."""
  _check_keras_like(spec)
  entries = []
  for entry in key_map(spec):
    if entry.kind == 'counter':
      continue
    layer, kind = _keras_layer(entry.path[:-1], spec)
    variable = _LEAVES[kind][entry.path[-1]]
    entries.append(SourceEntry(f'{layer}/{variable}', entry.collection,
                               entry.path, 'copy', entry.shape, entry.dtype))
  return tuple(sorted(entries, key=lambda e: (
      _layer_rank(e.name.split('/')[0]),
      _VARIABLE_ORDER[e.name.split('/')[1]])))


def keras_key_map(model: ModelLike, keras3: bool = False,
                  **overrides: Any) -> tuple[SourceEntry, ...]:
  """Every tensor of `model` under its Keras name, in model.layers order.

  keras3=True gives the `.weights.h5` paths (`layers/conv2d_3/vars/1`).
  """
  spec = resolve_model(model, **overrides).spec
  entries = _entries_for_spec(spec)
  if not keras3:
    return entries
  counters: dict[str, int] = collections.defaultdict(int)
  numbered: dict[str, str] = {}
  out = []
  for entry in entries:
    layer, variable = entry.name.split('/')
    if layer not in numbered:
      kind = ('dense' if layer == 'predictions' else
              'bn' if layer.endswith('_bn') else 'conv')
      cls = _CLASS[kind]
      count = counters[cls]
      numbered[layer] = cls if count == 0 else f'{cls}_{count}'
      counters[cls] += 1
    out.append(dataclasses.replace(
        entry, name=f'layers/{numbered[layer]}/vars/'
        f'{_VARIABLE_ORDER[variable]}'))
  return tuple(out)


def _read_hdf5(handle, path) -> dict[str, np.ndarray]:
  import h5py
  try:
    f = h5py.File(handle, 'r')
  except OSError as e:
    raise ValueError(f'{path} is not a readable HDF5 file ({e}).') from e
  with f:
    if 'layers' in f and isinstance(f['layers'], h5py.Group):
      out = {}

      def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
          out[f'layers/{name}'] = obj[()]
      f['layers'].visititems(visit)
      return out
    root = f['model_weights'] if 'model_weights' in f else f
    if 'layer_names' not in root.attrs:
      raise ValueError(f'{path} is HDF5 but holds no Keras weights (no '
                       '"layers" group and no layer_names attribute).')
    out = {}
    for layer in root.attrs['layer_names']:
      layer = layer.decode() if isinstance(layer, bytes) else str(layer)
      group = root[layer]
      for weight in group.attrs.get('weight_names', []):
        weight = weight.decode() if isinstance(weight, bytes) else str(weight)
        name = re.sub(r':\d+$', '', weight)
        if '/' in name:
          name = f'{layer}/{name.split("/")[-1]}'
        out[name] = group[weight][()]
    return out


def read_h5(source: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """{name: array} of a Keras `.weights.h5`, legacy `.h5` or `.keras` file."""
  path = files.existing_file(source, 'Keras weights file')
  if files.sniff(path) == 'keras-zip':
    with zipfile.ZipFile(path) as archive:
      return _read_hdf5(io.BytesIO(archive.read('model.weights.h5')), path)
  return _read_hdf5(str(path), path)


def keras_to_flax(source: Union[Mapping[str, Any], str, os.PathLike],
                  model: ModelLike, *, strict: bool = True,
                  skip_head: bool = False, base=None, rng=None,
                  **overrides: Any) -> dict[str, Any]:
  """Flax variables from a Keras weights file (or its {name: array}).

  `model` must be a Keras-exact preset such as 'keras_resnet50' or
  'keras_resnet50_v2' for the file to fit.
  """
  model = resolve_model(model, **overrides)
  arrays = (read_h5(source) if isinstance(source, (str, os.PathLike))
            else dict(source))
  keras3 = any(k.startswith('layers/') for k in arrays)
  if keras3:
    # Parameter-free layers (activations, paddings, pools) have empty groups.
    arrays = {k: v for k, v in arrays.items() if '/vars/' in k}
  entries = keras_key_map(model, keras3=keras3)
  head = [e.name for e in entries if e.path[0] == 'fc']
  return assemble(arrays, entries, model, strict=strict, skip_head=skip_head,
                  base=base, rng=rng, head_weight=head[0] if head else '')


def flax_to_keras(variables: Mapping[str, Any], model: ModelLike,
                  **overrides: Any) -> dict[str, list[np.ndarray]]:
  """{Keras layer name: weights} for `keras_model.get_layer(name).set_weights`.

      for name, weights in flax_to_keras(variables, 'keras_resnet50').items():
        keras_model.get_layer(name).set_weights(weights)
  """
  model = resolve_model(model, **overrides)
  arrays = variables_to_arrays(variables, keras_key_map(model), model)
  out: dict[str, list[np.ndarray]] = {}
  for name, array in arrays.items():
    out.setdefault(name.split('/')[0], []).append(array)
  return out

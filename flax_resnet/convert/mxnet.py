"""MXNet Gluon model-zoo `.params` files <-> Flax variables, without MXNet.

The file is MXNet's NDArray list, read and written here with numpy. In
little-endian:

    u64 0x112, u64 0, u64 count
    count x array:  u32 magic 0xF993FAC9 (V2; 0xF993FACA V3 reads the same,
                    0xF993FAC8 V1 has no storage type), i32 storage type
                    (0 dense), i32 ndim + i64 dims, i32 device type + i32
                    device id, i32 dtype flag, raw C-order data
    u64 count, then count x (u64 length + name bytes)

`save_parameters` writes structural names (`features.4.0.body.0.weight`);
older model-zoo files and `collect_params().save` write prefixed names
(`resnetv10_stage1_conv0_weight`, with or without the `resnetv10_` prefix),
numbered per layer type in the order Gluon created the layers. Both load.
Gluon's weights are laid out as torch's: conv (out, in, kh, kw), Dense
(out, in).

Gluon V2 starts with BatchNorm(scale=False, center=False): MXNet holds its
gamma at 1 (fix_gamma) and its beta at 0 (not trainable), so only its
running statistics are loaded (our `input_bn`); a beta other than 0 is
refused rather than dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
import struct
from typing import Any, Mapping, Optional, Union

import numpy as np

from flax_resnet.convert import files
from flax_resnet.convert.assemble import assemble, variables_to_arrays
from flax_resnet.convert.keymap import (ModelLike, SourceEntry,
                                        StateDictMismatch, key_map,
                                        resolve_model)

_LIST_MAGIC = 0x112
_V1, _V2, _V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8,
           4: np.int32, 5: np.int8, 6: np.int64}
_FLAGS = {np.dtype(v): k for k, v in _DTYPES.items()}


class _Reader:

  def __init__(self, data: bytes, path):
    self.data, self.offset, self.path = data, 0, path

  def take(self, fmt: str):
    size = struct.calcsize(fmt)
    if self.offset + size > len(self.data):
      raise ValueError(f'{self.path} ends early (at byte {self.offset:,} of '
                       f'{len(self.data):,}): the .params file is truncated.')
    values = struct.unpack_from(fmt, self.data, self.offset)
    self.offset += size
    return values

  def raw(self, size: int) -> bytes:
    if self.offset + size > len(self.data):
      raise ValueError(f'{self.path} ends early: an array needs {size:,} '
                       'bytes more than the file has; it is truncated.')
    chunk = self.data[self.offset:self.offset + size]
    self.offset += size
    return chunk


def _read_array(reader: _Reader, index: int) -> Optional[np.ndarray]:
  magic, = reader.take('<I')
  if magic not in (_V1, _V2, _V3):
    raise ValueError(f'{reader.path}: array {index} starts with 0x{magic:08X}, '
                     'not an NDArray magic; the file is damaged or not an '
                     'MXNet .params file.')
  if magic != _V1:
    storage, = reader.take('<i')
    if storage != 0:
      raise ValueError(f'{reader.path}: array {index} is sparse (storage type '
                       f'{storage}); ResNet weights are dense.')
  if magic == _V1:
    ndim, = reader.take('<I')
  else:
    ndim, = reader.take('<i')
  if ndim < 0 or (ndim == 0 and magic != _V3):
    return None  # MXNet's "none" array
  shape = reader.take(f'<{ndim}q') if ndim else ()
  reader.take('<ii')  # device type and id: irrelevant once on disk
  flag, = reader.take('<i')
  if flag not in _DTYPES:
    raise ValueError(f'{reader.path}: array {index} has MXNet dtype flag '
                     f'{flag}, which this reader does not know.')
  dtype = np.dtype(_DTYPES[flag]).newbyteorder('<')
  count = int(np.prod(shape)) if shape else 1
  data = reader.raw(count * dtype.itemsize)
  return np.frombuffer(data, dtype).astype(dtype.newbyteorder('='))\
      .reshape(shape)


def read_params(source: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """{name: array} of an MXNet `.params` / NDArray-list file."""
  path = files.existing_file(source, 'MXNet .params file')
  reader = _Reader(path.read_bytes(), path)
  magic, reserved = reader.take('<QQ')
  if magic != _LIST_MAGIC or reserved != 0:
    raise ValueError(f'{path} is not an MXNet NDArray list (it does not '
                     'start with 0x112, 0).')
  count, = reader.take('<Q')
  arrays = [_read_array(reader, i) for i in range(count)]
  names_count, = reader.take('<Q')
  if names_count != count:
    raise ValueError(f'{path} holds {count} arrays but {names_count} names; '
                     'only named arrays (save_parameters) can be loaded.')
  names = []
  for _ in range(names_count):
    length, = reader.take('<Q')
    names.append(reader.raw(length).decode('utf-8'))
  out = {}
  for name, array in zip(names, arrays):
    # Symbolic checkpoints (save_checkpoint) prefix arg: / aux:.
    out[re.sub(r'^(arg|aux):', '', name)] = array
  return out


def write_params(arrays: Mapping[str, np.ndarray],
                 path: Union[str, os.PathLike]) -> None:
  """Writes {name: array} as MXNet's NDArray list (V2 arrays, on cpu(0))."""
  chunks = [struct.pack('<QQQ', _LIST_MAGIC, 0, len(arrays))]
  for name, array in arrays.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in _FLAGS:
      raise ValueError(f'{name}: dtype {array.dtype} has no MXNet flag.')
    chunks.append(struct.pack('<Iii', _V2, 0, array.ndim))
    chunks.append(struct.pack(f'<{array.ndim}q', *array.shape))
    chunks.append(struct.pack('<iii', 1, 0, _FLAGS[array.dtype]))
    chunks.append(array.astype(array.dtype.newbyteorder('<')).tobytes())
  chunks.append(struct.pack('<Q', len(arrays)))
  for name in arrays:
    encoded = name.encode('utf-8')
    chunks.append(struct.pack('<Q', len(encoded)) + encoded)
  with open(path, 'wb') as f:
    f.write(b''.join(chunks))


# ----------------------------------------------------------------- names

_BN_LEAVES = {'weight': 'gamma', 'bias': 'beta', 'running_mean':
              'running_mean', 'running_var': 'running_var'}
_PREFIXED = re.compile(r'^(resnetv[12]\d*_)?(stage\d+_)?(conv|batchnorm|dense)'
                       r'\d+_(weight|bias|gamma|beta|running_mean|running_var)$')


def matches(keys) -> bool:
  """Whether these are Gluon names (structural or prefixed)."""
  keys = list(keys)
  return bool(keys) and all(
      k.startswith(('features.', 'output.')) or _PREFIXED.match(k)
      for k in keys)


def _check_gluon_like(spec) -> None:
  if (spec.stem != 'imagenet' or spec.shortcut != 'B' or
      spec.stride_block != 'first' or spec.groups != 1):
    raise ValueError(
        'the Gluon model zoo has no ResNet with this layout (stem '
        f'{spec.stem!r}, shortcut {spec.shortcut!r}, groups {spec.groups}); '
        'use a gluon_resnet*_v1 / _v2 preset.')


def _gluon_layer(path: tuple[str, ...], spec) -> str:
  """Gluon's structural name of the layer at our module path."""
  stem_layers = 4 + int(spec.input_norm)  # [data BN,] conv, BN, ReLU, pool
  first = path[0]
  if first == 'stem':
    order = (['input_bn'] if spec.input_norm else []) + ['conv1', 'bn1']
    return f'features.{order.index(path[1])}'
  if first == 'final_bn':
    return f'features.{stem_layers + len(spec.depths)}'
  if first == 'fc':
    return 'output'
  stage, block = re.match(r'^stage(\d+)_block(\d+)$', first).groups()
  prefix = f'features.{stem_layers + int(stage) - 1}.{block}'
  part = path[1]
  if part == 'shortcut':
    if spec.preact:
      return f'{prefix}.downsample'
    return f'{prefix}.downsample.{0 if path[2] == "conv" else 1}'
  if spec.preact:
    return f'{prefix}.{part}'
  kind, number = re.match(r'^(conv|bn)(\d)$', part).groups()
  # body: conv, BN, ReLU per conv; the last conv's BN ends it.
  return f'{prefix}.body.{3 * (int(number) - 1) + (kind == "bn")}'


@functools.lru_cache(maxsize=32)
def _entries_for_spec(spec) -> tuple[SourceEntry, ...]:
  _check_gluon_like(spec)
  entries = []
  for entry in key_map(spec):
    if entry.kind == 'counter':
      continue
    module_path, leaf = entry.path[:-1], entry.torch_name.rsplit('.', 1)[1]
    layer = _gluon_layer(module_path, spec)
    if leaf in _BN_LEAVES and entry.kind == 'copy' and (
        entry.collection == 'batch_stats' or 'bn' in module_path[-1]):
      leaf = _BN_LEAVES[leaf]
    entries.append(SourceEntry(f'{layer}.{leaf}', entry.collection,
                               entry.path, entry.kind, entry.shape,
                               entry.dtype))
    if module_path == ('stem', 'input_bn') and leaf == 'running_var':
      # gamma and beta of the data BN: stored by Gluon, fixed at 1 and 0.
      for fixed in ('gamma', 'beta'):
        entries.append(SourceEntry(f'{layer}.{fixed}', '', module_path +
                                   (fixed,), 'ignored', entry.shape,
                                   entry.dtype))
  return tuple(_gluon_order(entries, spec))


def _gluon_order(entries, spec):
  """Gluon's registration order (what collect_params() lists)."""
  order = {'gamma': 0, 'beta': 1, 'running_mean': 2, 'running_var': 3,
           'weight': 0, 'bias': 1}

  def key(entry):
    layer, leaf = entry.name.rsplit('.', 1)
    parts = layer.split('.')
    numbers = []
    for part in parts[1:]:
      if part.isdigit():
        numbers.append((0, int(part)))
      else:
        # V2 blocks register bn1, conv1, bn2, conv2, ..., then downsample.
        match = re.match(r'^(bn|conv)(\d)$', part)
        numbers.append((1, (int(match.group(2)), match.group(1) == 'conv'))
                       if match else (2, ('body', 'downsample').index(part)))
    return (parts[0] == 'output', numbers, order[leaf])

  return sorted(entries, key=key)


def _prefixed_names(entries, spec) -> dict[str, str]:
  """Structural name -> prefixed name, as Gluon numbers its layers."""
  counters: dict[tuple[str, str], int] = collections.defaultdict(int)
  assigned: dict[str, str] = {}
  out = {}
  for entry in entries:
    layer, leaf = entry.name.rsplit('.', 1)
    if layer not in assigned:
      match = re.match(r'^features\.(\d+)\.\d+\.', layer)
      stem_layers = 4 + int(spec.input_norm)
      scope = (f'stage{int(match.group(1)) - stem_layers + 1}_'
               if match else '')
      kind = ('dense' if layer == 'output' else
              'batchnorm' if leaf in ('gamma', 'beta', 'running_mean',
                                      'running_var') else 'conv')
      assigned[layer] = f'{scope}{kind}{counters[(scope, kind)]}'
      counters[(scope, kind)] += 1
    out[entry.name] = f'{assigned[layer]}_{leaf}'
  return out


def gluon_key_map(model: ModelLike, prefixed: bool = False,
                  **overrides: Any) -> tuple[SourceEntry, ...]:
  """Every tensor of `model` under its Gluon name, in Gluon's order.

  prefixed=True gives the names old model-zoo files use
  (`stage1_conv0_weight`; files may add `resnetv10_` before them).
  """
  spec = resolve_model(model, **overrides).spec
  entries = _entries_for_spec(spec)
  if not prefixed:
    return entries
  names = _prefixed_names(entries, spec)
  return tuple(dataclasses.replace(e, name=names[e.name]) for e in entries)


def _strip_net_prefix(arrays: Mapping[str, Any]) -> dict[str, Any]:
  return {re.sub(r'^resnetv[12]\d*_', '', k): v for k, v in arrays.items()}


def gluon_to_flax(source: Union[Mapping[str, Any], str, os.PathLike],
                  model: ModelLike, *, strict: bool = True,
                  skip_head: bool = False, base=None, rng=None,
                  **overrides: Any) -> dict[str, Any]:
  """Flax variables from a Gluon `.params` file (or its {name: array}).

  Args: as `torch_to_flax`; `model` must be a Gluon-exact preset such as
  'gluon_resnet50_v1' for the file to fit.
  """
  model = resolve_model(model, **overrides)
  arrays = (read_params(source) if isinstance(source, (str, os.PathLike))
            else {k: np.asarray(v) if v is not None else None
                  for k, v in source.items()})
  prefixed = not any(k.startswith(('features.', 'output.')) for k in arrays)
  if prefixed:
    arrays = _strip_net_prefix(arrays)
  entries = gluon_key_map(model, prefixed=prefixed)
  data_bn = [e.name for e in entries if e.kind == 'ignored'
             and e.path[-1] == 'beta']
  for name in data_bn:
    if name in arrays and arrays[name] is not None and np.any(
        np.asarray(arrays[name]) != 0):
      raise StateDictMismatch(
          f'{name} (beta of the data BatchNorm) is not zero: Gluon builds it '
          'with center=False, so a nonzero shift means the file comes from '
          'another network; this model has no place for it.')
  head = [e.name for e in entries if e.path[0] == 'fc']
  return assemble(arrays, entries, model, strict=strict, skip_head=skip_head,
                  base=base, rng=rng, head_weight=head[0] if head else '')


def flax_to_gluon(variables: Mapping[str, Any], model: ModelLike,
                  prefixed: bool = False, **overrides: Any
                  ) -> collections.OrderedDict[str, np.ndarray]:
  """Gluon-named arrays, in Gluon's order, for `save_gluon` / MXNet."""
  model = resolve_model(model, **overrides)
  entries = gluon_key_map(model, prefixed=prefixed)
  arrays = variables_to_arrays(variables, entries, model)
  out = collections.OrderedDict()
  for entry in entries:
    if entry.kind == 'ignored':
      fill = np.ones if entry.path[-1] == 'gamma' else np.zeros
      out[entry.name] = fill(entry.shape, np.float32)
    else:
      out[entry.name] = arrays[entry.name]
  return out


def save_gluon(variables: Mapping[str, Any], model: ModelLike,
               path: Union[str, os.PathLike], **overrides: Any) -> None:
  """Writes a `.params` file that Gluon's `net.load_parameters` reads."""
  write_params(flax_to_gluon(variables, model, **overrides), path)

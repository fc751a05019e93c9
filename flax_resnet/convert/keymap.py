"""The shared name map: every Flax variable of a model and its torch name.

The map is never typed per model: `key_map` traces the target model
abstractly (`flax_resnet.layout.trace`, i.e. `jax.eval_shape(model.init)` with
a method interceptor), walks every variable it creates, and turns each module
path into the torchvision name of the same layer:

    stem/conv1, stem/bn1                 -> conv1, bn1
    stem/conv1_1 .. conv1_3 (deep stem)  -> conv1.0, conv1.1, conv1.3, conv1.4,
                                            conv1.6 (timm's Sequential, whose
                                            ReLUs take slots 2 and 5), bn1
    stage{s}_block{b}/conv1 .. bn3       -> layer{s}.{b}.conv1 .. bn3
    stage{s}_block{b}/shortcut/conv, bn  -> layer{s}.{b}.downsample.0, .1
      (shortcut 'D': avg-pool first)     -> layer{s}.{b}.downsample.1, .2
    fc                                   -> fc

The other formats (mxnet.py, keras.py) rename these entries; assemble.py
turns any list of named entries plus arrays into Flax variables.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any

import numpy as np

ModelLike = Any  # a ResNet module, a ResNetSpec or a preset name

_BLOCK = re.compile(r'^stage(\d+)_block(\d+)$')
_DEEP_STEM_PART = re.compile(r'^(conv|bn)1_\d+$')
# Any input size works: only parameter shapes are read from the trace.
_TRACE_SIZE = 64


class StateDictMismatch(ValueError):
  """The state_dict does not fit the model.

  Attributes:
    missing: torch names the model needs but the state_dict lacks.
    unexpected: state_dict names the model has no place for.
    mismatched: (name, shape in the state_dict, shape the model needs).
    head_only: only the classifier's shapes differ (another class count), in
      any format's names; skip_head=True then loads the rest.
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=(),
               head_only: bool = False):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    self.head_only = head_only


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch tensor and the Flax variable it becomes.

  Attributes:
    torch_name: e.g. 'layer1.0.downsample.0.weight'.
    collection: 'params' or 'batch_stats'; '' for num_batches_tracked, which
      has no Flax counterpart.
    path: the variable's path inside the collection, e.g.
      ('stage1_block0', 'shortcut', 'conv', 'kernel').
    kind: 'conv' (transpose 2,3,1,0), 'dense' (transpose), 'copy' or
      'counter' (num_batches_tracked).
    shape: the Flax shape. dtype: the Flax dtype.
  """
  torch_name: str
  collection: str
  path: tuple[str, ...]
  kind: str
  shape: tuple[int, ...]
  dtype: Any

  @property
  def name(self) -> str:
    return self.torch_name

  @property
  def source_shape(self) -> tuple[int, ...]:
    return self.torch_shape

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.kind == 'conv':
      kh, kw, cin, cout = self.shape
      return (cout, cin, kh, kw)
    if self.kind == 'dense':
      return tuple(reversed(self.shape))
    return self.shape

  def to_flax(self, array: np.ndarray) -> np.ndarray:
    if self.kind == 'conv':
      array = array.transpose(2, 3, 1, 0)
    elif self.kind == 'dense':
      array = array.T
    return np.asarray(array, dtype=self.dtype)

  def to_torch(self, array) -> np.ndarray:
    array = np.asarray(array)
    if self.kind == 'conv':
      array = array.transpose(3, 2, 0, 1)
    elif self.kind == 'dense':
      array = array.T
    # A writable C-order copy: torch.from_numpy warns on read-only jax views.
    return np.array(array, order='C')


@dataclasses.dataclass(frozen=True)
class SourceEntry:
  """One tensor of another format (Gluon, Keras) and its Flax variable.

  kind: 'conv' (OIHW, as torch), 'dense' ((out, in), as torch), 'copy' or
  'ignored' (a tensor of the format that the network does not use, e.g. the
  held-at-1 gamma of Gluon's data BatchNorm; it is read but not loaded).
  """
  name: str
  collection: str
  path: tuple[str, ...]
  kind: str
  shape: tuple[int, ...]
  dtype: Any

  source_shape = Entry.torch_shape
  to_flax = Entry.to_flax
  to_torch = Entry.to_torch  # Flax -> the format's layout, same as torch's


# ---------------------------------------------------------------- the name map


def resolve_model(model: ModelLike, **overrides: Any):
  """A ResNet module from a module, a ResNetSpec or a preset name."""
  from flax_resnet.model import ResNet
  from flax_resnet.spec import ResNetSpec
  from flax_resnet.zoo import create_model

  if isinstance(model, str):
    return create_model(model, **overrides)
  if isinstance(model, ResNet):
    return ResNet(model.spec.replace(**overrides).validate()) if overrides \
        else model
  if isinstance(model, ResNetSpec):
    return ResNet(model.replace(**overrides).validate())
  raise ValueError(
      f'model={model!r} must be a preset name (see flax_resnet.list_models()), '
      'a ResNetSpec or a flax_resnet.ResNet module.')


def _module_names(calls) -> dict[tuple[str, ...], str]:
  """Torch module name of every traced Flax module path that holds variables.

  Sequential indices come from what the trace saw: the deep stem's position
  counts a ReLU slot after each BN (timm's conv1 = Sequential(conv, bn, relu,
  conv, bn, relu, conv)); a shortcut's conv sits behind an avg-pool slot when
  its mode pools (timm keeps that slot as nn.Identity even at stride 1).
  """
  import flax.linen as nn

  from flax_resnet import layers
  from flax_resnet.model import Stem

  modules = {c.path: c.module for c in calls}
  names: dict[tuple[str, ...], str] = {}
  stem_slot = 0
  shortcut_slots: dict[tuple[str, ...], int] = {}
  for path, module in modules.items():
    if not path or not isinstance(module, (nn.Conv, nn.BatchNorm, nn.Dense)):
      continue
    parts = []
    for depth, part in enumerate(path):
      parent = modules.get(path[:depth])
      block = _BLOCK.match(part) if depth == 0 else None
      if block:
        parts.append(f'layer{block.group(1)}.{block.group(2)}')
      elif depth == 0 and isinstance(modules.get(path[:1]), Stem):
        continue  # torchvision's stem layers live at the top level
      elif isinstance(parent, Stem) and _DEEP_STEM_PART.match(part):
        parts.append(f'conv1.{stem_slot}')
        stem_slot += 2 if isinstance(module, nn.BatchNorm) else 1
      elif isinstance(modules.get(path[:depth + 1]), layers.Shortcut):
        parts.append('downsample')
      elif isinstance(parent, layers.Shortcut):
        owner = path[:depth]
        if owner not in shortcut_slots:
          shortcut_slots[owner] = 1 if parent.mode == 'avgpool_conv' else 0
        parts.append(str(shortcut_slots[owner]))
        shortcut_slots[owner] += 1
      else:
        parts.append(part)
    names[path] = '.'.join(parts)
  return names


def _torch_order(path: tuple[str, ...]) -> tuple:
  """Sort key giving torchvision's registration order.

  Our block calls its shortcut before conv1 (the residual is computed first),
  while torchvision registers `downsample` after the main path.
  """
  return tuple((1 if part == 'shortcut' else 0) for part in path)


def _trace_shape(spec) -> tuple[int, int, int, int]:
  size = 32 if spec.stem == 'cifar' else _TRACE_SIZE
  return (1, size, size, 3)


@functools.lru_cache(maxsize=32)
def _trace(spec):
  """(module calls in call order, abstract variables) of ResNet(spec)."""
  from flax_resnet import layout
  from flax_resnet.model import ResNet

  return layout.trace(ResNet(spec), _trace_shape(spec))


@functools.lru_cache(maxsize=32)
def _key_map_for_spec(spec) -> tuple[Entry, ...]:
  import flax.linen as nn
  import jax

  calls, variables = _trace(spec)
  modules = {c.path: c.module for c in calls}
  call_order = {c.path: i for i, c in enumerate(calls)}
  names = _module_names(calls)

  per_module: dict[tuple[str, ...], list[Entry]] = collections.defaultdict(list)
  leaf_names = {
      ('params', nn.Conv, 'kernel'): ('weight', 'conv'),
      ('params', nn.Conv, 'bias'): ('bias', 'copy'),
      ('params', nn.Dense, 'kernel'): ('weight', 'dense'),
      ('params', nn.Dense, 'bias'): ('bias', 'copy'),
      ('params', nn.BatchNorm, 'scale'): ('weight', 'copy'),
      ('params', nn.BatchNorm, 'bias'): ('bias', 'copy'),
      # torch's running_var is an unbiased (n / (n - 1)) estimate and Flax's a
      # biased one, but that only changes how training *updates* it. At eval
      # time both compute (x - mean) / sqrt(var + eps) from the stored value,
      # so it is copied unchanged and eval outputs agree exactly.
      ('batch_stats', nn.BatchNorm, 'mean'): ('running_mean', 'copy'),
      ('batch_stats', nn.BatchNorm, 'var'): ('running_var', 'copy'),
  }
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))
    for key_path, leaf in flat[0]:
      path = tuple(k.key for k in key_path)
      module_path, leaf_name = path[:-1], path[-1]
      module = modules.get(module_path)
      kind = next((v for (c, t, n), v in leaf_names.items()
                   if c == collection and n == leaf_name and
                   isinstance(module, t)), None)
      if kind is None:
        raise NotImplementedError(
            f'no torch name for {collection}/{"/".join(path)} (a '
            f'{type(module).__name__}); extend convert.key_map.')
      torch_leaf, transform = kind
      per_module[module_path].append(Entry(
          f'{names[module_path]}.{torch_leaf}', collection, path, transform,
          tuple(leaf.shape), np.dtype(leaf.dtype)))

  order = {'weight': 0, 'bias': 1, 'running_mean': 2, 'running_var': 3}
  entries = []
  for module_path in sorted(per_module, key=lambda p: (
      call_order[p[:1]], _torch_order(p), call_order[p])):
    group = sorted(per_module[module_path],
                   key=lambda e: order[e.torch_name.rsplit('.', 1)[1]])
    entries.extend(group)
    if isinstance(modules[module_path], nn.BatchNorm):
      entries.append(Entry(f'{names[module_path]}.num_batches_tracked', '',
                           module_path + ('num_batches_tracked',), 'counter',
                           (), np.dtype(np.int64)))
  return tuple(entries)


def key_map(model: ModelLike, **overrides: Any) -> tuple[Entry, ...]:
  """Every torch tensor of `model`, in torchvision's state_dict order."""
  return _key_map_for_spec(resolve_model(model, **overrides).spec)


def torch_names(model: ModelLike, **overrides: Any) -> list[str]:
  """The state_dict keys a torchvision build of `model` has, in order."""
  return [e.torch_name for e in key_map(model, **overrides)]

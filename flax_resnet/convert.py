"""PyTorch (torchvision / timm) state_dicts <-> Flax ResNet variables.

The name map is never typed per model: `key_map` traces the target model
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

Conventions:
  * conv weight (out, in/groups, kh, kw) <-> kernel (kh, kw, in/groups, out).
  * Linear weight (out, in) <-> Dense kernel (in, out).
  * BatchNorm weight/bias <-> scale/bias; running_mean/running_var <->
    batch_stats mean/var. `num_batches_tracked` is ignored on the way in and
    written as int64 0 on the way out (torchvision state_dicts carry it, so
    `load_state_dict(strict=True)` needs it; it only matters for momentum=None).
  * BN momentum: torch's momentum=0.1 updates running = 0.9 * running +
    0.1 * batch, which is Flax's momentum=0.9 (our `bn_momentum`, the default).

    variables = torch_to_flax('resnet50.pth', 'resnet50')
    logits = create_model('resnet50').apply(variables, images, train=False)
    state_dict = flax_to_torch(variables, 'resnet50')  # OrderedDict of numpy

CLI: python -m flax_resnet.convert resnet50 IN.pth OUT_DIR [--skip-head] [k=v]
writes an orbax StandardCheckpointer checkpoint of the variables.

At import this module needs only numpy: the model stack, torch and
safetensors are imported inside the functions that use them, and torch only
when a `.pth` file or a torch tensor is involved.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import pathlib
import re
import sys
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

ModelLike = Any  # a ResNet module, a ResNetSpec, or a preset name
StateDictLike = Union[Mapping[str, Any], str, os.PathLike]

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
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


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


# ------------------------------------------------------------ reading tensors


def _to_numpy(value: Any) -> np.ndarray:
  if type(value).__module__.startswith('torch'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      # numpy has no bfloat16; reinterpret the bits so nothing is rounded.
      import ml_dtypes
      return value.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'reading or writing .pth files needs PyTorch: pip install '
        'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu') from e
  return torch


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  """The state_dict inside a checkpoint that nests it under a key."""
  for key in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      return obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(
        f'{source} holds a {type(obj).__name__}, not a state_dict; save '
        'model.state_dict() rather than the model object.')
  return obj


def load_state_dict(source: StateDictLike) -> dict[str, np.ndarray]:
  """A state_dict as {name: numpy array}.

  Args:
    source: a mapping of names to torch tensors / numpy / jax arrays, or the
      path of a `.pth`/`.pt`/`.bin` file (torch.load with weights_only=True; a
      checkpoint that nests the weights under 'state_dict' or 'model' is
      unwrapped) or of a `.safetensors` file. A 'module.' prefix left by
      DataParallel / DDP is stripped.
  """
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    if not path.is_file():
      raise ValueError(f'state_dict file {path} does not exist.')
    if path.suffix == '.safetensors':
      import safetensors.numpy
      try:
        raw = safetensors.numpy.load_file(str(path))
      except (TypeError, ValueError):  # bfloat16 has no numpy reader
        import safetensors.torch
        raw = safetensors.torch.load_file(str(path))
    else:
      raw = _unwrap(_torch().load(path, map_location='cpu', weights_only=True),
                    str(path))
  elif isinstance(source, Mapping):
    raw = _unwrap(source, 'the state_dict')
  else:
    raise ValueError(
        f'state_dict must be a mapping or a file path, got '
        f'{type(source).__name__}.')
  arrays = {str(k): _to_numpy(v) for k, v in raw.items()}
  if arrays and all(k.startswith('module.') for k in arrays):
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  return arrays


_HF_BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var',
                 'num_batches_tracked')
_HF_PATTERNS = (
    (re.compile(r'^embedder\.embedder\.convolution\.(weight)$'), 'conv1.{0}'),
    (re.compile(r'^embedder\.embedder\.normalization\.(\w+)$'), 'bn1.{0}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.'
                r'convolution\.(weight)$'), 'layer{0+}.{1}.downsample.0.{2}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.'
                r'normalization\.(\w+)$'), 'layer{0+}.{1}.downsample.1.{2}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.'
                r'convolution\.(weight)$'), 'layer{0+}.{1}.conv{2+}.{3}'),
    (re.compile(r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.'
                r'normalization\.(\w+)$'), 'layer{0+}.{1}.bn{2+}.{3}'),
    (re.compile(r'^classifier\.1\.(weight|bias)$'), 'fc.{0}'),
)


def _hf_name(key: str) -> Optional[str]:
  name = key[len('resnet.'):] if key.startswith('resnet.') else key
  for pattern, template in _HF_PATTERNS:
    match = pattern.match(name)
    if match:
      groups = match.groups()
      if '.normalization.' in name and groups[-1] not in _HF_BN_LEAVES:
        return None
      # '{i+}': HF counts stages and convs from 0, torchvision from 1.
      return re.sub(
          r'\{(\d)(\+?)\}',
          lambda m: str(int(groups[int(m.group(1))]) + 1) if m.group(2)
          else groups[int(m.group(1))], template)
  return None


def hf_to_torchvision_keys(state_dict: StateDictLike) -> dict[str, np.ndarray]:
  """Renames a Hugging Face `transformers` ResNet state_dict to torchvision's.

  Covers ResNetForImageClassification ('resnet.' prefix, 'classifier.1') and
  ResNetModel. HF's `downsample_in_bottleneck=True` puts the stride on the
  first 1x1 (our `stride_in='1x1'`, e.g. 'resnet50_v1'); the default is v1.5.
  """
  arrays = load_state_dict(state_dict)
  renamed, unknown = {}, []
  for key, value in arrays.items():
    name = _hf_name(key)
    if name is None:
      unknown.append(key)
    else:
      renamed[name] = value
  if unknown:
    raise StateDictMismatch(
        f'{len(unknown)} key(s) are not Hugging Face ResNet names: '
        f'{", ".join(unknown)}. Only ResNetModel / ResNetForImageClassification '
        'state_dicts can be renamed.', unexpected=unknown)
  return renamed


# ------------------------------------------------------------------- checking


def _architecture_hint(keys: Sequence[str], model) -> str:
  """Guesses the block type and depths the state_dict was saved from."""
  from flax_resnet.zoo import PRESETS

  depths: dict[int, int] = {}
  for key in keys:
    match = re.match(r'^layer(\d+)\.(\d+)\.', key)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      depths[stage] = max(depths.get(stage, 0), block + 1)
  if not depths:
    return ''
  found = tuple(depths[s] for s in sorted(depths))
  block = 'bottleneck' if any('.conv3.' in k for k in keys) else 'basic'
  deep = any(k.startswith('conv1.0.') for k in keys)
  spec = model.spec
  if (found, block, deep) == (tuple(spec.depths), spec.block,
                              spec.stem == 'deep'):
    return ''
  candidates = sorted(
      name for name, s in PRESETS.items()
      if tuple(s.depths) == found and s.block == block and
      (s.stem == 'deep') == deep and not s.preact)
  stem = ', deep stem' if deep else ''
  return (f'The state_dict looks like {block} blocks with depths {found}'
          f'{stem}, but the model has {spec.block} blocks with depths '
          f'{tuple(spec.depths)}{", deep stem" if spec.stem == "deep" else ""}'
          + (f'; presets that match the state_dict: {", ".join(candidates)}.'
             if candidates else '.'))


def _mismatch_message(model, missing, unexpected, mismatched,
                      keys: Sequence[str]) -> str:
  lines = []
  if missing:
    lines.append(f'{len(missing)} missing key(s) (the model needs them, the '
                 'state_dict lacks them):')
    lines.extend(f'  {k}' for k in missing)
  if unexpected:
    lines.append(f'{len(unexpected)} unexpected key(s) (in the state_dict, '
                 'no place in the model):')
    lines.extend(f'  {k}' for k in unexpected)
  if mismatched:
    lines.append(f'{len(mismatched)} shape mismatch(es) (torch layout):')
    lines.extend(f'  {k}: got {tuple(got)}, expected {tuple(want)}'
                 for k, got, want in mismatched)
  fixes = []
  fc = {k: (got, want) for k, got, want in mismatched if k == 'fc.weight'}
  if 'fc.weight' in fc and fc['fc.weight'][0][0] != fc['fc.weight'][1][0]:
    got, want = fc['fc.weight']
    fixes.append(
        f'num_classes={want[0]} but the state_dict\'s fc has {got[0]} '
        f'outputs; pass num_classes={got[0]}, or skip_head=True to load '
        'everything but the classifier (a fresh head, for fine-tuning).')
  hint = _architecture_hint(keys, model)
  if hint:
    fixes.append(hint)
  if any(k.startswith(('resnet.', 'embedder.', 'encoder.')) for k in unexpected):
    fixes.append('These look like Hugging Face transformers names; rename them '
                 'first with flax_resnet.convert.hf_to_torchvision_keys.')
  if not fixes:
    fixes.append('Pick the preset and overrides (groups, width_per_group, '
                 'widths, stem_width, num_classes) the weights were saved '
                 'with.')
  if (missing or unexpected) and not mismatched:
    fixes.append('To load a partial match anyway, pass strict=False: '
                 'unexpected keys are ignored and missing ones keep their '
                 'initial values.')
  lines.append('Fix: ' + ' '.join(fixes))
  return '\n'.join(lines)


def _set(tree: dict, path: Sequence[str], value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
  for part in path:
    tree = tree[part]
  return tree


@functools.lru_cache(maxsize=8)
def _init_only_fn(spec, module_paths: frozenset):
  """jit(rng -> initial variables) creating only the layers at module_paths.

  A full `model.init` compiles every conv's random initialiser (tens of
  seconds for resnet18 on CPU). Here every other Conv / BatchNorm / Dense call
  is answered with zeros of the shape the trace recorded, so only the
  requested layers draw values. Linen derives each module's key from its
  path, so they get the values a jitted full `model.init(rng)` gives them.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flax_resnet.model import ResNet

  calls, _ = _trace(spec)
  out_shapes = {c.path: c.out_shape for c in calls}

  def only_wanted(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    if (context.method_name == '__call__' and path not in module_paths and
        isinstance(module, (nn.Conv, nn.BatchNorm, nn.Dense))):
      return jnp.zeros(out_shapes[path], module.dtype or args[0].dtype)
    return next_fun(*args, **kwargs)

  def init(rng):
    with nn.intercept_methods(only_wanted):
      return ResNet(spec).init(rng, jnp.zeros(_trace_shape(spec), jnp.float32),
                               train=False)

  return jax.jit(init)


# ---------------------------------------------------------------- conversions


def torch_to_flax(state_dict: StateDictLike, model: ModelLike, *,
                  strict: bool = True, skip_head: bool = False,
                  base: Optional[Mapping[str, Any]] = None, rng=None,
                  **overrides: Any) -> dict[str, Any]:
  """Converts a torchvision-named state_dict into Flax variables.

  Args:
    state_dict: see `load_state_dict` (mapping, .pth/.pt or .safetensors).
    model: a flax_resnet.ResNet, a ResNetSpec or a preset name such as
      'resnet50' / 'resnet50d' (timm names for the deep stem and avg-pool
      shortcut).
    strict: raise `StateDictMismatch` on missing or unexpected keys. Shape
      mismatches always raise. With strict=False unexpected keys are ignored
      and missing ones keep the values of `base` (with a warning).
    skip_head: do not load `fc.*` (any shape); the head comes from `base`.
      For fine-tuning on a new number of classes.
    base: variables supplying whatever is not loaded; by default those
      layers' values under `model.init(rng)` (rng defaults to
      jax.random.key(0)), computed only when needed and only for them.
    rng: see `base`.
    **overrides: ResNetSpec fields applied to `model`, e.g. num_classes=10.

  Returns:
    {'params': ..., 'batch_stats': ...} as jax arrays in the model's dtypes,
    ready for `model.apply(variables, x, train=False)`. BatchNorm momentum
    needs no conversion of values: torch momentum=0.1 is Flax 0.9.

  Raises:
    StateDictMismatch (a ValueError): listing every missing key, unexpected
      key and shape mismatch, with a suggested fix.
  """
  import jax.numpy as jnp

  model = resolve_model(model, **overrides)
  arrays = load_state_dict(state_dict)
  entries = [e for e in key_map(model) if e.kind != 'counter']
  head = {e.torch_name for e in entries if e.path[0] == 'fc'}
  if skip_head:
    entries = [e for e in entries if e.torch_name not in head]
    arrays = {k: v for k, v in arrays.items() if not k.startswith('fc.')}
  expected = {e.torch_name: e for e in entries}
  given = {k for k in arrays if not k.endswith('num_batches_tracked')}
  missing = [e.torch_name for e in entries if e.torch_name not in given]
  unexpected = sorted(given - set(expected))
  mismatched = [(k, arrays[k].shape, expected[k].torch_shape)
                for k in expected if k in given and
                tuple(arrays[k].shape) != expected[k].torch_shape]
  if mismatched or (strict and (missing or unexpected)):
    raise StateDictMismatch(
        _mismatch_message(model, missing, unexpected, mismatched,
                          sorted(given)),
        missing, unexpected, mismatched)

  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for entry in entries:
    if entry.torch_name in given:
      _set(variables[entry.collection], entry.path,
           jnp.asarray(entry.to_flax(arrays[entry.torch_name])))
  if missing:
    warnings.warn(f'strict=False: {len(missing)} key(s) not in the state_dict '
                  f'keep their initial values: {", ".join(missing)}',
                  stacklevel=2)
  if missing or skip_head:
    by_name = {e.torch_name: e for e in key_map(model)}
    fill = [by_name[k] for k in missing + (sorted(head) if skip_head else [])]
    if base is None:
      import jax
      init = _init_only_fn(model.spec, frozenset(e.path[:-1] for e in fill))
      base = init(jax.random.key(0) if rng is None else rng)
    for entry in fill:
      _set(variables[entry.collection], entry.path,
           _get(base[entry.collection], entry.path))
  if not variables['batch_stats']:
    del variables['batch_stats']
  return variables


def flax_to_torch(variables: Mapping[str, Any], model: ModelLike,
                  **overrides: Any) -> collections.OrderedDict[str, np.ndarray]:
  """Flax variables -> torchvision-named state_dict of numpy arrays.

  The order matches torchvision's `state_dict()`, and each BatchNorm gets a
  `num_batches_tracked` of int64 0, so `torch_model.load_state_dict(
  {k: torch.from_numpy(v) ...}, strict=True)` works. Use `save_torch` /
  `save_safetensors` to write a file.
  """
  model = resolve_model(model, **overrides)
  entries = key_map(model)
  out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
  missing, mismatched = [], []
  for entry in entries:
    if entry.kind == 'counter':
      out[entry.torch_name] = np.array(0, dtype=np.int64)
      continue
    try:
      value = _get(variables[entry.collection], entry.path)
    except (KeyError, TypeError):
      missing.append('/'.join((entry.collection,) + entry.path))
      continue
    if tuple(np.shape(value)) != entry.shape:
      mismatched.append(('/'.join((entry.collection,) + entry.path),
                         np.shape(value), entry.shape))
      continue
    out[entry.torch_name] = entry.to_torch(value)
  if missing or mismatched:
    spec = model.spec
    lines = [f'the variables do not fit the model ({spec.block} blocks, '
             f'depths {spec.depths}, num_classes={spec.num_classes}):']
    lines += [f'  missing {k}' for k in missing]
    lines += [f'  {k}: got {tuple(g)}, expected {tuple(w)}'
              for k, g, w in mismatched]
    lines.append('Fix: pass the model (preset and overrides) these variables '
                 'were created with.')
    raise StateDictMismatch('\n'.join(lines), missing, (), mismatched)
  return out


def _to_torch_tensor(array: np.ndarray):
  torch = _torch()
  if array.dtype.name == 'bfloat16':
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(array))


def save_torch(variables: Mapping[str, Any], model: ModelLike,
               path: Union[str, os.PathLike], **overrides: Any) -> None:
  """Writes a torchvision-loadable `.pth` (a plain state_dict)."""
  state_dict = flax_to_torch(variables, model, **overrides)
  _torch().save(collections.OrderedDict(
      (k, _to_torch_tensor(v)) for k, v in state_dict.items()), path)


def save_safetensors(variables: Mapping[str, Any], model: ModelLike,
                     path: Union[str, os.PathLike], **overrides: Any) -> None:
  """Writes torchvision names to a `.safetensors` file."""
  state_dict = flax_to_torch(variables, model, **overrides)
  if any(v.dtype.name == 'bfloat16' for v in state_dict.values()):
    import safetensors.torch
    safetensors.torch.save_file(
        {k: _to_torch_tensor(v) for k, v in state_dict.items()}, str(path))
  else:
    import safetensors.numpy
    safetensors.numpy.save_file(dict(state_dict), str(path))


# ------------------------------------------------------------------------ CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
  from flax_resnet.spec import parse_override  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m flax_resnet.convert',
      description='Convert a torchvision/timm ResNet state_dict (.pth or '
      '.safetensors) into an orbax checkpoint of Flax variables.')
  parser.add_argument('model', help='preset name, e.g. resnet50')
  parser.add_argument('source', help='.pth / .pt / .safetensors file')
  parser.add_argument('out_dir', help='checkpoint directory to create')
  parser.add_argument('overrides', nargs='*', type=parse_override,
                      help='spec overrides such as num_classes=10')
  parser.add_argument('--skip-head', action='store_true',
                      help='do not load fc.*; keep a fresh classifier')
  parser.add_argument('--hf', action='store_true',
                      help='the file uses Hugging Face transformers names')
  parser.add_argument('--force', action='store_true',
                      help='overwrite out_dir if it exists')
  args = parser.parse_args(argv)
  out_dir = pathlib.Path(args.out_dir).absolute()
  if out_dir.exists() and not args.force:
    print(f'error: {out_dir} already exists; pass --force to overwrite it.',
          file=sys.stderr)
    return 2
  try:
    state_dict = load_state_dict(args.source)
    if args.hf:
      state_dict = hf_to_torchvision_keys(state_dict)
    variables = torch_to_flax(state_dict, args.model,
                              skip_head=args.skip_head, **dict(args.overrides))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir, variables, force=args.force)
    checkpointer.wait_until_finished()
  count = sum(int(np.prod(e.shape)) for e in key_map(args.model, **dict(
      args.overrides)) if e.collection == 'params')
  print(f'wrote {out_dir} ({count:,} parameters). Restore with '
        'orbax.checkpoint.StandardCheckpointer().restore(path).')
  return 0


if __name__ == '__main__':
  sys.exit(main())


# --------------------------------------------------------- the single loader


def load_weights(source: StateDictLike, model: ModelLike,
                 **overrides: Any) -> dict[str, Any]:
  """Flax variables for `model` from a weights file or a state_dict.

  TEMP (branch i13): the format-detecting loader is being built on another
  branch; this stand-in handles what `torch_to_flax` handles (.pth/.pt/.bin,
  .safetensors, a mapping of torchvision/timm names) and takes its keyword
  arguments (skip_head, strict, base, rng) plus ResNetSpec overrides.
  """
  return torch_to_flax(source, model, **overrides)

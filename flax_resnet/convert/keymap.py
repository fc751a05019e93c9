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

The other formats (mxnet.py, keras.py) rename these entries; `assemble` turns
any list of named entries plus arrays into Flax variables, with one error
report (`StateDictMismatch`) for all formats.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

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
      (s.stem == 'deep') == deep and not s.preact and
      # Gluon / Keras nets have other names; torch names fit only these.
      not s.conv_bias and not s.input_norm)
  stem = ', deep stem' if deep else ''
  return (f'The state_dict looks like {block} blocks with depths {found}'
          f'{stem}, but the model has {spec.block} blocks with depths '
          f'{tuple(spec.depths)}{", deep stem" if spec.stem == "deep" else ""}'
          + (f'; presets that match the state_dict: {", ".join(candidates)}.'
             if candidates else '.'))


def _mismatch_message(model, missing, unexpected, mismatched,
                      keys: Sequence[str], head_weight: str = 'fc.weight'
                      ) -> str:
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
    lines.append(f'{len(mismatched)} shape mismatch(es) (in the layout of '
                 'the weights file or mapping):')
    lines.extend(f'  {k}: got {tuple(got)}, expected {tuple(want)}'
                 for k, got, want in mismatched)
  fixes = []
  transposed = [k for k, got, want in mismatched
                if len(got) == 2 and tuple(got) == tuple(reversed(want))
                and got[0] != got[1]]
  if transposed:
    fixes.append(
        f'{", ".join(transposed)} hold(s) the transpose of the expected '
        'matrix (in, out) instead of (out, in): transpose it before loading '
        '(a torch Linear weight is (out, in)); the number of classes is '
        'right.')
  fc = {k: (got, want) for k, got, want in mismatched
        if k == head_weight and k not in transposed}
  if head_weight in fc and fc[head_weight][0][0] != fc[head_weight][1][0]:
    got, want = fc[head_weight]
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


def check_values(arrays: Mapping[str, Any], names: Sequence[str]) -> None:
  """Refuses None and non-float tensors among the `names` to be loaded.

  An integer tensor would be cast silently to float: a quantised or
  corrupted checkpoint would then load as nonsense.
  """
  problems = []
  for name in names:
    value = arrays[name]
    if value is None:
      problems.append(f'{name} is None, not an array (was the tensor '
                      'dropped when the file was written?)')
      continue
    dtype = np.asarray(value).dtype
    floating = np.issubdtype(dtype, np.floating) or dtype.name == 'bfloat16'
    if not floating:
      problems.append(f'{name} has dtype {dtype.name}; weights must be '
                      'floating point (a quantised or integer checkpoint '
                      'cannot be loaded; dequantise it first)')
  if problems:
    raise StateDictMismatch(
        f'{len(problems)} tensor(s) cannot be loaded:\n' +
        '\n'.join(f'  {p}' for p in problems))


def assemble(arrays: Mapping[str, np.ndarray], entries: Sequence[Any], model,
             *, strict: bool = True, skip_head: bool = False,
             base: Optional[Mapping[str, Any]] = None, rng=None,
             ignored: Callable[[str], bool] = lambda name: False,
             head_weight: str = 'fc.weight', stacklevel: int = 3
             ) -> dict[str, Any]:
  """Flax variables of `model` from named arrays and the entries naming them.

  Args:
    arrays: {name in the source format: array in the source layout}.
    entries: Entry / SourceEntry of every tensor the model has, in the
      format's names ('counter' entries are skipped).
    model: the resolved ResNet.
    strict, skip_head, base, rng: see `torch_to_flax`.
    ignored: names the format stores but the model never needs (torch's
      num_batches_tracked).
    head_weight: the format's name of the classifier weight, for hints.
  """
  import jax.numpy as jnp

  entries = [e for e in entries if e.kind != 'counter']
  head = {e.name for e in entries if e.path[0] == 'fc'}
  if skip_head:
    entries = [e for e in entries if e.name not in head]
    arrays = {k: v for k, v in arrays.items() if k not in head}
  expected = {e.name: e for e in entries}
  given = {k for k in arrays if not ignored(k)}
  missing = [e.name for e in entries
             if e.name not in given and e.kind != 'ignored']
  unexpected = sorted(given - set(expected))
  check_values(arrays, [k for k in expected if k in given])
  mismatched = [(k, tuple(np.shape(arrays[k])), expected[k].source_shape)
                for k in expected if k in given and
                tuple(np.shape(arrays[k])) != expected[k].source_shape]
  if mismatched or (strict and (missing or unexpected)):
    raise StateDictMismatch(
        _mismatch_message(model, missing, unexpected, mismatched,
                          sorted(given), head_weight),
        missing, unexpected, mismatched)

  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for entry in entries:
    if entry.name in given and entry.kind != 'ignored':
      _set(variables[entry.collection], entry.path,
           jnp.asarray(entry.to_flax(np.asarray(arrays[entry.name]))))
  if missing:
    warnings.warn(f'strict=False: {len(missing)} key(s) not in the state_dict '
                  f'keep their initial values: {", ".join(missing)}',
                  stacklevel=stacklevel)
  if missing or skip_head:
    by_name = {e.name: e for e in entries}
    fill = [by_name[k] for k in missing]
    if skip_head:
      fill += [e for e in key_map(model) if e.path[0] == 'fc'
               and e.kind != 'counter']
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


def variables_to_arrays(variables: Mapping[str, Any], entries: Sequence[Any],
                        model) -> collections.OrderedDict:
  """{format name: array in the format's layout}, in the entries' order.

  'counter' entries (torch's num_batches_tracked) become int64 0; 'ignored'
  ones are left for the caller to fill (e.g. Gluon's fixed gamma of 1).
  """
  out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
  missing, mismatched = [], []
  for entry in entries:
    if entry.kind == 'counter':
      out[entry.name] = np.array(0, dtype=np.int64)
      continue
    if entry.kind == 'ignored':
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
    out[entry.name] = entry.to_torch(value)
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

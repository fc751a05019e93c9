"""Named arrays -> Flax variables and back, with one error report for all.

`assemble` takes {name: array} in any format's names plus the entries that
name the model's tensors (keymap.key_map, or its Gluon / Keras renamings) and
builds the variables; every missing, unexpected, mis-shaped, None or
integer tensor is listed in one `StateDictMismatch`, with a suggested fix.
"""

from __future__ import annotations

import collections
import functools
import re
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from flax_resnet.convert.keymap import (StateDictMismatch, _trace,
                                        _trace_shape, key_map)


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
        missing, unexpected, mismatched,
        head_only=bool(mismatched) and not (missing or unexpected) and all(
            k in head for k, _, _ in mismatched))

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

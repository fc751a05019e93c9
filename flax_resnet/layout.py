"""Stride/shortcut layout, derived by tracing the module, and held against references.

The table is never written by hand: `derive_layout` runs `model.init` under
`jax.eval_shape` with a Flax method interceptor and records every submodule
call (its type, attributes and in/out shapes). Rows are built from what was
observed, so the table can only describe the network that actually runs.

    python -m flax_resnet.layout resnet50 [--reference torchvision] [k=v ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet import command_line
from flax_resnet import layers
from flax_resnet import references
from flax_resnet.layout_compare import CLI_FIXES
from flax_resnet.layout_compare import COMPARED_FIELDS  # pylint: disable=unused-import
from flax_resnet.layout_compare import compare  # pylint: disable=unused-import
from flax_resnet.layout_compare import CONFIG_FIXES
from flax_resnet.layout_compare import Difference
from flax_resnet.layout_compare import differences
from flax_resnet.layout_compare import Fixes
from flax_resnet.layout_compare import format_differences
from flax_resnet.layout_compare import format_value
from flax_resnet.model import ResidualBlock, ResNet, Stem
from flax_resnet.spec import parse_override
from flax_resnet.zoo import create_model

_BLOCK_NAME = re.compile(r'^stage(\d+)_block(\d+)$')

@dataclasses.dataclass(frozen=True)
class Call:
  path: tuple[str, ...]
  module: nn.Module
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockRow:
  stage: int
  index: int
  in_channels: int
  out_channels: int
  in_size: tuple[int, int]
  out_size: tuple[int, int]
  stride_conv: str  # e.g. 'conv2', or '' when the block keeps the size
  stride_at: str  # kernel of the strided conv: '1x1', '3x3' or 'none'
  shortcut: str  # 'identity', 'zero-pad', 'projection', 'avgpool+projection'
  shortcut_stride: int
  shortcut_norm: bool
  params: int
  stride: int = 1  # of the strided conv itself (not the size ratio)

  def shortcut_text(self) -> str:
    if self.shortcut == 'identity':
      return 'identity'
    if self.shortcut == 'subsample':
      return (f'maxpool 1x1/{self.shortcut_stride}: x[::{self.shortcut_stride}'
              f', ::{self.shortcut_stride}] (0 params)')
    if self.shortcut == 'zero-pad':
      step = (f'x[::{self.shortcut_stride}, ::{self.shortcut_stride}]'
              if self.shortcut_stride > 1 else 'x')
      zeros = self.out_channels - self.in_channels
      return f'A: {step} + {zeros} zero channels (0 params)'
    norm = ' + BN' if self.shortcut_norm else ''
    conv = f'1x1 conv s{self.shortcut_stride}' if self.shortcut == 'projection' \
        else '1x1 conv s1'
    pool = 'avgpool 2x2/2 -> ' if self.shortcut == 'avgpool+projection' else ''
    return f'{pool}{conv}{norm}'

  def to_json(self) -> dict[str, Any]:
    row = dataclasses.asdict(self)
    row['in_size'] = list(self.in_size)
    row['out_size'] = list(self.out_size)
    del row['stride']  # reference tables hold stride_at/stride_conv instead
    return row


@dataclasses.dataclass(frozen=True)
class Layout:
  model: str
  input_shape: tuple[int, ...]
  stem: str
  stem_out_channels: int
  stem_out_size: tuple[int, int]
  stem_params: int
  blocks: tuple[BlockRow, ...]
  head: str
  head_params: int
  total_params: int
  # params + batch_stats: what Keras' count_params() counts.
  total_variables: int = 0

  def to_json(self) -> dict[str, Any]:
    return {
        'stem': {'out_channels': self.stem_out_channels,
                 'out_size': list(self.stem_out_size),
                 'params': self.stem_params},
        'blocks': [b.to_json() for b in self.blocks],
        'total_params': self.total_params,
    }


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def trace(model: ResNet, input_shape: Sequence[int]):
  """Runs model.init abstractly; returns (calls in call order, param shapes)."""
  calls: list[tuple[int, Call]] = []
  counter = [0]

  def record(next_fun, args, kwargs, context):
    order = counter[0]
    counter[0] += 1
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and args:
      calls.append((order, Call(tuple(context.module.path), context.module,
                                tuple(args[0].shape), tuple(out.shape))))
    return out

  def init():
    return model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32),
                      train=False)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(init)
  return [c for _, c in sorted(calls, key=lambda oc: oc[0])], variables


def _describe_op(call: Call) -> str:
  m = call.module
  if isinstance(m, nn.Conv):
    k = m.kernel_size[0]
    s = m.strides[0] if m.strides else 1
    groups = f' g{m.feature_group_count}' if m.feature_group_count > 1 else ''
    return f'conv{k}x{k}/{s}{groups}'
  if isinstance(m, nn.BatchNorm):
    return 'BN' if m.use_scale or m.use_bias else 'BN (no scale, no shift)'
  if isinstance(m, layers.MaxPool):
    zeros = ' (zero-padded)' if m.pad_value == 'zeros' else ''
    return f'maxpool{m.window}x{m.window}/{m.stride}{zeros}'
  if isinstance(m, layers.AvgPool):
    return f'avgpool{m.window}x{m.window}/{m.stride}'
  return type(m).__name__


def _block_row(block: Call, children: list[Call], params: int) -> BlockRow:
  stage, index = (int(g) for g in _BLOCK_NAME.match(block.path[-1]).groups())
  depth = len(block.path)
  main = [c for c in children if c.path[depth] != 'shortcut']
  skip = [c for c in children if c.path[depth] == 'shortcut']
  strided = [c for c in main if isinstance(c.module, nn.Conv)
             and tuple(c.module.strides or (1, 1)) != (1, 1)]
  stride_conv = strided[0].path[-1] if strided else ''
  stride_at = ('%dx%d' % tuple(strided[0].module.kernel_size)
               if strided else 'none')
  in_size, out_size = block.in_shape[1:3], block.out_shape[1:3]

  shortcut_call = [c for c in skip if isinstance(c.module, layers.Shortcut)]
  convs = [c for c in skip if isinstance(c.module, nn.Conv)]
  pools = [c for c in skip if isinstance(c.module, layers.AvgPool)]
  norms = [c for c in skip if isinstance(c.module, nn.BatchNorm)]
  if not shortcut_call:
    kind, sc_stride = 'identity', 1
  elif convs:
    kind = 'avgpool+projection' if pools else 'projection'
    sc_stride = (pools[0].module.stride if pools else convs[0].module.strides[0])
  else:
    s = shortcut_call[0]
    # Parameter-free: option A appends zero channels; Keras V2 only
    # subsamples.
    kind = 'zero-pad' if s.out_shape[-1] > s.in_shape[-1] else 'subsample'
    sc_stride = s.module.stride
  return BlockRow(
      stage=stage, index=index,
      in_channels=block.in_shape[-1], out_channels=block.out_shape[-1],
      in_size=tuple(in_size), out_size=tuple(out_size),
      stride_conv=stride_conv, stride_at=stride_at,
      shortcut=kind, shortcut_stride=int(sc_stride),
      shortcut_norm=bool(norms), params=params,
      stride=int(strided[0].module.strides[0]) if strided else 1)


def derive_layout(model: ResNet, input_shape: Sequence[int] = (1, 224, 224, 3),
                  name: Optional[str] = None) -> Layout:
  """The model's layout table, built only from what a traced init observes."""
  calls, variables = trace(model, input_shape)
  params = variables['params']
  blocks, stem_ops, stem_call, head_ops = [], [], None, []
  for call in calls:
    if isinstance(call.module, ResidualBlock):
      children = [c for c in calls if c.path[:len(call.path)] == call.path
                  and len(c.path) > len(call.path)]
      blocks.append(_block_row(call, children,
                               _count(params.get(call.path[-1], {}))))
    elif isinstance(call.module, Stem):
      stem_call = call
    elif call.path and call.path[0] == 'stem':
      stem_ops.append(_describe_op(call))
    elif len(call.path) == 1 and not isinstance(call.module, ResNet):
      head_ops.append(call)
  head_params = sum(_count(params[c.path[0]]) for c in head_ops)
  head = ' -> '.join(
      ['BN -> ReLU' if isinstance(c.module, nn.BatchNorm) else
       f'avgpool -> fc {c.in_shape[-1]}->{c.out_shape[-1]}' for c in head_ops])
  return Layout(
      model=name or 'model',
      input_shape=tuple(input_shape),
      stem=' -> '.join(stem_ops),
      stem_out_channels=stem_call.out_shape[-1],
      stem_out_size=tuple(stem_call.out_shape[1:3]),
      stem_params=_count(params['stem']),
      blocks=tuple(sorted(blocks, key=lambda b: (b.stage, b.index))),
      head=head,
      head_params=head_params,
      total_params=_count(params),
      total_variables=_count({k: v for k, v in variables.items()
                              if k in ('params', 'batch_stats')}))


def layout_of(name: str, image_size: Optional[int] = None,
              **overrides) -> Layout:
  model = create_model(name, **overrides)
  if image_size is None:
    image_size = 32 if model.spec.stem == 'cifar' else 224
  return derive_layout(model, (1, image_size, image_size, 3), name)


# ----------------------------------------------------------------- comparison


# Spec fields that are not architecture: they never explain a difference.
_NOT_ARCHITECTURE = ('reference', 'num_classes', 'dtype', 'param_dtype')


def _spec_words(name: str, value) -> str:
  if name == 'conv_bias':
    return f'conv biases on {", ".join(value)}' if value else 'no conv biases'
  return f'{name} {value!r}'


def explain(layout: Layout, spec, entry_name: str, entry: dict[str, Any],
            reference_name: str, found: list[Difference]):
  """(causes of count differences by `where`, (preset, its changes) or None).

  Only what a trace confirms: the preset named like the entry is traced
  against the entry; a count difference gets a cause where that preset
  matches it, naming the spec fields that alone change this model's counts.
  """
  # Imported here: zoo presets are only needed to explain a mismatch.
  from flax_resnet import zoo  # pylint: disable=g-import-not-at-top
  if spec is None or entry_name not in zoo.PRESETS:
    return {}, None
  preset = zoo.get_spec(entry_name)
  # The entry has the preset's head (a run's class count is not architecture).
  spec = dataclasses.replace(spec, num_classes=preset.num_classes)
  fields = [f.name for f in dataclasses.fields(spec)
            if f.name not in _NOT_ARCHITECTURE
            and getattr(spec, f.name) != getattr(preset, f.name)]
  if not fields:
    return {}, None
  try:
    theirs = differences(derive_layout(ResNet(preset), layout.input_shape,
                                       entry_name), entry, reference_name)
  except (ValueError, TypeError):
    return {}, None  # the preset does not trace at this size: no claim
  changed = '; '.join(f'{_spec_words(f, getattr(preset, f))} (here '
                      f'{_spec_words(f, getattr(spec, f))})' for f in fields)
  matching = None if theirs else (entry_name, changed)
  unexplained = {(d.where, d.what) for d in theirs}
  # Of the totals, only the parameters: BN statistics move with them.
  explainable = [d.where for d in found if d.what == 'parameters'
                 and (d.where, d.what) not in unexplained]
  if not explainable:
    return {}, matching
  ours = _counts(layout)
  causes: dict[str, list[str]] = {where: [] for where in explainable}
  for name in fields:
    try:
      single = dataclasses.replace(spec, **{name: getattr(preset, name)})
      changed_counts = _counts(derive_layout(ResNet(single.validate()),
                                             layout.input_shape))
    except (ValueError, TypeError):
      continue  # this field alone makes no valid network: no claim
    for where in explainable:
      if changed_counts.get(where) != ours.get(where):
        causes[where].append(_spec_words(name, getattr(preset, name)))
  return ({where: ', '.join(c) for where, c in causes.items() if c},
          matching)


def _counts(layout: Layout) -> dict[str, int]:
  """Parameter counts by the `where` of a Difference."""
  counts = {'stem': layout.stem_params, 'total': layout.total_params}
  counts.update({f'stage {b.stage} block {b.index}': b.params
                 for b in layout.blocks})
  return counts


class LayoutMismatch(ValueError):
  """The model's layout differs from its reference; `.problems` lists rows.

  `.lines` is the grouped, aligned table of the differences.
  """

  def __init__(self, model: str, reference: str, found: list[Difference],
               fixes: Fixes = CONFIG_FIXES,
               causes: Optional[dict[str, str]] = None,
               matching: Optional[tuple[str, str]] = None):
    self.differences = found
    self.problems = [d.text for d in found]
    self.lines = format_differences(found, reference, causes)
    self.fix = '\n'.join(filter(None, [
        f'The preset {matching[0]} matches {reference}; this model differs '
        f'from it in: {matching[1]}. Try {fixes.model.format(matching[0])}.'
        if matching else '',
        f'Fix the model overrides, pick the matching reference '
        f'({fixes.reference.format("NAME")}), or {fixes.skip} to skip the '
        'reference check.']))
    lines = '\n  '.join(self.lines)
    super().__init__(
        f'{model}: layout differs from {reference} in {len(found)} '
        f'place(s):\n  {lines}\n{self.fix}')


def named_variants(model: str, entries) -> list[str]:
  """Entries that name `model` as a whole word, shortest first.

  'resnet50' is in gluon_v1 as resnet50_v1 and gluon_resnet50_v1.
  """
  word = re.compile(rf'(^|_){re.escape(model)}(_|$)')
  return sorted((e for e in entries if word.search(e)), key=len)


def check(layout: Layout, reference_name: str,
          reference_model: Optional[str] = None, *, spec=None,
          fixes: Fixes = CONFIG_FIXES) -> dict[str, Any]:
  """Raises LayoutMismatch on any difference; returns the reference entry.

  spec (the model's ResNetSpec) lets a mismatch name its likely cause;
  fixes words the way out for where the check runs (config or CLI).
  """
  entry_name = reference_model or layout.model
  try:
    entry = references.lookup(reference_name, entry_name,
                              layout.input_shape[1])
  except references.MissingEntry as e:
    close = (named_variants(e.model, e.entries) or
             difflib.get_close_matches(e.model, e.entries, n=2, cutoff=0.6))
    closest = (f' (closest: {", ".join(close)})' if close else '')
    raise references.MissingEntry(
        e.name, e.model, e.entries,
        f'Name one with {fixes.entry.format("NAME")}{closest}, pick another '
        f'reference ({fixes.reference.format("NAME")}), or {fixes.skip} to '
        'skip the check.') from None
  found = differences(layout, entry, reference_name)
  if found:
    causes, matching = explain(layout, spec, entry_name, entry,
                               reference_name, found)
    raise LayoutMismatch(layout.model, reference_name, found, fixes, causes,
                         matching)
  return entry


# -------------------------------------------------------------------- display


def notes(layout: Layout) -> list[str]:
  """Plain-words answers to 'why is this projection stride 1?' and friends."""
  out = []
  for row in layout.blocks:
    if row.shortcut == 'subsample':
      out.append(
          f'stage {row.stage} block {row.index}: the stride sits on this, the '
          f'last block ({row.stride_conv}, {row.stride_at}); the channels '
          f'stay {row.out_channels}, so the shortcut only subsamples: '
          f'{row.shortcut_text()}.')
    if row.index != 0:
      continue
    where = f'stage {row.stage}'
    if row.shortcut in ('projection', 'avgpool+projection') and \
        row.in_size == row.out_size and row.in_channels != row.out_channels:
      pooled = 'maxpool' in layout.stem
      why = (f"the stem's max-pool has already halved the size to "
             f'{format_value(row.in_size)} (after its strided conv)' if pooled else
             f'the stem keeps the size at {format_value(row.in_size)}')
      if row.stage > 1:
        # Keras ResNetV2: the previous stage strided in its last block.
        why = (f'the last block of stage {row.stage - 1} has already '
               f'strided to {format_value(row.in_size)}')
      out.append(
          f'{where}: the projection is a 1x1 with stride 1 ({row.in_channels}'
          f'->{row.out_channels}): the bottleneck widens the channels, so the '
          f'identity cannot be used, but {why}, so stage {row.stage} keeps '
          'stride 1.')
    elif row.shortcut == 'identity' and row.stage == 1:
      out.append(
          f'{where}: no projection: {row.in_channels}->{row.out_channels} '
          f'channels at stride 1, so the identity already has the right shape.')
    elif row.shortcut == 'zero-pad':
      out.append(
          f'{where}: option A: the shortcut subsamples with stride '
          f'{row.shortcut_stride} and appends '
          f'{row.out_channels - row.in_channels} zero channels; it has no '
          'parameters.')
    elif row.shortcut in ('projection', 'avgpool+projection'):
      out.append(
          f'{where}: {row.shortcut_text()} ({row.in_channels}->'
          f'{row.out_channels}, {format_value(row.in_size)}->{format_value(row.out_size)}); '
          f'the main path strides on {row.stride_conv} ({row.stride_at}).')
  return out


def spec_notes(spec) -> list[str]:
  """What, besides the layout, makes `spec` differ from torchvision's nets."""
  out = []
  if spec.conv_bias:
    places = ', '.join(spec.conv_bias)
    out.append(f'conv biases on: {places} (torchvision convs have none; each '
               'bias is a parameter of its own in the counts).')
  if spec.input_norm:
    out.append('the raw image first goes through a BatchNorm without scale '
               'or shift (Gluon V2\'s "data" BN): only running mean and '
               'variance, no trainable parameters.')
  if spec.preact and spec.has_stem_norm:
    out.append('pre-activation, yet the stem conv is followed by BN + ReLU '
               'before the max-pool (Gluon V2).')
  if not spec.has_stem_norm and spec.stem != 'cifar':
    out.append('no BN or ReLU between the stem conv and its max-pool'
               + (', so the pool sees negative values and its zero padding '
                  'differs from -inf padding.'
                  if spec.pool_padding == 'zeros' else '.'))
  elif spec.pool_padding == 'zeros':
    out.append('the max-pool pads with zeros (Keras ZeroPadding2D); after a '
               'ReLU that equals -inf padding.')
  if spec.stride_block == 'last':
    out.append('each stage strides in its LAST block (Keras ResNetV2), so a '
               'stage\'s output is already downsampled for the next one.')
  if spec.pool_shortcut:
    out.append('a block that strides without changing channels has a '
               'parameter-free 1x1 max-pool shortcut with the stride.')
  if spec.bn_eps != 1e-5:
    out.append(f'BatchNorm epsilon {spec.bn_eps:g} (torchvision 1e-5).')
  return out


def format_table(layout: Layout) -> str:
  head = ('stage', 'block', 'channels', 'size', 'stride on', 'shortcut',
          'params')
  rows = [head]
  rows.append(('stem', '', f'{layout.input_shape[-1]}->'
               f'{layout.stem_out_channels}',
               f'{layout.input_shape[1]}->{layout.stem_out_size[0]}',
               layout.stem, '', f'{layout.stem_params:,}'))
  for b in layout.blocks:
    # The conv's own stride: at tiny inputs the size ratio is not it (1 -> 1
    # at stride 2).
    stride = (f'{b.stride_conv} {b.stride_at} s{b.stride}'
              if b.stride_conv else '-')
    rows.append((str(b.stage), str(b.index),
                 f'{b.in_channels}->{b.out_channels}',
                 f'{b.in_size[0]}->{b.out_size[0]}', stride,
                 b.shortcut_text(), f'{b.params:,}'))
  rows.append(('head', '', '', '', layout.head, '', f'{layout.head_params:,}'))
  rows.append(('total', '', '', '', '', '', f'{layout.total_params:,}'))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ['  '.join(c.ljust(w) if i < len(head) - 1 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def _image_size(text: str) -> int:
  """argparse type of --size: a positive integer, else a usage error."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r} is not an integer; give the input height/width in pixels, '
        'e.g. --size 224') from None
  if value < 1:
    raise argparse.ArgumentTypeError(
        f'{value} is not a size; give the input height/width in pixels, at '
        'least 1, e.g. --size 224')
  return value


def _stand_in_entry(model: str, reference: str) -> Optional[str]:
  """For the CLI: the entry to compare with when the table lacks `model`.

  `--reference gluon_v1` on resnet50 means Gluon's resnet50, which the table
  holds as resnet50_v1; the choice is printed. Training never guesses.
  """
  entries = references.load(reference)['models']
  variants = named_variants(model, entries)
  if model in entries or not variants:
    return None
  others = (f'; the others: {", ".join(variants[1:])} (--reference-model '
            'NAME)' if len(variants) > 1 else '')
  print(f'\nreference {reference} has no entry {model}: comparing with '
        f'{variants[0]}{others}')
  return variants[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = command_line.ArgumentParser(
      prog='python -m flax_resnet.layout',
      description='Print a ResNet\'s stride/shortcut layout, derived from the '
      'module, and check it against a reference implementation.')
  parser.add_argument('model', help='preset name (see flax_resnet.list_models())')
  parser.add_argument('overrides', nargs='*', type=parse_override,
                      help='spec overrides such as shortcut=A stride_in=1x1')
  parser.add_argument('--reference', default='default',
                      help='torchvision, timm, gluon_v1, gluon_v2, keras, '
                      "keras_v2, paper, or 'none'. Default: the preset's own.")
  parser.add_argument('--reference-model', '--reference_model', default=None,
                      help='entry in the reference table (default: the model)')
  parser.add_argument('--size', type=_image_size, default=None,
                      help='input height/width (default 224, CIFAR nets 32)')
  args = parser.parse_args(argv)
  try:
    overrides = dict(args.overrides)
    layout = layout_of(args.model, args.size, **overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  reference = args.reference
  if reference.lower() == 'none':
    reference = None
  elif reference == 'default':
    reference = create_model(args.model, **overrides).spec.reference
  print(f'{args.model}  input {format_value(layout.input_shape[1:])}')
  print(format_table(layout))
  print()
  for line in notes(layout) + spec_notes(
      create_model(args.model, **overrides).spec):
    print(f'* {line}')
  if reference in (None, 'none'):
    print('\nreference: none (no check)')
    return 0
  reference_model = args.reference_model
  try:
    if reference_model is None:
      reference_model = _stand_in_entry(args.model, reference)
    entry = check(layout, reference, reference_model,
                  spec=create_model(args.model, **overrides).spec,
                  fixes=CLI_FIXES)
  except LayoutMismatch as e:
    entry = (f' (entry {reference_model})'
             if reference_model not in (None, args.model) else '')
    print(f'\nreference {reference}{entry}: MISMATCH in '
          f'{len(e.differences)} place(s)')
    for line in e.lines:
      print(f'  {line}')
    print(e.fix)
    return 1
  except (KeyError, ValueError) as e:
    print(f'\nerror: {e}', file=sys.stderr)
    return 2
  # A reference whose convention makes a count incomparable stores null.
  uncounted = [] if entry['stem'].get('params') is not None else ['stem']
  null_blocks = sum(b.get('params') is None for b in entry['blocks'])
  if null_blocks:
    uncounted.append(f'{null_blocks} blocks')
  if not entry.get('counts_compared', True):
    print(f'\nreference {reference}: MATCH ({len(layout.blocks)} blocks, '
          'stem, strides and shortcuts agree; parameter counts not compared: '
          f'{entry["counts_note"]})')
    return 0
  if not uncounted:
    agreed = 'stem, strides, shortcuts and parameter counts agree'
  else:
    agreed = ('stem, strides and shortcuts agree; parameter counts of the '
              f'{" and ".join(uncounted)} not compared: see the notes in '
              f'references/{reference}.json')
  print(f'\nreference {reference}: MATCH ({len(layout.blocks)} blocks, '
        f'{agreed})')
  return 0


if __name__ == '__main__':
  sys.exit(main())

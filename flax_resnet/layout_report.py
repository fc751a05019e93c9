"""A derived layout for people: its table, notes in words, and the command line.

`main` is `python -m flax_resnet.layout`: it prints the table and notes, then
checks the layout against a reference (flax_resnet.layout_check).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from flax_resnet import command_line
from flax_resnet import references
from flax_resnet.layout import Layout
from flax_resnet.layout import layout_of
from flax_resnet.layout_check import check
from flax_resnet.layout_check import LayoutMismatch
from flax_resnet.layout_check import named_variants
from flax_resnet.layout_compare import CLI_FIXES
from flax_resnet.layout_compare import format_value
from flax_resnet.spec import parse_override
from flax_resnet.zoo import create_model


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

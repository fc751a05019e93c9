"""Forward cost (multiply-accumulates) and parameter counts, from a traced model.

    python -m flax_resnet.cost            # markdown model-zoo table
    python -m flax_resnet.cost resnet50   # one net

MACs count conv and dense multiply-adds only (as torchvision's `_ops`);
BatchNorm, ReLU, pooling and the residual adds are not counted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from flax_resnet import layout as layout_lib
from flax_resnet.zoo import PRESETS, create_model


def forward_macs(calls: Sequence[layout_lib.Call]) -> int:
  total = 0
  for call in calls:
    m = call.module
    if isinstance(m, nn.Conv):
      kh, kw = m.kernel_size
      in_per_group = call.in_shape[-1] // m.feature_group_count
      total += int(np.prod(call.out_shape)) * kh * kw * in_per_group
    elif isinstance(m, nn.Dense):
      total += int(np.prod(call.out_shape)) * call.in_shape[-1]
  return total


def model_cost(name: str, image_size: Optional[int] = None,
               **overrides) -> dict:
  model = create_model(name, **overrides)
  if image_size is None:
    image_size = 32 if model.spec.stem == 'cifar' else 224
  calls, variables = layout_lib.trace(model, (1, image_size, image_size, 3))
  params = sum(int(np.prod(x.shape)) for x in
               jax.tree.leaves(variables['params']))
  return {'model': name, 'image_size': image_size, 'params': params,
          'macs': forward_macs(calls), 'spec': model.spec}


def _notes(spec) -> str:
  parts = []
  if spec.preact:
    parts.append('pre-activation (v2)')
  elif spec.block == 'bottleneck':
    parts.append('v1: stride on 1x1' if spec.stride_in == '1x1' else
                 'v1.5: stride on 3x3')
  parts.append(f'shortcut {spec.shortcut}')
  if spec.stem != 'imagenet':
    parts.append(f'{spec.stem} stem')
  if spec.groups > 1:
    parts.append(f'{spec.groups}x{spec.width_per_group}d groups')
  elif spec.width_per_group != 64:
    parts.append(f'width x{spec.width_per_group // 64}')
  # What makes the Gluon- and Keras-exact nets differ from torchvision's.
  if spec.input_norm:
    parts.append('input BN')
  if spec.conv_bias:
    parts.append(f'conv bias on {"/".join(spec.conv_bias)}')
  if spec.stride_block == 'last':
    parts.append('stride in last block')
  if spec.pool_shortcut:
    parts.append('1x1 max-pool shortcut')
  if spec.pool_padding == 'zeros':
    parts.append('zero-padded max-pool')
  if spec.bn_eps != 1e-5:
    parts.append(f'BN eps {spec.bn_eps:g}')
  return ', '.join(parts)


def markdown_table(names: Sequence[str]) -> str:
  rows = ['| model | params | GMACs | input | reference | layout |',
          '|---|---:|---:|---:|---|---|']
  for name in names:
    cost = model_cost(name)
    spec = cost['spec']
    rows.append(f'| `{name}` | {cost["params"]:,} | {cost["macs"] / 1e9:.3f} '
                f'| {cost["image_size"]} | {spec.reference or "-"} | '
                f'{_notes(spec)} |')
  return '\n'.join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m flax_resnet.cost')
  parser.add_argument('models', nargs='*', help='presets (default: all)')
  args = parser.parse_args(argv)
  print(markdown_table(args.models or sorted(PRESETS)))
  return 0


if __name__ == '__main__':
  sys.exit(main())

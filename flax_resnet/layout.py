"""Stride/shortcut layout of a model, derived by tracing the module.

The table is never written by hand: `derive_layout` runs `model.init` under
`jax.eval_shape` with a Flax method interceptor and records every submodule
call (its type, attributes and in/out shapes). Rows are built from what was
observed, so the table can only describe the network that actually runs.
Holding a layout against a reference is flax_resnet.layout_check's job;
printing it (table, notes, the command line) is flax_resnet.layout_report's.

    python -m flax_resnet.layout resnet50 [--reference torchvision] [k=v ...]
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet import layers
from flax_resnet.model import ResidualBlock, ResNet, Stem
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


if __name__ == '__main__':
  # The command line lives in layout_report, which imports this module: it is
  # imported only here, so `python -m flax_resnet.layout` keeps working.
  from flax_resnet import layout_report  # pylint: disable=g-import-not-at-top
  sys.exit(layout_report.main())

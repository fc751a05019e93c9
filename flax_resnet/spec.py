"""ResNetSpec: every ResNet variant is one value of this dataclass.

A variant is data, never a subclass: depth, block kind, shortcut option, stride
placement and pre-activation are all fields here, and `validate()` rejects any
impossible combination before a single parameter is created.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

BLOCKS = ('basic', 'bottleneck')
STEMS = ('imagenet', 'deep', 'cifar')
SHORTCUTS = ('A', 'B', 'C', 'D')
STRIDE_IN = ('1x1', '3x3')
PADDINGS = ('torch', 'same')
ZERO_PAD_PLACEMENTS = ('both', 'after')
# Convs that may carry a bias: the stem, a block's convs by our names, and the
# projection shortcut (Keras: every conv; Gluon BottleneckV1: conv1, conv3).
CONV_BIAS_PLACES = ('stem', 'conv1', 'conv2', 'conv3', 'shortcut')
STRIDE_BLOCKS = ('first', 'last')
POOL_PADDINGS = ('-inf', 'zeros')
DTYPES = {
    'float32': jnp.float32,
    'bfloat16': jnp.bfloat16,
    'float16': jnp.float16,
}


def _choices(values) -> str:
  return ', '.join(repr(v) for v in values)


def canonical_dtype(value: Any, field: str) -> Any:
  """Maps 'bfloat16' / jnp.bfloat16 / np.dtype to a jnp dtype, or raises."""
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(
          f'{field}={value!r} is not a supported dtype; choose one of '
          f'{_choices(DTYPES)}.')
    return DTYPES[value]
  try:
    name = jnp.dtype(value).name
  except TypeError as e:
    raise ValueError(
        f'{field}={value!r} is not a dtype; choose one of {_choices(DTYPES)}.'
    ) from e
  if name not in DTYPES:
    raise ValueError(
        f'{field}={name!r} is not a supported dtype; choose one of '
        f'{_choices(DTYPES)}.')
  return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Everything that distinguishes one ResNet from another.

  Attributes:
    block: 'basic' (two 3x3) or 'bottleneck' (1x1, 3x3, 1x1).
    depths: blocks per stage.
    widths: the 'planes' of each stage (torchvision's naming). A stage's output
      has widths[i] * expansion channels (expansion 4 for bottlenecks).
    strides: spatial stride of each stage (carried by its first block, or its
      last with stride_block='last').
    groups: grouped-conv cardinality of the 3x3 (ResNeXt).
    width_per_group: bottleneck width per group; 64 is plain ResNet, 128 with
      groups=1 is wide_resnet*_2.
    stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool), 'deep' (three 3x3 convs,
      ResNet-C) or 'cifar' (one 3x3/1 conv, no pool).
    stem_width: channels of the stem output ('deep' uses width/2 inside).
    shortcut: 'A' zero-pad identity, 'B' projection where the shape changes,
      'C' projection in every block, 'D' 2x2 avg-pool then 1x1 projection.
    stride_in: in a bottleneck, which conv carries the stride: '1x1' (v1:
      Caffe, Keras, Gluon V1) or '3x3' (v1.5: torchvision, NVIDIA).
    preact: pre-activation residual units (ResNet v2, He et al. 2016).
    zero_pad: option A zero channels 'both' sides (akamaster) or 'after'
      (fb.resnet.torch). Equivalent up to a channel permutation.
    num_classes: classifier outputs.
    zero_init_last_bn: zero gamma of each block's last BN (timm, Flax example).
    bn_momentum: Flax convention, running = m * running + (1 - m) * batch.
      torch's momentum=0.1 is 0.9 here.
    bn_eps: BatchNorm epsilon (torch 1e-5).
    padding: 'torch' pads symmetrically like PyTorch; 'same' is XLA's
      asymmetric SAME, kept only to demonstrate why it breaks weight parity.
    dtype: compute dtype. param_dtype: parameter (and BN statistics) dtype.
    reference: the reference implementation whose layout this net must match
      (a key of flax_resnet.references), or None.
    conv_bias: the convs that carry a bias, named by place: 'stem', 'conv1',
      'conv2', 'conv3' (a block's convs) and 'shortcut' (the projection).
      Keras applications put one on every conv; Gluon's BottleneckV1 on its
      two 1x1s (conv1, conv3).
    input_norm: normalise the raw image with a BatchNorm that has neither
      scale nor shift, only running statistics (Gluon V2's first layer,
      `BatchNorm(scale=False, center=False)`).
    stem_norm: BN + ReLU after the stem conv. None: unless preact (a
      pre-activation net normalises in its first block). Gluon V2 has it
      although pre-activation; Keras ResNetV2 has not.
    stride_block: which block of a stage carries the stage's stride: 'first'
      (everyone) or 'last' (Keras ResNetV2, whose stage outputs are then
      28/14/7/7 at 224 with strides (2, 2, 2, 1)).
    pool_shortcut: a block that strides without changing its channels gets a
      parameter-free 1x1 max-pool with the stride (x[::s, ::s], Keras
      ResNetV2) as shortcut, instead of a projection.
    pool_padding: what the stem max-pool pads with: '-inf' (torch, Gluon) or
      'zeros' (Keras' ZeroPadding2D before a VALID pool). The two agree after a
      ReLU, so they differ only where the stem has no BN + ReLU (Keras V2).
  """

  block: str = 'bottleneck'
  depths: tuple[int, ...] = (3, 4, 6, 3)
  widths: tuple[int, ...] = (64, 128, 256, 512)
  strides: Optional[tuple[int, ...]] = None
  groups: int = 1
  width_per_group: int = 64
  stem: str = 'imagenet'
  stem_width: int = 64
  shortcut: str = 'B'
  stride_in: str = '3x3'
  preact: bool = False
  zero_pad: str = 'both'
  num_classes: int = 1000
  zero_init_last_bn: bool = False
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  padding: str = 'torch'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  reference: Optional[str] = None
  conv_bias: tuple[str, ...] = ()
  input_norm: bool = False
  stem_norm: Optional[bool] = None
  stride_block: str = 'first'
  pool_shortcut: bool = False
  pool_padding: str = '-inf'

  @property
  def expansion(self) -> int:
    return 4 if self.block == 'bottleneck' else 1

  @property
  def stage_strides(self) -> tuple[int, ...]:
    if self.strides is not None:
      return tuple(self.strides)
    return (1,) + (2,) * (len(self.depths) - 1)

  @property
  def has_stem_norm(self) -> bool:
    return (not self.preact) if self.stem_norm is None else self.stem_norm

  def block_stride(self, stage: int, index: int) -> int:
    """Spatial stride of block `index` of `stage` (see stride_block)."""
    strided = 0 if self.stride_block == 'first' else self.depths[stage] - 1
    return self.stage_strides[stage] if index == strided else 1

  def stage_out_channels(self, stage: int) -> int:
    return self.widths[stage] * self.expansion

  def bottleneck_width(self, stage: int) -> int:
    return int(self.widths[stage] * (self.width_per_group / 64.0)) * self.groups

  def replace(self, **overrides) -> 'ResNetSpec':
    known = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(
          f'Unknown model field(s) {_choices(unknown)}; valid fields are '
          f'{_choices(sorted(known))}.')
    return dataclasses.replace(self, **overrides)

  def validate(self) -> 'ResNetSpec':
    """Returns a normalised copy, or raises ValueError naming the field."""

    def choice(field, value, valid):
      if value not in valid:
        raise ValueError(
            f'{field}={value!r} is not valid; choose one of {_choices(valid)}.')

    choice('block', self.block, BLOCKS)
    choice('stem', self.stem, STEMS)
    choice('shortcut', self.shortcut, SHORTCUTS)
    choice('stride_in', self.stride_in, STRIDE_IN)
    choice('padding', self.padding, PADDINGS)
    choice('zero_pad', self.zero_pad, ZERO_PAD_PLACEMENTS)
    for field in ('preact', 'zero_init_last_bn'):
      value = getattr(self, field)
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{field}={value!r} must be True or False.')
    for field in ('depths', 'widths'):
      value = getattr(self, field)
      if (not isinstance(value, (tuple, list)) or not value or
          not all(_is_int(v) and v > 0 for v in value)):
        raise ValueError(
            f'{field}={value!r} must be a non-empty sequence of positive '
            f'integers, one per stage.')
    if len(self.widths) != len(self.depths):
      raise ValueError(
          f'widths has {len(self.widths)} entries but depths has '
          f'{len(self.depths)}; give one width per stage.')
    strides = self.stage_strides
    if len(strides) != len(self.depths) or not all(
        _is_int(s) and s >= 1 for s in strides):
      raise ValueError(
          f'strides={self.strides!r} must hold one positive integer per stage '
          f'({len(self.depths)} stages).')
    for field in ('groups', 'width_per_group', 'stem_width', 'num_classes'):
      value = getattr(self, field)
      if not _is_int(value) or value < 1:
        raise ValueError(f'{field}={value!r} must be a positive integer.')
    if self.block == 'basic':
      if self.groups != 1 or self.width_per_group != 64:
        raise ValueError(
            f'groups={self.groups}, width_per_group={self.width_per_group}: '
            'basic blocks support only groups=1 and width_per_group=64 (as in '
            "torchvision); use block='bottleneck' for ResNeXt / wide nets.")
      if self.stride_in != '3x3':
        raise ValueError(
            "stride_in='1x1' needs block='bottleneck': a basic block has no "
            "1x1 conv, its stride always sits on the first 3x3.")
    if self.preact and self.zero_init_last_bn:
      raise ValueError(
          'zero_init_last_bn=True has no effect with preact=True: a '
          'pre-activation block ends in a conv, not a BatchNorm. Set '
          'zero_init_last_bn=False.')
    if self.preact and self.shortcut == 'D':
      raise ValueError(
          "shortcut='D' is defined for post-activation nets (ResNet-D); with "
          "preact=True choose shortcut 'A', 'B' or 'C'.")
    if self.stem == 'deep' and self.stem_width % 2:
      raise ValueError(
          f'stem_width={self.stem_width} must be even for the deep stem, '
          'whose first two convs have stem_width // 2 channels.')
    if self.block == 'bottleneck':
      for stage in range(len(self.depths)):
        if self.bottleneck_width(stage) < 1:
          raise ValueError(
              f'widths[{stage}]={self.widths[stage]} with width_per_group='
              f'{self.width_per_group} gives a bottleneck width of '
              f'int({self.widths[stage]} * {self.width_per_group} / 64) = 0 '
              f'channels in stage {stage + 1}; raise width_per_group to at '
              f'least {-(-64 // self.widths[stage])} or the stage width.')
    # Option A pads channels with zeros, whichever side they go: it cannot
    # drop any.
    if self.shortcut == 'A':
      for stage in range(len(self.depths)):
        prev = (self.stem_width if stage == 0 else
                self.stage_out_channels(stage - 1))
        extra = self.stage_out_channels(stage) - prev
        if extra < 0:
          raise ValueError(
              f"shortcut='A' cannot shrink channels ({prev} -> "
              f'{self.stage_out_channels(stage)} in stage {stage + 1}); '
              "use shortcut='B'.")
    for field in ('bn_momentum', 'bn_eps'):
      value = getattr(self, field)
      if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f'{field}={value!r} must be a finite number.')
    if not 0.0 <= float(self.bn_momentum) < 1.0:
      raise ValueError(
          f'bn_momentum={self.bn_momentum} must be in [0, 1) (Flax '
          'convention: torch momentum 0.1 is bn_momentum 0.9).')
    if not float(self.bn_eps) > 0:
      raise ValueError(f'bn_eps={self.bn_eps} must be positive.')
    if self.reference is not None and not isinstance(self.reference, str):
      raise ValueError(f'reference={self.reference!r} must be a string or None.')
    _check_reference_fields(self)
    return dataclasses.replace(
        self,
        conv_bias=tuple(self.conv_bias),
        depths=tuple(self.depths),
        widths=tuple(self.widths),
        strides=None if self.strides is None else tuple(self.strides),
        dtype=canonical_dtype(self.dtype, 'dtype'),
        param_dtype=canonical_dtype(self.param_dtype, 'param_dtype'),
    )


def _is_int(value) -> bool:
  """An integer that is not a bool (True would silently be a depth of 1)."""
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _is_real(value) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and (
      not isinstance(value, (bool, np.bool_)))


def _check_reference_fields(spec: ResNetSpec) -> None:
  """The fields that make a net exactly Gluon's or Keras' one."""
  bias = spec.conv_bias
  if isinstance(bias, str) or not isinstance(bias, (tuple, list)):
    raise ValueError(
        f'conv_bias={bias!r} must be a tuple of places, e.g. (\'conv1\', '
        f"'conv3'); choose from {_choices(CONV_BIAS_PLACES)}.")
  unknown = [b for b in bias if b not in CONV_BIAS_PLACES]
  if unknown:
    raise ValueError(
        f'conv_bias={tuple(bias)!r}: {_choices(unknown)} is not a place; '
        f'choose from {_choices(CONV_BIAS_PLACES)}.')
  if 'conv3' in bias and spec.block != 'bottleneck':
    raise ValueError(
        "conv_bias names 'conv3', but a basic block has only conv1 and "
        "conv2; drop 'conv3' or use block='bottleneck'.")
  for field in ('input_norm', 'pool_shortcut'):
    if not isinstance(getattr(spec, field), bool):
      raise ValueError(f'{field}={getattr(spec, field)!r} must be True or '
                       'False.')
  if spec.stem_norm is not None and not isinstance(spec.stem_norm, bool):
    raise ValueError(f'stem_norm={spec.stem_norm!r} must be True, False or '
                     'None (BN + ReLU unless preact).')
  for field, valid in (('stride_block', STRIDE_BLOCKS),
                       ('pool_padding', POOL_PADDINGS)):
    if getattr(spec, field) not in valid:
      raise ValueError(f'{field}={getattr(spec, field)!r} is not valid; '
                       f'choose one of {_choices(valid)}.')
  if spec.pool_padding != '-inf' and spec.stem == 'cifar':
    raise ValueError(
        f"pool_padding={spec.pool_padding!r} has no effect: the 'cifar' stem "
        "has no max-pool. Leave pool_padding='-inf'.")
  if spec.pool_shortcut and spec.shortcut != 'B':
    raise ValueError(
        f'pool_shortcut=True replaces the projections of option B where only '
        f"the stride changes; it has no meaning with shortcut="
        f"{spec.shortcut!r}. Use shortcut='B'.")


def parse_override(text: str) -> tuple[str, Any]:
  """'shortcut=A' -> ('shortcut', 'A'); values are Python literals if they parse.

  The argparse `type=` of both CLIs (layout, convert), so a malformed override
  is reported as a usage error.
  """
  if '=' not in text:
    raise argparse.ArgumentTypeError(
        f'override {text!r} must look like field=value, e.g. shortcut=A')
  key, value = text.split('=', 1)
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value

"""The ResNet Linen module: one module, driven entirely by a ResNetSpec."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_resnet import layers
from flax_resnet.spec import ResNetSpec

ModuleDef = Any


class ResidualBlock(nn.Module):
  """Basic or bottleneck block, post- or pre-activation.

  Submodule names follow torchvision (conv1/bn1/...), so conversion is a
  rename and the layout table can name the conv that carries the stride.
  """
  block: str
  out_channels: int
  width: int
  stride: int
  groups: int
  stride_in: str
  preact: bool
  shortcut_mode: Optional[str]
  zero_pad: str
  zero_init_last_bn: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  conv_bias: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x):
    if self.block == 'basic':
      convs = [(self.out_channels, 3, self.stride, 1),
               (self.out_channels, 3, 1, 1)]
    else:
      reduce_stride = self.stride if self.stride_in == '1x1' else 1
      middle_stride = self.stride if self.stride_in == '3x3' else 1
      convs = [(self.width, 1, reduce_stride, 1),
               (self.width, 3, middle_stride, self.groups),
               (self.out_channels, 1, 1, 1)]

    shortcut = None
    if self.shortcut_mode is not None:
      shortcut = layers.Shortcut(
          self.shortcut_mode, self.out_channels, self.stride, self.conv,
          None if self.preact else self.norm, self.zero_pad,
          use_bias='shortcut' in self.conv_bias, name='shortcut')

    if self.preact:
      out = nn.relu(self.norm(name='bn1')(x))
      out = layers.conv_input_barrier(out)
      # He et al. 2016 / Gluon V2: projections see the pre-activated input,
      # identity, option A and Keras V2's subsampling see the raw input.
      if shortcut is None:
        residual = x
      else:
        residual = shortcut(x if self.shortcut_mode in ('A', 'subsample')
                            else out)
      y = out
      for i, (features, kernel, stride, groups) in enumerate(convs):
        if i:
          y = nn.relu(self.norm(name=f'bn{i + 1}')(y))
          y = layers.conv_input_barrier(y)
        y = self.conv(features, kernel, stride, groups=groups,
                      use_bias=f'conv{i + 1}' in self.conv_bias,
                      name=f'conv{i + 1}')(y)
      return y + _same_shape(self, y, residual)

    residual = x if shortcut is None else shortcut(x)
    y = x
    last = len(convs) - 1
    for i, (features, kernel, stride, groups) in enumerate(convs):
      y = self.conv(features, kernel, stride, groups=groups,
                    use_bias=f'conv{i + 1}' in self.conv_bias,
                    name=f'conv{i + 1}')(y)
      scale_init = (nn.initializers.zeros
                    if i == last and self.zero_init_last_bn else
                    nn.initializers.ones)
      y = self.norm(scale_init=scale_init, name=f'bn{i + 1}')(y)
      if i != last:
        y = nn.relu(y)
        y = layers.conv_input_barrier(y)
    return nn.relu(y + _same_shape(self, y, residual))


def _same_shape(block: ResidualBlock, main, residual):
  """The residual, or a ValueError naming the block where the paths disagree."""
  if main.shape != residual.shape:
    raise ValueError(
        f'{block.name}: the main path gives {main.shape[1]}x{main.shape[2]}x'
        f'{main.shape[3]} but the shortcut ({block.shortcut_mode}, stride '
        f'{block.stride}) gives {residual.shape[1]}x{residual.shape[2]}x'
        f'{residual.shape[3]} at this input size. ResNet-D\'s 2x2 pool cannot '
        'follow a stride above 2 at every size: use strides of 1 or 2, '
        "shortcut='B', or an input size where both agree.")
  return residual


def check_images(spec: ResNetSpec, x, train: bool, variables) -> None:
  """Input checks that would otherwise surface as wrong nets or tracebacks."""
  if any(d == 0 for d in x.shape):
    raise ValueError(
        f'images have shape {tuple(x.shape)}: the batch, height and width '
        'must each be at least 1.')
  stem = variables.get('params', {}).get('stem', {})
  first = stem.get('conv1_1' if spec.stem == 'deep' else 'conv1', {})
  kernel = first.get('kernel') if hasattr(first, 'get') else None
  if kernel is not None and kernel.shape[2] != x.shape[-1]:
    raise ValueError(
        f'images have {x.shape[-1]} channels (shape {tuple(x.shape)}, NHWC) '
        f'but this net was built for {kernel.shape[2]}: its stem kernel is '
        f'{tuple(kernel.shape)}. Give {kernel.shape[2]}-channel images (e.g. '
        'drop an alpha channel with x[..., :3]) or transpose NCHW input with '
        'x.transpose(0, 2, 3, 1).')
  if x.shape[1] <= 4 and x.shape[3] > 4 and x.shape[2] > 4:
    raise ValueError(
        f'images of shape {tuple(x.shape)} look like NCHW (channels first): '
        f'this would build a net with {x.shape[3]} input channels. The model '
        'takes NHWC: transpose with x.transpose(0, 2, 3, 1).')
  del train


def check_batch_norm_input(x, train: bool) -> None:
  """torch's rule: training BatchNorm needs more than one value per channel."""
  if train and x.shape[0] * x.shape[1] * x.shape[2] < 2:
    raise ValueError(
        f'Expected more than 1 value per channel when training: the last '
        f'feature map is {tuple(x.shape)} (batch {x.shape[0]}, '
        f'{x.shape[1]}x{x.shape[2]}), so its BatchNorms would normalise every '
        'value to 0 (constant logits, zero gradients). Use a batch of at '
        'least 2, a larger input, or train=False.')


class Stem(nn.Module):
  kind: str
  width: int
  padding_mode: str
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  norm_act: bool = True  # BN + ReLU after the conv: ResNetSpec.has_stem_norm
  use_bias: bool = False
  input_norm: bool = False
  pool_padding: str = '-inf'

  @nn.compact
  def __call__(self, x):
    if self.input_norm:
      # Gluon V2's "data" BatchNorm(scale=False, center=False).
      x = self.norm(use_scale=False, use_bias=False, name='input_bn')(x)
    bias = self.use_bias
    if self.kind == 'deep':
      half = self.width // 2
      for i, (features, stride) in enumerate([(half, 2), (half, 1)]):
        x = self.conv(features, 3, stride, use_bias=bias,
                      name=f'conv1_{i + 1}')(x)
        x = nn.relu(self.norm(name=f'bn1_{i + 1}')(x))
        x = layers.conv_input_barrier(x)
      x = self.conv(self.width, 3, 1, use_bias=bias, name='conv1_3')(x)
    elif self.kind == 'imagenet':
      x = self.conv(self.width, 7, 2, use_bias=bias, name='conv1')(x)
    else:
      x = self.conv(self.width, 3, 1, use_bias=bias, name='conv1')(x)
    if self.norm_act:
      # A pre-activation net normalises at the start of the first block.
      x = nn.relu(self.norm(name='bn1')(x))
    if self.kind != 'cifar':
      x = layers.MaxPool(3, 2, self.padding_mode, self.pool_padding,
                         name='pool')(x)
    return x


def shortcut_mode(kind: str, stride: int, in_channels: int,
                  out_channels: int, pool_shortcut: bool = False
                  ) -> Optional[str]:
  """Which skip path a block gets under shortcut option A/B/C/D."""
  shape_changes = stride != 1 or in_channels != out_channels
  if kind == 'C':
    return 'conv'
  if not shape_changes:
    return None
  if pool_shortcut and in_channels == out_channels:
    return 'subsample'
  return {'A': 'A', 'B': 'conv', 'D': 'avgpool_conv'}[kind]


class ResNet(nn.Module):
  """ResNet of any depth, shortcut option, stride placement or activation order.

  Call as `model.apply(variables, images, train=False)` with NHWC float images.
  Train mode updates `batch_stats` (pass mutable=['batch_stats']). Per-stage
  features are sown into the 'intermediates' collection as 'stem_out',
  'stage1', 'stage2', ... (pass mutable=['intermediates']).
  """
  spec: ResNetSpec

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = self.spec
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(
          f'images must be a rank-4 NHWC batch (batch, height, width, '
          f'channels); got shape {getattr(x, "shape", None)}. Add a batch axis '
          'with x[None] or transpose NCHW input with x.transpose(0, 2, 3, 1).')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(
          f'images have dtype {x.dtype}; the model expects normalised floats. '
          'Convert with images.astype(jnp.float32) / 255 and normalise.')
    check_images(spec, x, train, self.variables)
    conv = layers.make_conv(spec.padding, spec.dtype, spec.param_dtype)
    norm = layers.make_norm(train, spec.bn_momentum, spec.bn_eps, spec.dtype,
                            spec.param_dtype)

    x = Stem(spec.stem, spec.stem_width, spec.padding, conv, norm,
             norm_act=spec.has_stem_norm, use_bias='stem' in spec.conv_bias,
             input_norm=spec.input_norm, pool_padding=spec.pool_padding,
             name='stem')(x)
    x = layers.fusion_barrier(x)
    # Not 'stem': a sown name may not repeat a submodule's name in one scope.
    self.sow('intermediates', 'stem_out', x)
    in_channels = spec.stem_width
    for stage, depth in enumerate(spec.depths):
      out_channels = spec.stage_out_channels(stage)
      for index in range(depth):
        stride = spec.block_stride(stage, index)
        x = ResidualBlock(
            block=spec.block,
            out_channels=out_channels,
            width=spec.bottleneck_width(stage),
            stride=stride,
            groups=spec.groups,
            stride_in=spec.stride_in,
            preact=spec.preact,
            shortcut_mode=shortcut_mode(spec.shortcut, stride, in_channels,
                                        out_channels, spec.pool_shortcut),
            zero_pad=spec.zero_pad,
            zero_init_last_bn=spec.zero_init_last_bn,
            conv=conv,
            norm=norm,
            conv_bias=spec.conv_bias,
            name=f'stage{stage + 1}_block{index}')(x)
        x = layers.fusion_barrier(x)
        in_channels = out_channels
      self.sow('intermediates', f'stage{stage + 1}', x)
    check_batch_norm_input(x, train)
    if spec.preact:
      x = nn.relu(norm(name='final_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(spec.num_classes, dtype=spec.dtype,
                 param_dtype=spec.param_dtype, name='fc')(x)
    return x.astype(jnp.float32)

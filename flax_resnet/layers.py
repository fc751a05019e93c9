"""Building blocks shared by every variant: convs, BatchNorm, pools, shortcuts.

Pools and the shortcut are Linen modules (not bare functions) so that the
layout table can observe them when it traces the model. What makes them fast
on CPU (oneDNN convolutions, the BatchNorm gradient, fusion barriers, the
max-pool gradient) lives in `flax_resnet.cpu`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from flax_resnet.cpu import batch_norm
from flax_resnet.cpu import conv_general_dilated
from flax_resnet.cpu import conv_input_barrier  # the model calls both barriers
from flax_resnet.cpu import fusion_barrier
from flax_resnet.cpu import max_pool

ModuleDef = Any

# torchvision initialises convs with kaiming_normal_(mode='fan_out').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric padding k // 2 on both sides.

  XLA's 'SAME' pads (0, 1) for a stride-2 3x3 on even inputs and (2, 3) for
  the 7x7 stem: same output shape, windows shifted by one pixel.
  """
  p = (kernel - 1) // 2
  return ((p, p), (p, p))


def make_conv(padding_mode: str, dtype, param_dtype) -> Callable[..., nn.Conv]:
  """Returns conv(features, kernel, stride, name, groups) -> nn.Conv."""

  def conv(features: int, kernel: int, stride: int = 1, *, name: str,
           groups: int = 1, use_bias: bool = False) -> nn.Conv:
    padding = 'SAME' if padding_mode == 'same' else torch_padding(kernel)
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding,
        feature_group_count=groups, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=conv_kernel_init, name=name,
        conv_general_dilated=conv_general_dilated)

  return conv


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm`, whose training gradient is written out.

  A drop-in subclass: same fields, variables (params scale/bias, batch_stats
  mean/var), running averages, dtypes and forward arithmetic, so checkpoints
  and converted weights are interchangeable and outputs bit-identical. For
  the configuration the model uses (channels last, fast variance, float32
  statistics, no axis_name or mask) training goes through
  `flax_resnet.cpu.batch_norm`; anything else is Flax's own code.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *,
               mask=None):
    if (self.axis not in (-1, x.ndim - 1) or self.axis_name is not None
        or mask is not None or not self.use_fast_variance
        or not self.force_float32_reductions):
      return super().__call__(x, use_running_average, mask=mask)
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    channels = (x.shape[-1],)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, channels,
                                 jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, channels,
                                jnp.float32)
    scale = bias = None
    if self.use_scale:
      scale = self.param('scale', self.scale_init, channels, self.param_dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, channels, self.param_dtype)
    dtype = self.dtype or jnp.result_type(
        x, *(p for p in (scale, bias) if p is not None))
    # Flax promotes the per-channel terms to float32 (force_float32_reductions).
    scale = (jnp.ones(channels, jnp.float32) if scale is None
             else jnp.asarray(scale, jnp.promote_types(scale.dtype,
                                                       jnp.float32)))
    bias = (jnp.zeros(channels, jnp.float32) if bias is None
            else jnp.asarray(bias, jnp.promote_types(bias.dtype, jnp.float32)))
    if use_running_average:
      return batch_norm.normalize(x, running_mean.value, running_var.value,
                                  scale, bias, self.epsilon, dtype)
    y, mean, var = batch_norm.batch_norm_train(x, scale, bias, self.epsilon,
                                               dtype)
    if not self.is_initializing():
      momentum = self.momentum
      running_mean.value = momentum * running_mean.value + (1 - momentum) * mean
      running_var.value = momentum * running_var.value + (1 - momentum) * var
    return y


def make_norm(train: bool, momentum: float, eps: float, dtype,
              param_dtype) -> Callable[..., BatchNorm]:
  return functools.partial(
      BatchNorm, use_running_average=not train, momentum=momentum,
      epsilon=eps, dtype=dtype, param_dtype=param_dtype)


class MaxPool(nn.Module):
  """3x3/2 max-pool; torch pads (1, 1) with -inf, XLA SAME pads (0, 1).

  pad_value 'zeros' pads with zeros first and pools VALID, as Keras'
  ZeroPadding2D + MaxPooling2D do; it differs from -inf only where the input
  can be negative (no ReLU before the pool, Keras ResNetV2).
  """
  window: int = 3
  stride: int = 2
  padding_mode: str = 'torch'
  pad_value: str = '-inf'

  @nn.compact
  def __call__(self, x):
    if self.padding_mode == 'same':
      pads = lax.padtype_to_pads(x.shape[1:3], (self.window,) * 2,
                                 (self.stride,) * 2, 'SAME')
    else:
      pads = torch_padding(self.window)
    pads = tuple(tuple(p) for p in pads)
    if self.pad_value == 'zeros':
      x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
      pads = ((0, 0), (0, 0))
    return max_pool(x, self.window, self.stride, pads)


class AvgPool(nn.Module):
  """ResNet-D shortcut pool: ceil_mode=True, count_include_pad=False."""
  window: int = 2
  stride: int = 2

  @nn.compact
  def __call__(self, x):
    pads = []
    for size in x.shape[1:3]:
      out = -(-(size - self.window) // self.stride) + 1
      pads.append((0, max(0, (out - 1) * self.stride + self.window - size)))
    return nn.avg_pool(x, (self.window,) * 2, (self.stride,) * 2,
                       padding=tuple(pads), count_include_pad=False)


class Shortcut(nn.Module):
  """The residual branch's skip path.

  mode 'A': subsample x[::s, ::s] and zero-pad channels (no parameters).
  mode 'conv': 1x1 projection with the block's stride (+ BN unless preact).
  mode 'avgpool_conv': 2x2 avg-pool with the stride, then 1x1/1 conv + BN.
  mode 'subsample': x[::s, ::s], Keras ResNetV2's MaxPooling2D(1, strides=s).
  """
  mode: str
  out_channels: int
  stride: int
  conv: Callable[..., nn.Module]
  norm: Optional[Callable[..., nn.Module]]
  zero_pad: str = 'both'
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    if self.mode == 'subsample':
      return x[:, ::self.stride, ::self.stride, :]
    if self.mode == 'A':
      if self.stride > 1:
        x = x[:, ::self.stride, ::self.stride, :]
      extra = self.out_channels - x.shape[-1]
      before = extra // 2 if self.zero_pad == 'both' else 0
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (before, extra - before)))
    if self.mode == 'avgpool_conv':
      if self.stride > 1:
        x = AvgPool(2, self.stride, name='pool')(x)
      x = self.conv(self.out_channels, 1, 1, name='conv',
                    use_bias=self.use_bias)(x)
    elif self.mode == 'conv':
      x = self.conv(self.out_channels, 1, self.stride, name='conv',
                    use_bias=self.use_bias)(x)
    else:
      raise ValueError(f'unknown shortcut mode {self.mode!r}')
    if self.norm is not None:
      x = self.norm(name='bn')(x)
    return x

"""Building blocks shared by every variant: padded convs, pools and shortcuts.

Pools and the shortcut are Linen modules (not bare functions) so that the
layout table can observe them when it traces the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

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


_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _pointwise_grads_as_dots(x, kernel, grad, *, strides, precision):
  """Gradients of a 1x1 conv as two matmuls, laid out for XLA:CPU.

  XLA's own gradient takes x transposed: x is most often the residual stream,
  a chain of BatchNorm/ReLU/add that XLA:CPU re-evaluates inside every fusion
  that transposes it (a quarter of a ResNet-50 train step). Computing
  kernel_grad^T = g^T x transposes the gradient instead, and x is read where
  it is stored.
  """
  in_ch, out_ch = kernel.shape[2:]
  x_sub = x[:, ::strides[0], ::strides[1], :]
  grad = grad.reshape(-1, out_ch)
  kernel_grad = lax.dot_general(
      grad, x_sub.reshape(-1, in_ch), (((0,), (0,)), ((), ())),
      precision=precision).T.reshape(kernel.shape)
  x_grad = lax.dot_general(
      grad, kernel.reshape(in_ch, out_ch), (((1,), (1,)), ((), ())),
      precision=precision).reshape(x_sub.shape)
  if strides != (1, 1):
    # Back onto the strided input grid; XLA's own rule convolves over the
    # zero-dilated gradient instead, doing strides**2 times the work.
    pads = [(0, 0, 0)]
    for axis, stride in ((1, strides[0]), (2, strides[1])):
      used = (x_sub.shape[axis] - 1) * stride + 1
      pads.append((0, x.shape[axis] - used, stride - 1))
    pads.append((0, 0, 0))
    x_grad = lax.pad(x_grad, jnp.zeros((), x_grad.dtype), pads)
  return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


def _strided_input_grad_by_phases(x, kernel, grad, *, strides, padding,
                                  precision):
  """Input gradient of a strided conv as stride-1 convs, one per phase.

  XLA's rule convolves the kernel over the gradient dilated with zeros, which
  on XLA:CPU (no dilation-aware kernel) does strides**2 times the work. Input
  rows h with h % s == a only receive taps a, a + s, ...; so each phase (a, b)
  of the padded input is the gradient of a stride-1 VALID conv with the
  sub-kernel kernel[a::s, b::s], taken with jax.vjp, then put back onto the
  strided grid with interior padding.
  """
  (top, bottom), (left, right) = padding
  padded = (x.shape[1] + top + bottom, x.shape[2] + left + right)
  out_h, out_w = grad.shape[1:3]
  total = None
  for a in range(min(strides[0], kernel.shape[0])):
    for b in range(min(strides[1], kernel.shape[1])):
      sub_kernel = kernel[a::strides[0], b::strides[1]]
      rows = out_h + sub_kernel.shape[0] - 1
      cols = out_w + sub_kernel.shape[1] - 1
      phase = jax.ShapeDtypeStruct((x.shape[0], rows, cols, x.shape[3]),
                                   x.dtype)
      conv = lambda phase_x, sub_kernel=sub_kernel: lax.conv_general_dilated(
          phase_x, sub_kernel, (1, 1), 'VALID', dimension_numbers=_NHWC,
          precision=precision)
      phase_grad, = jax.vjp(conv, jnp.zeros(phase.shape, phase.dtype))[1](
          grad)
      placed = lax.pad(phase_grad, jnp.zeros((), phase_grad.dtype), [
          (0, 0, 0),
          (a, padded[0] - a - (rows - 1) * strides[0] - 1, strides[0] - 1),
          (b, padded[1] - b - (cols - 1) * strides[1] - 1, strides[1] - 1),
          (0, 0, 0)])
      total = placed if total is None else total + placed
  return total[:, top:top + x.shape[1], left:left + x.shape[2], :]


def _stock_conv_grads(x, kernel, grad, *, strides, padding, precision):
  conv = lambda x, kernel: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC,
      precision=precision)
  return jax.vjp(conv, x, kernel)[1](grad)


def _strided_grads_by_phases(x, kernel, grad, *, strides, padding, precision):
  conv_of_kernel = lambda kernel: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=_NHWC,
      precision=precision)
  kernel_grad, = jax.vjp(conv_of_kernel, kernel)[1](grad)
  x_grad = _strided_input_grad_by_phases(
      x, kernel, grad, strides=strides, padding=padding, precision=precision)
  return x_grad.astype(x.dtype), kernel_grad


def _is_pointwise(kernel_shape, padding) -> bool:
  return kernel_shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)


def _cpu_conv_grads(x, kernel, grad, *, strides, padding, precision):
  if _is_pointwise(kernel.shape, padding):
    return _pointwise_grads_as_dots(x, kernel, grad, strides=strides,
                                    precision=precision)
  return _strided_grads_by_phases(x, kernel, grad, strides=strides,
                                  padding=padding, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_with_cpu_grads(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_NHWC, precision=precision)


def _conv_with_cpu_grads_fwd(x, kernel, strides, padding, precision):
  return (_conv_with_cpu_grads(x, kernel, strides, padding, precision),
          (x, kernel))


def _conv_with_cpu_grads_bwd(strides, padding, precision, residuals, grad):
  x, kernel = residuals
  kw = dict(strides=strides, padding=padding, precision=precision)
  # Only XLA:CPU gets the rewritten gradients; elsewhere they are jax's own.
  return lax.platform_dependent(
      x, kernel, grad,
      cpu=functools.partial(_cpu_conv_grads, **kw),
      default=functools.partial(_stock_conv_grads, **kw))


_conv_with_cpu_grads.defvjp(_conv_with_cpu_grads_fwd,
                            _conv_with_cpu_grads_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`, with faster XLA:CPU gradients.

  The forward pass is always the same `lax.conv_general_dilated` call. On CPU,
  a plain NHWC conv (no dilation or groups) differentiates through
  `_pointwise_grads_as_dots` if it is 1x1 and unpadded, and through
  `_strided_grads_by_phases` if it is strided; every other conv, and every
  conv on other platforms, keeps XLA's own gradient.
  """
  no_dilation = all(
      d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  plain_nhwc = (
      lhs.ndim == 4 and feature_group_count == 1 and no_dilation and
      not kwargs and lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
  if plain_nhwc:
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2],
                                    window_strides, padding)
    padding = tuple(tuple(p) for p in padding)
    if (_is_pointwise(rhs.shape, padding) or
        any(s > 1 for s in window_strides)):
      return _conv_with_cpu_grads(lhs, rhs, tuple(window_strides), padding,
                                  precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


def _identity_xla_cannot_see_through(x):
  # A stable sort on keys that are already in order: exactly x, but XLA's
  # simplifier cannot prove it, so the conditional below survives.
  keys = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return lax.sort((keys, x), dimension=0, num_keys=1)[1]


def _materialize(x):
  # A conditional is never fused, so its result is written to memory once and
  # every consumer reads it there. The predicate only has to be unknown at
  # compile time; both branches return x exactly.
  first = x.reshape(-1)[0]
  return lax.cond(jnp.isfinite(first), lambda x: x,
                  _identity_xla_cannot_see_through, x)


@jax.custom_vjp
def _cpu_fusion_barrier(x):
  return _materialize(x)


def _cpu_fusion_barrier_fwd(x):
  return _materialize(x), None


def _cpu_fusion_barrier_bwd(_, grad):
  # Materialising the cotangents too was measured slower (extra copies).
  return (grad,)


_cpu_fusion_barrier.defvjp(_cpu_fusion_barrier_fwd,
                           _cpu_fusion_barrier_bwd)


def fusion_barrier(x):
  """Returns x, computed once into memory on XLA:CPU; a no-op elsewhere.

  XLA:CPU duplicates elementwise producers into every consumer fusion. A
  ResNet's residual stream is a chain of BatchNorm/add/ReLU across a whole
  stage, so each weight-gradient transpose, ReLU mask and residual add of a
  block recomputed the BatchNorms of all the blocks before it (half of a
  resnet20 train step; see BENCHMARKS.md). `lax.optimization_barrier` does
  not help: XLA:CPU expands it away before fusion. The model calls this on
  every activation that feeds a convolution and on every block output.

  Skipped when more than one device takes part: the predicate reads one
  element, which on a sharded batch would cost a collective per call.
  """
  if jax.device_count() > 1:
    return x
  return lax.platform_dependent(x, cpu=_cpu_fusion_barrier,
                                default=lambda x: x)


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


def make_norm(train: bool, momentum: float, eps: float, dtype,
              param_dtype) -> Callable[..., nn.BatchNorm]:
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=momentum,
      epsilon=eps, dtype=dtype, param_dtype=param_dtype)


def _stock_max_pool_grad(x, grad, *, window, stride, pads):
  pool = lambda x: nn.max_pool(x, (window,) * 2, (stride,) * 2, pads)
  return jax.vjp(pool, x)[1](grad)[0]


def _max_pool_grad_by_mask(x, pooled, grad, *, window, stride, pads):
  """Routes each output's gradient to the first maximum of its window.

  The same rule as XLA's select-and-scatter (the first element, in row-major
  window order, that equals the maximum), but as masks and strided pads:
  XLA:CPU expands select-and-scatter into index tensors and a scatter, several
  times slower.
  """
  (top, bottom), (left, right) = pads
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)),
                   constant_values=-jnp.inf)
  out_h, out_w = pooled.shape[1:3]
  taken = jnp.zeros(pooled.shape, jnp.bool_)
  total = None
  for i in range(window):
    for j in range(window):
      end = (i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1)
      candidate = lax.slice(padded, (0, i, j, 0),
                            (x.shape[0], *end, x.shape[3]),
                            (1, stride, stride, 1))
      hit = (candidate == pooled) & ~taken
      taken = taken | hit
      part = lax.pad(
          jnp.where(hit, grad, jnp.zeros((), grad.dtype)),
          jnp.zeros((), grad.dtype),
          [(0, 0, 0), (i, padded.shape[1] - end[0], stride - 1),
           (j, padded.shape[2] - end[1], stride - 1), (0, 0, 0)])
      total = part if total is None else total + part
  return total[:, top:top + x.shape[1], left:left + x.shape[2], :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, pads):
  return nn.max_pool(x, (window,) * 2, (stride,) * 2, pads)


def _max_pool_fwd(x, window, stride, pads):
  pooled = _max_pool(x, window, stride, pads)
  return pooled, (x, pooled)


def _max_pool_bwd(window, stride, pads, residuals, grad):
  x, pooled = residuals
  kw = dict(window=window, stride=stride, pads=pads)
  return (lax.platform_dependent(
      x, pooled, grad,
      cpu=functools.partial(_max_pool_grad_by_mask, **kw),
      default=lambda x, pooled, grad: _stock_max_pool_grad(x, grad, **kw)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
    return _max_pool(x, self.window, self.stride, pads)


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

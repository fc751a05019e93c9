"""Convolution gradients laid out for XLA:CPU's own (Eigen) convolutions.

Used on CPU when the oneDNN extension (`flax_resnet.cpu.onednn`) is not
available: the forward pass stays `lax.conv_general_dilated`, and only the
gradients of 1x1 and strided convs are rewritten (see BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
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
          phase_x, sub_kernel, (1, 1), 'VALID', dimension_numbers=NHWC,
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
      x, kernel, strides, padding, dimension_numbers=NHWC,
      precision=precision)
  return jax.vjp(conv, x, kernel)[1](grad)


def _strided_grads_by_phases(x, kernel, grad, *, strides, padding, precision):
  conv_of_kernel = lambda kernel: lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=NHWC,
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
                                  dimension_numbers=NHWC, precision=precision)


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
  """`lax.conv_general_dilated`, with gradients that suit XLA's own CPU convs.

  The path taken when the oneDNN extension is unavailable.

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
          lhs.shape, rhs.shape, dimension_numbers) == NHWC)
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

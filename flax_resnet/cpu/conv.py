"""The conv function the model's `nn.Conv`s call: the fastest exact CPU path.

A drop-in for `lax.conv_general_dilated` (the `conv_general_dilated` argument
of `flax.linen.Conv`). Plain NHWC x HWIO convs with strides, explicit or
string padding and feature groups go to oneDNN on CPU when the extension is
available (`onednn.py`); without it, 1x1 and strided convs keep XLA's forward
with gradients laid out for XLA:CPU (`xla_conv.py`). Everything else, and
every conv on GPU/TPU, is XLA's own.

Skipped when more than one device takes part (several CPU devices in one
process, or jax.distributed): XLA's SPMD partitioner knows no sharding rule
for the custom calls and would gather the whole batch onto every device.
"""

from __future__ import annotations

import jax
from jax import lax

from flax_resnet.cpu import onednn
from flax_resnet.cpu import xla_conv


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`, run by oneDNN on CPU where it can be."""
  no_dilation = all(
      d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  plain_nhwc = (
      jax.device_count() == 1 and lhs.ndim == 4 and no_dilation and not kwargs and
      lhs.dtype == rhs.dtype and
      lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                 dimension_numbers) == onednn.NHWC)
  if plain_nhwc:
    strides = tuple(int(s) for s in window_strides)
    pads = padding
    if isinstance(pads, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, pads)
    pads = tuple(tuple(int(p) for p in pair) for pair in pads)
    if onednn.supports(lhs.shape, rhs.shape, lhs.dtype, strides, pads,
                       feature_group_count):
      return onednn.conv(lhs, rhs, strides, pads, feature_group_count)
  return xla_conv.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)

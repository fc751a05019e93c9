"""Max-pool whose XLA:CPU gradient avoids select-and-scatter."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


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
def max_pool(x, window, stride, pads):
  return nn.max_pool(x, (window,) * 2, (stride,) * 2, pads)


def _max_pool_fwd(x, window, stride, pads):
  pooled = max_pool(x, window, stride, pads)
  return pooled, (x, pooled)


def _max_pool_bwd(window, stride, pads, residuals, grad):
  x, pooled = residuals
  kw = dict(window=window, stride=stride, pads=pads)
  return (lax.platform_dependent(
      x, pooled, grad,
      cpu=functools.partial(_max_pool_grad_by_mask, **kw),
      default=lambda x, pooled, grad: _stock_max_pool_grad(x, grad, **kw)),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)

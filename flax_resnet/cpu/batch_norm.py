"""Training-mode BatchNorm with its gradient written out (for XLA:CPU).

Autodiff of Flax's BatchNorm gives XLA:CPU a gradient that materialises
`x - mean` as a full-size array (YNNPACK's reductions take their operands from
memory) and splits the rest into more passes than the math needs: 17 % of a
resnet20 train step (BENCHMARKS.md). The backward below reads `x` and `dy`
twice, once for the two per-channel sums and once for `dx`, which is what
PyTorch's kernel does. The forward is Flax's, op for op (fast variance, float32
statistics), so outputs and batch statistics are bit-identical to
`flax.linen.BatchNorm`'s.

The gradient is the same math on every platform, so GPU/TPU run it too:
choosing autodiff's there with `lax.platform_dependent` doubled the time to
trace a resnet50 train step (1.2 -> 2.5 s), and this two-reduction formula
is the one PyTorch's and cuDNN's BatchNorm backward kernels use as well.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp


def statistics(x):
  """Per-channel (mean, var) over all but the last axis, as Flax computes them.

  float32 at least; var = E[x^2] - E[x]^2, clipped at 0 (Flax's
  use_fast_variance=True).
  """
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axes)
  mean_of_squares = jnp.mean(jnp.square(x), axes)
  return mean, jnp.maximum(0.0, mean_of_squares - jnp.square(mean))


def normalize(x, mean, var, scale, bias, epsilon, dtype):
  """(x - mean) * (rsqrt(var + eps) * scale) + bias, in Flax's operation order."""
  multiplier = lax.rsqrt(var + epsilon) * scale
  return jnp.asarray((x - mean) * multiplier + bias, dtype)


def _forward(x, scale, bias, epsilon, dtype):
  mean, var = statistics(x)
  return normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _train(x, scale, bias, epsilon, dtype):
  return _forward(x, scale, bias, epsilon, dtype)


def _train_fwd(x, scale, bias, epsilon, dtype):
  y, mean, var = _forward(x, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, var, scale)


def _train_bwd(epsilon, dtype, residuals, cotangents):
  del dtype
  x, mean, var, scale = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  inv_std = lax.rsqrt(var + epsilon)
  x32 = x.astype(mean.dtype)
  dy32 = dy.astype(mean.dtype)
  dbias = jnp.sum(dy32, axes)
  # sum(dy * (x - mean)) as sum(dy * x) - mean * sum(dy): reducing x - mean
  # would make XLA write it out in full first. The cancellation is the one
  # Flax's fast variance already accepts in the forward pass.
  dscale = (jnp.sum(dy32 * x32, axes) - mean * dbias) * inv_std
  gain = scale * inv_std
  # dx = gain * (dy - dbias/m - xhat * dscale/m), plus the paths through the
  # mean and var outputs (zero unless a loss uses the batch statistics).
  per_x = (dscale * gain * inv_std - 2.0 * dvar) / count
  offset = (dbias * gain - dmean) / count - mean * per_x
  dx = gain * dy32 - x32 * per_x - offset
  return (dx.astype(x.dtype), dscale.astype(scale.dtype),
          dbias.astype(scale.dtype))


_train.defvjp(_train_fwd, _train_bwd)


def batch_norm_train(x, scale, bias, epsilon: float, dtype):
  """Training-mode BatchNorm over all but the last axis: (y, mean, var).

  Args:
    x: activations, channels last.
    scale, bias: per-channel float arrays (ones / zeros where unused).
    epsilon: added to the variance.
    dtype: dtype of y.

  Returns:
    y, and the batch's float32 mean and (biased) variance, which the caller
    folds into its running averages.
  """
  return _train(x, scale, bias, float(epsilon), jnp.dtype(dtype))

"""A fusion barrier for XLA:CPU: materialise a value once, exactly."""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from flax_resnet.cpu import onednn


def _identity_xla_cannot_see_through(x):
  # A stable sort on keys that are already in order: exactly x, but XLA's
  # simplifier cannot prove it, so the conditional below survives.
  keys = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return lax.sort((keys, x), dimension=0, num_keys=1)[1]


def _aliasing_call(x):
  # An opaque call whose result aliases its operand (onednn_conv.cc): no
  # copy, where the conditional below costs one (3 % of a resnet20 train
  # step, BENCHMARKS.md).
  return jax.ffi.ffi_call(
      onednn.MATERIALIZE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
      input_output_aliases={0: 0}, vmap_method='broadcast_all')(x)


def _conditional_copy(x):
  # A conditional is never fused, so its result is written to memory once and
  # every consumer reads it there. The predicate only has to be unknown at
  # compile time; both branches return x exactly.
  first = x.reshape(-1)[0]
  return lax.cond(jnp.isfinite(first), lambda x: x,
                  _identity_xla_cannot_see_through, x)


def _with_identity_gradient(materialize):
  @jax.custom_vjp
  def barrier(x):
    return materialize(x)

  def barrier_fwd(x):
    return materialize(x), None

  def barrier_bwd(_, grad):
    # Materialising the cotangents too was measured slower (extra copies).
    return (grad,)

  barrier.defvjp(barrier_fwd, barrier_bwd)
  return barrier


_extension_barrier = _with_identity_gradient(_aliasing_call)
_conditional_barrier = _with_identity_gradient(_conditional_copy)


def _cpu_barrier():
  """The extension's call where it is loaded, else the conditional."""
  return _extension_barrier if onednn.available() else _conditional_barrier


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
  return lax.platform_dependent(x, cpu=_cpu_barrier(), default=lambda x: x)


def conv_input_barrier(x):
  """`fusion_barrier` for a value only convolutions consume.

  Needed where XLA runs those convolutions (its fusions would recompute x
  per consumer). A oneDNN custom call reads its operand from memory anyway,
  so there the barrier would only add a copy: measured 3-13 % slower
  (BENCHMARKS.md), and it is skipped.
  """
  if onednn.available() and jax.device_count() == 1:
    return x
  return fusion_barrier(x)

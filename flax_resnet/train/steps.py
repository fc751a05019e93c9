"""TrainState and the pure train/eval step functions (jitted by the loop)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state

from flax_resnet import cpu


# XLA options for the steps on CPU: flax_resnet.cpu decides (only needed when
# XLA runs the convolutions itself, without the oneDNN extension).
CPU_COMPILER_OPTIONS = cpu.XLA_CONV_COMPILER_OPTIONS


def compiler_options(platform: Optional[str] = None) -> Optional[dict]:
  """XLA options for jitting the steps: `jax.jit(..., compiler_options=...)`.

  See `flax_resnet.cpu.compiler_options`; None on GPU/TPU, and on CPU when
  the oneDNN convolutions are in use.
  """
  return cpu.compiler_options(platform)


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array
  dynamic_scale: Optional[dynamic_scale_lib.DynamicScale] = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, image_shape, *,
                       float16: bool = False) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=tx,
      rng=state_rng,
      dynamic_scale=dynamic_scale_lib.DynamicScale() if float16 else None)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k highest logits, per example."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               num_classes: int, label_smoothing: float,
               learning_rate_fn: Callable[[jax.Array], jax.Array]):
  """One SGD step on a (globally sharded) batch. Pure: no side effects.

  BatchNorm statistics are means over the whole global batch: under jit with a
  batch-sharded input, XLA inserts the cross-device reductions itself.
  """

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'], train=True, mutable=['batch_stats'])
    loss = jnp.mean(cross_entropy(logits, batch['label'], num_classes,
                                  label_smoothing))
    return loss, (logits, updates['batch_stats'])

  if state.dynamic_scale is not None:
    dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = (
        state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)(
            state.params))
  else:
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.dynamic_scale is not None:
    # fp16: skip the update when the scaled gradients overflowed.
    keep_new = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(is_finite, n, o), new, old)
    new_state = new_state.replace(
        params=keep_new(new_state.params, state.params),
        opt_state=keep_new(new_state.opt_state, state.opt_state),
        batch_stats=keep_new(new_state.batch_stats, state.batch_stats),
        dynamic_scale=dynamic_scale)
  metrics = {
      'loss': loss,
      'top1': jnp.mean(top_k_correct(logits, batch['label'], 1)),
      'lr': learning_rate_fn(state.step),
      'grad_norm': optax.global_norm(grads),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              num_classes: int) -> dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of a padded eval batch."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, batch['label'], num_classes)
  return {
      'loss_sum': jnp.sum(loss * mask),
      'top1_sum': jnp.sum(top_k_correct(logits, batch['label'], 1) * mask),
      'top5_sum': jnp.sum(top_k_correct(logits, batch['label'], 5) * mask),
      'count': jnp.sum(mask),
  }

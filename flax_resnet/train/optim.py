"""Learning-rate schedules and optax optimizers, built from the config."""

from __future__ import annotations

import flax
import jax
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """config.learning_rate, scaled linearly with batch size if asked (Goyal)."""
  if config.lr_scaling == 'linear':
    return config.learning_rate * config.batch_size / config.base_batch_size
  return config.learning_rate


def create_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                    total_steps: int) -> optax.Schedule:
  """Warmup (linear or constant), then cosine / piecewise-constant / constant."""
  peak = peak_learning_rate(config)
  if config.warmup_steps >= 0:
    warmup = int(config.warmup_steps)
  else:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, total_steps)
  if config.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup))
  elif config.schedule == 'piecewise':
    boundaries = [int(b) for b in config.boundaries_steps] or [
        int(round(e * steps_per_epoch)) for e in config.boundaries_epochs]
    # Boundaries count from step 0 of the run, as in the paper (32k, 48k).
    main = optax.piecewise_constant_schedule(
        peak, {max(0, b - warmup): config.decay_factor for b in boundaries})
  else:
    main = optax.constant_schedule(peak)
  if warmup == 0:
    return main
  if config.warmup_mode == 'constant':
    # He et al. 2015, ResNet-110: hold a small lr, then jump to the peak.
    ramp = optax.constant_schedule(config.warmup_init_lr)
  else:
    ramp = optax.linear_schedule(config.warmup_init_lr, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def decay_mask(params, mode: str):
  """True for the leaves weight decay applies to.

  'kernels': conv and dense kernels only (not BN scale/bias or dense bias), as
  in the Flax ImageNet example and NVIDIA's recipe.
  """
  if mode == 'all':
    return jax.tree.map(lambda _: True, params)
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: path[-1] == 'kernel' for path in flat})


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  mask = lambda params: decay_mask(params, config.weight_decay_mask)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    if config.weight_decay > 0:
      # torch.optim.SGD semantics: decay is added to the gradient before the
      # momentum buffer.
      parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  elif config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay, mask=mask))
  elif config.optimizer == 'lars':
    parts.append(optax.lars(
        schedule, weight_decay=config.weight_decay, weight_decay_mask=mask,
        trust_coefficient=config.lars_trust_coefficient,
        trust_ratio_mask=mask, momentum=config.momentum,
        nesterov=config.nesterov))
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r} is not one of '
                     "'sgd', 'adamw', 'lars'.")
  return optax.chain(*parts)

"""The JAX side of benchmarks/run.py: our real jitted train and eval steps.

Variants of the same step differ in XLA compiler options and in which
gradients the model layers use, so 'before' and 'after' run side by side.
"""

import contextlib
import dataclasses
import functools
import time
from unittest import mock

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import flax_resnet
from flax_resnet import layers
from flax_resnet.train import optim
from flax_resnet.train import steps as steps_lib
from flax_resnet.train.config import default_config


@dataclasses.dataclass(frozen=True)
class Variant:
  """How our step is built, so each speed-up can be switched off.

  compiler_options: XLA options passed to jax.jit.
  cpu_gradients: flax_resnet.layers' XLA:CPU gradients (1x1 convs as dots,
    strided convs by phases, max-pool by masks); False swaps in plain
    lax.conv_general_dilated / nn.max_pool.
  fusion_barriers: layers.fusion_barrier as it is; False makes it identity.
  """
  compiler_options: tuple[tuple[str, str], ...]
  cpu_gradients: bool
  fusion_barriers: bool


_TUNED_OPTIONS = tuple(sorted(steps_lib.CPU_COMPILER_OPTIONS.items()))
VARIANTS = {
    # The step before the performance work.
    'stock': Variant((), False, False),
    # + steps.compiler_options(): no YNNPACK convolutions.
    'flags': Variant(_TUNED_OPTIONS, False, False),
    # + the XLA:CPU gradients of layers.py (1x1, strided conv, max-pool).
    'grads': Variant(_TUNED_OPTIONS, True, False),
    # + fusion barriers: the model as it ships.
    'tuned': Variant(_TUNED_OPTIONS, True, True),
}


@contextlib.contextmanager
def model_variant(variant: Variant):
  """While tracing, switches off the model-side speed-ups variant lacks."""
  with contextlib.ExitStack() as stack:
    if not variant.cpu_gradients:
      plain_pool = lambda x, window, stride, pads: nn.max_pool(
          x, (window,) * 2, (stride,) * 2, pads)
      stack.enter_context(mock.patch.object(
          layers, 'conv_general_dilated', lax.conv_general_dilated))
      stack.enter_context(mock.patch.object(layers, '_max_pool', plain_pool))
    if not variant.fusion_barriers:
      stack.enter_context(mock.patch.object(
          layers, 'fusion_barrier', lambda x: x))
    yield


def _benchmark_config(case):
  config = default_config()
  config.model = case.preset
  for key, value in case.overrides:
    config.model_overrides[key] = value
  config.num_classes = case.num_classes
  config.image_size = case.image_size
  config.batch_size = case.batch_size
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = False  # torch.optim.SGD's default, as on the torch side
  config.weight_decay = 1e-4
  config.weight_decay_mask = 'kernels'
  config.learning_rate = 0.1
  config.lr_scaling = 'none'
  config.schedule = 'constant'
  config.warmup_steps = 0
  config.label_smoothing = 0.0
  return config


class JaxContestant:
  """Our jitted train_step / eval_step on one fixed on-device batch."""

  def __init__(self, case, variant: Variant, seed: int = 0):
    """case: a run.Case."""
    config = _benchmark_config(case)
    schedule = optim.create_schedule(config, steps_per_epoch=100,
                                     total_steps=10_000)
    tx = optim.create_optimizer(config, schedule)
    model = flax_resnet.create_model(case.preset, num_classes=case.num_classes,
                                     **dict(case.overrides))
    image_shape = (case.image_size, case.image_size, 3)
    self.state = jax.jit(functools.partial(
        steps_lib.create_train_state, model, tx, image_shape=image_shape))(
            jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    images = rng.standard_normal(
        (case.batch_size, *image_shape)).astype(np.float32)
    labels = rng.integers(0, case.num_classes, case.batch_size)
    self.batch = {'image': jnp.asarray(images),
                  'label': jnp.asarray(labels, jnp.int32)}
    self.eval_batch = dict(self.batch,
                           mask=jnp.ones((case.batch_size,), jnp.bool_))
    self._variant = variant
    options = dict(variant.compiler_options) or None
    self.train_step = jax.jit(
        functools.partial(steps_lib.train_step, num_classes=case.num_classes,
                          label_smoothing=0.0, learning_rate_fn=schedule),
        donate_argnums=0, compiler_options=options)
    self.eval_step = jax.jit(
        functools.partial(steps_lib.eval_step, num_classes=case.num_classes),
        compiler_options=options)

  def compile(self) -> dict[str, float]:
    """Seconds to trace+lower and to compile each step (cache hits count)."""
    times = {}
    for name, fn, batch in (('train', self.train_step, self.batch),
                            ('eval', self.eval_step, self.eval_batch)):
      start = time.perf_counter()
      with model_variant(self._variant):
        lowered = fn.lower(self.state, batch)
      middle = time.perf_counter()
      lowered.compile()
      end = time.perf_counter()
      times[f'{name}_lower_s'] = round(middle - start, 2)
      times[f'{name}_compile_s'] = round(end - middle, 2)
    return times

  def train(self, steps: int) -> None:
    with model_variant(self._variant):
      for _ in range(steps):
        self.state, metrics = self.train_step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def eval(self, steps: int) -> None:
    with model_variant(self._variant):
      for _ in range(steps):
        out = self.eval_step(self.state, self.eval_batch)
    jax.block_until_ready(out)


def enable_cache(directory: str) -> None:
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

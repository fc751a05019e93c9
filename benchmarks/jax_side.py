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
import optax

import flax_resnet
from flax_resnet import layers
from flax_resnet.cpu import barrier
from flax_resnet.cpu import xla_conv
from flax_resnet.train import optim
from flax_resnet.train import steps as steps_lib
from flax_resnet.train.config import default_config


@dataclasses.dataclass(frozen=True)
class Variant:
  """How our step is built, so each speed-up can be switched off.

  compiler_options: XLA options passed to jax.jit.
  cpu_gradients: flax_resnet.cpu's XLA:CPU gradients (1x1 convs as dots,
    strided convs by phases, max-pool by masks); False swaps in plain
    lax.conv_general_dilated / nn.max_pool.
  fusion_barriers: layers.fusion_barrier and layers.conv_input_barrier as
    they are; False makes both identity.
  onednn: convolutions through the oneDNN extension (flax_resnet.cpu.onednn);
    False keeps XLA's convolutions with the cpu_gradients rewrites.
  user_jit: not the project's train_step but what a user writes after the
    README's "Use the models": a plain jax.jit of model.apply + optax, no
    compiler options, no donation.
  batch_norm_vjp: layers.BatchNorm (flax_resnet.cpu.batch_norm's gradient)
    and the extension's aliasing barrier; False swaps in flax.linen.BatchNorm
    (autodiff's gradient) and the conditional barrier that copies, as the
    model had them at commit c78c258.
  conv_input_barriers: barriers on conv inputs even with oneDNN convs (as
    the model had them before flax_resnet.cpu.conv_input_barrier).
  """
  compiler_options: tuple[tuple[str, str], ...]
  cpu_gradients: bool
  fusion_barriers: bool
  onednn: bool = True
  user_jit: bool = False
  batch_norm_vjp: bool = True
  conv_input_barriers: bool = False


_TUNED_OPTIONS = tuple(sorted(steps_lib.CPU_COMPILER_OPTIONS.items()))
_SHIPPED_OPTIONS = tuple(sorted((steps_lib.compiler_options('cpu') or {}).items()))
VARIANTS = {
    # The step before the performance work.
    'stock': Variant((), False, False, onednn=False, batch_norm_vjp=False),
    # + steps.compiler_options(): no YNNPACK convolutions.
    'flags': Variant(_TUNED_OPTIONS, False, False, onednn=False,
                     batch_norm_vjp=False),
    # + the XLA:CPU gradients (1x1, strided conv, max-pool).
    'grads': Variant(_TUNED_OPTIONS, True, False, onednn=False,
                     batch_norm_vjp=False),
    # + fusion barriers: the project's loop before oneDNN (commit 4a99299).
    'xla_tuned': Variant(_TUNED_OPTIONS, True, True, onednn=False,
                         batch_norm_vjp=False),
    # The same, in a user's plain jax.jit: what users got before oneDNN.
    'user_jit_xla': Variant((), True, True, onednn=False, user_jit=True,
                            batch_norm_vjp=False),
    # + oneDNN convolutions, in a user's plain jax.jit: the model of commit
    # c78c258, before the BatchNorm gradient.
    'user_jit_flax_bn': Variant((), True, True, user_jit=True,
                                batch_norm_vjp=False,
                                conv_input_barriers=True),
    # + oneDNN convolutions: the project's loop as it ships (it passes
    # steps.compiler_options(): none, once oneDNN runs the convolutions).
    'tuned': Variant(_SHIPPED_OPTIONS, True, True),
    # The model as it ships in a user's plain jax.jit + optax step.
    'user_jit': Variant((), True, True, user_jit=True),
    # Ablations of the model as it ships.
    'user_jit_no_barriers': Variant((), True, False, user_jit=True),
}


@contextlib.contextmanager
def model_variant(variant: Variant):
  """While tracing, switches off the model-side speed-ups variant lacks."""
  with contextlib.ExitStack() as stack:
    if variant.cpu_gradients and not variant.onednn:
      stack.enter_context(mock.patch.object(
          layers, 'conv_general_dilated', xla_conv.conv_general_dilated))
    if not variant.cpu_gradients:
      plain_pool = lambda x, window, stride, pads: nn.max_pool(
          x, (window,) * 2, (stride,) * 2, pads)
      stack.enter_context(mock.patch.object(
          layers, 'conv_general_dilated', lax.conv_general_dilated))
      stack.enter_context(mock.patch.object(layers, 'max_pool', plain_pool))
    if not variant.fusion_barriers:
      for name in ('fusion_barrier', 'conv_input_barrier'):
        stack.enter_context(mock.patch.object(layers, name, lambda x: x))
    elif variant.conv_input_barriers or not variant.onednn:
      stack.enter_context(mock.patch.object(
          layers, 'conv_input_barrier', layers.fusion_barrier))
    if not variant.batch_norm_vjp:
      # The model before the BatchNorm gradient also had the barrier that
      # copies.
      stack.enter_context(mock.patch.object(
          layers, 'make_norm', _flax_batch_norm))
      stack.enter_context(mock.patch.object(
          barrier, '_cpu_barrier', lambda: barrier._conditional_barrier))  # pylint: disable=protected-access
    yield


def _flax_batch_norm(train, momentum, eps, dtype, param_dtype):
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=momentum,
      epsilon=eps, dtype=dtype, param_dtype=param_dtype)


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
    if variant.user_jit:
      self._user_steps(model, case)
      return
    self.train_step = jax.jit(
        functools.partial(steps_lib.train_step, num_classes=case.num_classes,
                          label_smoothing=0.0, learning_rate_fn=schedule),
        donate_argnums=0, compiler_options=options)
    self.eval_step = jax.jit(
        functools.partial(steps_lib.eval_step, num_classes=case.num_classes),
        compiler_options=options)

  def _user_steps(self, model, case):
    """The steps a user writes from the README, on the same state and batch.

    Same optimizer as the project's (SGD momentum 0.9, lr 0.1, decay 1e-4 on
    conv/dense kernels), written with plain optax; plain jax.jit.
    """
    params = self.state.params
    tx = optax.chain(
        optax.add_decayed_weights(
            1e-4, mask=jax.tree.map(lambda p: p.ndim > 1, params)),
        optax.sgd(0.1, momentum=0.9))
    self.state = (params, self.state.batch_stats, tx.init(params))

    @jax.jit
    def train_step(state, batch):
      params, batch_stats, opt_state = state

      def loss_fn(params):
        logits, updates = model.apply(
            {'params': params, 'batch_stats': batch_stats}, batch['image'],
            train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits, batch['label']).mean()
        return loss, updates['batch_stats']

      (loss, batch_stats), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats,
              opt_state), loss

    @jax.jit
    def eval_step(state, batch):
      params, batch_stats, _ = state
      return model.apply({'params': params, 'batch_stats': batch_stats},
                         batch['image'], train=False)

    self.train_step, self.eval_step = train_step, eval_step

  def compile(self) -> dict[str, float]:
    """Seconds to trace+lower and to compile each step (cache hits count)."""
    times = {}
    for name, fn, batch in (('train', self.train_step, self.batch),
                            ('eval', self.eval_step, self.eval_batch)):
      start = time.perf_counter()
      with model_variant(self._variant):
        lowered = fn.lower(self.state, batch)
      middle, middle_cpu = time.perf_counter(), time.process_time()
      lowered.compile()
      end, end_cpu = time.perf_counter(), time.process_time()
      times[f'{name}_lower_s'] = round(middle - start, 2)
      times[f'{name}_compile_s'] = round(end - middle, 2)
      # CPU seconds of all threads: less sensitive to other tenants.
      times[f'{name}_compile_cpu_s'] = round(end_cpu - middle_cpu, 2)
    return times

  def train(self, steps: int) -> None:
    with model_variant(self._variant):
      for _ in range(steps):
        self.state, _ = self.train_step(self.state, self.batch)
    jax.block_until_ready(self.state)

  def eval(self, steps: int) -> None:
    out = None
    with model_variant(self._variant):
      for _ in range(steps):
        out = self.eval_step(self.state, self.eval_batch)
    jax.block_until_ready(out)


def enable_cache(directory: str) -> None:
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

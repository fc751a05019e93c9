"""The training config schema: every field a run can set, with defaults.

configs/base.py returns this; every other config starts from it. The result is
locked, so a misspelt override (`--config.batch_sise=...`) fails instead of
being silently ignored. Only `model_overrides` stays open: its keys are
ResNetSpec fields, checked against the spec before anything compiles.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# ResNetSpec fields a run may override (num_classes and dtype come from
# config.num_classes and config.precision; reference from config.reference).
_SPEC_OVERRIDES = {
    'block': str, 'depths': tuple, 'widths': tuple, 'strides': tuple,
    'groups': int, 'width_per_group': int, 'stem': str, 'stem_width': int,
    'shortcut': str, 'stride_in': str, 'preact': bool, 'zero_pad': str,
    'zero_init_last_bn': bool, 'bn_momentum': float, 'bn_eps': float,
    'padding': str, 'param_dtype': str,
}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # Model: a preset of flax_resnet.list_models() plus ResNetSpec overrides.
  c.model = 'resnet50'
  # Every ResNetSpec field can be overridden, on the command line too
  # (--config.model_overrides.shortcut=B); None keeps the preset's value.
  c.model_overrides = ml_collections.ConfigDict(
      {name: placeholder(kind) for name, kind in _SPEC_OVERRIDES.items()})
  # Layout reference checked before training: 'default' (the preset's own),
  # a name in flax_resnet.references.NAMES, or None to skip the check.
  c.reference = 'default'
  c.reference_model = ml_collections.FieldReference(None, field_type=str)

  # Data (any TFDS image-classification dataset with image/label features).
  c.dataset = 'imagenet2012'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.num_classes = 1000
  c.image_size = 224
  # 'imagenet' (random-resized crop + flip), 'cifar' (pad 4 + crop + flip),
  # 'none' (resize only).
  c.augment = 'imagenet'
  c.eval_crop_ratio = 0.875
  c.mean_rgb = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  c.std_rgb = (0.229 * 255, 0.224 * 255, 0.225 * 255)
  c.worker_count = 4
  c.prefetch_batches = 2
  c.synthetic_num_examples = 1024  # size of dataset='synthetic'

  # Optimisation.
  c.batch_size = 256  # global, across all devices and hosts
  c.eval_batch_size = 256
  c.num_epochs = 90.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.optimizer = 'sgd'  # 'sgd', 'adamw', 'lars'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1  # at the reference batch size below
  c.lr_scaling = 'linear'  # 'linear': lr * batch_size / base_batch_size
  c.base_batch_size = 256
  c.schedule = 'cosine'  # 'cosine', 'piecewise', 'constant'
  c.warmup_epochs = 5.0
  c.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.warmup_init_lr = 0.0
  c.warmup_mode = 'linear'  # 'linear' ramp, or 'constant' at warmup_init_lr
  # 'piecewise': multiply by decay_factor at each boundary (steps or epochs).
  c.boundaries_steps = ()
  c.boundaries_epochs = ()
  c.decay_factor = 0.1
  c.weight_decay = 1e-4
  c.weight_decay_mask = 'kernels'  # 'kernels' (conv/dense kernels) or 'all'
  c.label_smoothing = 0.0
  c.grad_clip_norm = 0.0  # 0 disables
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.lars_trust_coefficient = 0.001

  # Precision: 'float32', 'bfloat16' (f32 params + BN stats), 'float16'
  # (with dynamic loss scaling).
  c.precision = 'float32'

  # Checkpoints (orbax) and resumption.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_best = True  # also keep the best checkpoint by eval top-1
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.init_from_skip_head = False

  # Evaluation and logging.
  c.eval_every_steps = -1  # -1: once per epoch
  c.log_every_steps = 100
  c.seed = 0
  c.compilation_cache_dir = '~/.cache/flax_resnet/jax'
  c.progress_bar = 'auto'  # 'auto' (a terminal), 'on', 'off'
  c.halt_on_nonfinite = True

  c.lock()
  c.model_overrides.unlock()
  return c

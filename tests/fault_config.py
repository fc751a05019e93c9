"""A tiny, fast run for tests/test_faults.py and tests/test_bad_inputs.py.

resnet20 with one block a stage on the real offline 8x8 digits, checkpointing
every other step, so `python train.py --config tests/fault_config.py` runs in
seconds on 2 CPU cores once its steps are in the compilation cache.
"""

import os
import tempfile

from flax_resnet.train.config import default_config


def get_config():
  c = default_config()
  c.model = 'resnet20'
  c.model_overrides.depths = (1, 1, 1)
  c.reference = None
  c.dataset = 'sklearn_digits'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.num_classes = 10
  c.image_size = 8
  c.augment = 'none'
  c.mean_rgb = (85.0, 85.0, 85.0)
  c.std_rgb = (110.0, 110.0, 110.0)
  c.worker_count = 0
  c.prefetch_batches = 0
  c.batch_size = 32
  c.eval_batch_size = 360  # the whole test split in one batch
  c.num_train_steps = 24
  c.schedule = 'cosine'
  c.warmup_steps = 2
  c.lr_scaling = 'none'
  c.learning_rate = 0.05
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  c.keep_best = False
  c.eval_every_steps = 12
  c.log_every_steps = 1
  c.progress_bar = 'off'
  # Every subprocess of the fault tests reuses the compiled steps.
  c.compilation_cache_dir = os.path.join(tempfile.gettempdir(),
                                         'flax_resnet_test_jax_cache')
  return c


def with_fields(**fields):
  """get_config() with fields set; 'model_overrides.X' keys reach the spec."""
  c = get_config()
  for key, value in fields.items():
    if key.startswith('model_overrides.'):
      c.model_overrides[key.split('.', 1)[1]] = value
    else:
      c[key] = value
  return c

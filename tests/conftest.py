"""Makes the repository root importable (configs/ is not part of the package)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def small_resnet20_batch():
  """resnet20, a batch of 4 random 32x32 images, and its initial variables."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import flax_resnet
  model = flax_resnet.create_model('resnet20', num_classes=10)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  return model, x, model.init(jax.random.PRNGKey(0), x)

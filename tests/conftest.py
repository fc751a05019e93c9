"""Makes the repository root importable (configs/ is not part of the package)."""

import os
import sys

import pytest

# Before any test starts JAX's backend, as a user's process would:
# flax_resnet/host_allocator.py.
import flax_resnet  # pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


@pytest.fixture
def registered():
  """Registers pretrained weights for one test and removes them afterwards:
  registered(Weights(...)) returns the entry."""
  from flax_resnet import pretrained  # pylint: disable=g-import-not-at-top
  added = []

  def add(entry):
    added.append(entry.key)
    return pretrained.register(entry)

  yield add
  for preset, tag in added:
    pretrained.unregister(preset, tag)


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


def check_extension_fallback(script: str, switch: str, warning_mentions: str,
                             cache_dir) -> None:
  """A native extension switched off, or failing to build, still works.

  Runs `script` (which uses the extension three times, then prints
  'available', available(), unavailable_reason()) in a fresh process with
  `switch`=0 and with a compiler that always fails, the build cache empty:
  it must succeed, say why the extension is unavailable, and warn about it in
  exactly one stderr line mentioning `warning_mentions`, or in none when it
  was switched off on purpose.
  """
  # pylint: disable=g-import-not-at-top
  import subprocess
  base_env = {k: v for k, v in os.environ.items() if k not in (switch, 'CXX')}
  base_env['FLAX_RESNET_CACHE'] = str(cache_dir)
  for extra, reason in [({switch: '0'}, f'{switch}=0'),
                        ({'CXX': '/bin/false'}, 'false failed')]:
    result = subprocess.run([sys.executable, '-c', script],
                            env={**base_env, **extra}, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f'available False {reason}' in result.stdout
    assert_one_warning_after_one_notice(result.stderr, warning_mentions,
                                        expect_warning=switch not in extra)


def assert_one_warning_after_one_notice(stderr: str, mentions: str, *,
                                        expect_warning: bool = True) -> None:
  """A failed build: its one 'building ...' notice, then one warning line.

  Switched off on purpose: neither line.
  """
  lines = [line for line in stderr.splitlines() if mentions in line]
  notices = [line for line in lines if 'flax_resnet: building the ' in line]
  warnings = [line for line in lines if line not in notices]
  if not expect_warning:
    assert not lines, stderr
    return
  assert len(notices) == 1 and len(warnings) == 1, stderr
  assert lines.index(notices[0]) < lines.index(warnings[0]), stderr


def require_extension(module, what: str) -> None:
  """Skips a test without the native extension `module`; fails it in CI.

  CI builds every extension first (python -m flax_resnet.cpu), so there an
  unavailable one is a failure, not a skip.
  """
  import pytest  # pylint: disable=g-import-not-at-top
  if not module.available():
    message = f'{what} unavailable: {module.unavailable_reason()}'
    if os.environ.get('CI') == 'true':
      pytest.fail(message)
    pytest.skip(message)

"""flax_resnet's malloc settings: where they apply, and that they stop the faults.

The speed they buy is a benchmark's business (BENCHMARKS.md, "Round 4");
here: the page faults themselves, counted by the kernel, which do not depend
on the CPU model or the machine's load.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from flax_resnet import host_allocator

LINUX_GLIBC = sys.platform.startswith('linux') and (
    os.confstr('CS_GNU_LIBC_VERSION') or '').startswith('glibc')
needs_glibc = pytest.mark.skipif(not LINUX_GLIBC, reason='Linux with glibc')

# Two 64 MiB outputs per call: above glibc's largest mmap threshold (32 MiB),
# so without the settings every call maps them afresh and faults each page.
FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource
    import flax_resnet
    from flax_resnet import host_allocator
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.sin(x), jnp.cos(x)))
    x = jnp.ones((16 * 2**20,), jnp.float32)
    for _ in range(5):  # compile, and grow the heap to its high-water mark
      jax.block_until_ready(f(x))
    faults = []
    for _ in range(20):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'status': host_allocator.status(), 'faults': faults}))
""")


def run_python(code, **env_changes):
  env = {k: v for k, v in os.environ.items()
         if k not in (host_allocator.SWITCH, 'JAX_PLATFORMS',
                      *host_allocator.USER_MALLOC_VARIABLES)}
  env.update(env_changes)
  result = subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  return result


def faults(**env_changes):
  import json  # pylint: disable=g-import-not-at-top
  result = run_python(FAULTS_SCRIPT, **env_changes)
  return json.loads(result.stdout.strip().splitlines()[-1])


@needs_glibc
def test_settings_stop_the_page_faults_of_large_buffers():
  off = faults(FLAX_RESNET_MALLOC='0')
  on = faults()
  assert off['status'] == 'not applied: FLAX_RESNET_MALLOC=0'
  assert on['status'] == 'applied'
  # Without: 2 x 64 MiB of fresh 4 KiB pages every call (32,768 faults;
  # fewer with transparent huge pages, still thousands).
  assert min(off['faults']) > 1000, off
  # With: none, except the odd call after which the heap grows by another
  # 64 MiB, when a small allocation took part of the freed block. Measured:
  # 0-4 such calls of 20 (16 runs, two at a time); bound at twice that.
  calls_with_faults = sum(count >= 100 for count in on['faults'])
  assert calls_with_faults <= 8, on


@needs_glibc
def test_too_late_after_the_backend_started_says_so_once():
  code = textwrap.dedent("""
      import jax
      jax.devices()
      import flax_resnet
      from flax_resnet import host_allocator
      host_allocator.configure()  # a second call neither repeats nor changes
      print(host_allocator.status())
  """)
  result = run_python(code)
  assert result.stdout.strip() == (
      "not applied: JAX's backend had started before flax_resnet was imported")
  assert result.stderr.count('FLAX_RESNET_MALLOC=0 to silence') == 1
  silenced = run_python(code, FLAX_RESNET_MALLOC='0')
  assert silenced.stdout.strip() == 'not applied: FLAX_RESNET_MALLOC=0'
  assert 'FLAX_RESNET_MALLOC' not in silenced.stderr


@needs_glibc
def test_importing_jax_first_is_early_enough():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp
      import flax_resnet
      from flax_resnet import host_allocator
      print(host_allocator.status())
  """)
  assert run_python(code).stdout.strip() == 'applied'


@pytest.fixture
def clean_environment(monkeypatch):
  for name in (host_allocator.SWITCH, 'JAX_PLATFORMS', 'GLIBC_TUNABLES',
               'LD_PRELOAD', *host_allocator.USER_MALLOC_VARIABLES):
    monkeypatch.delenv(name, raising=False)
  # jax's own config wins over the variable once jax is imported.
  monkeypatch.setattr(host_allocator, '_jax_platforms',
                      lambda: os.environ.get('JAX_PLATFORMS', '').lower())
  monkeypatch.setattr(host_allocator.importlib.util, 'find_spec',
                      lambda name: None)
  return monkeypatch


@needs_glibc
@pytest.mark.parametrize('name,value,reason', [
    ('FLAX_RESNET_MALLOC', '0', 'FLAX_RESNET_MALLOC=0'),
    ('MALLOC_ARENA_MAX', '2', 'the user set malloc up (MALLOC_ARENA_MAX)'),
    ('MALLOC_TRIM_THRESHOLD_', '0',
     'the user set malloc up (MALLOC_TRIM_THRESHOLD_)'),
    ('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1',
     'the user set malloc up (GLIBC_TUNABLES)'),
    ('LD_PRELOAD', '/usr/lib/libjemalloc.so.2',
     'the user set malloc up (LD_PRELOAD)'),
    ('JAX_PLATFORMS', 'cuda', 'JAX_PLATFORMS=cuda'),
    ('JAX_PLATFORMS', 'tpu,cpu', 'JAX_PLATFORMS=tpu,cpu'),
])
def test_left_alone_where_the_user_or_another_platform_decides(
    clean_environment, name, value, reason):
  assert host_allocator._reason_not_to_apply() is None  # pylint: disable=protected-access
  clean_environment.setenv(name, value)
  assert host_allocator._reason_not_to_apply() == reason  # pylint: disable=protected-access


@needs_glibc
def test_an_installed_accelerator_plugin_leaves_malloc_alone(
    clean_environment):
  clean_environment.setattr(host_allocator.importlib.util, 'find_spec',
                            lambda name: name == 'jax_cuda12_plugin' or None)
  assert host_allocator._reason_not_to_apply() == (  # pylint: disable=protected-access
      'an accelerator plugin is installed (jax_cuda12_plugin)')
  # ... unless JAX is told to run on the CPU.
  clean_environment.setenv('JAX_PLATFORMS', 'cpu')
  assert host_allocator._reason_not_to_apply() is None  # pylint: disable=protected-access

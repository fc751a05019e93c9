"""glibc malloc settings that stop XLA:CPU page-faulting its buffers every step.

XLA:CPU allocates each step's temporaries and outputs with malloc. glibc
serves blocks above 32 MiB (and most of resnet50's) with a fresh mmap and
returns them with munmap, and each of XLA's worker threads gets its own
arena, whose heaps are unmapped and trimmed as they empty. So every step
faults its whole working set in again: about 320,000 minor page faults
(1.25 GB) and 0.5-3 s of kernel time per resnet50 batch-16 train step on the
project's 2-core machines (BENCHMARKS.md, "Round 4"). PyTorch pays the same
in its own process.

Three `mallopt` calls keep that memory in the process instead: no mmap for
large blocks, no trimming of the heap's top, and one arena, so that XLA's
threads allocate from the heap that the first two settings keep. Freed
blocks are then reused by the next step and it faults nothing. The price is
that the heap does not shrink: the process's peak RSS stays at its high-water
mark (resnet50 batch 16: 3.7 GB against 2.7 GB); and one arena means one
lock, which costs tiny steps that had no faults to save (the 16x16 quickstart:
7 % slower). Two arenas would avoid the lock, but glibc maps any block over
64 MiB outside the main heap whatever M_MMAP_MAX says, so resnet50 would
fault again.

A thread keeps the arena it was first given, so the settings only help when
they come before JAX starts its CPU backend (the first computation or
`jax.devices()`): `import flax_resnet` applies them, and `import jax` before
it is fine. They are applied only where they are known to help: Linux with
glibc, JAX on the CPU alone (no accelerator plugin installed, or
`JAX_PLATFORMS=cpu`), and no malloc settings of the user's own
(`MALLOC_*` variables, `GLIBC_TUNABLES`, an allocator in `LD_PRELOAD`).
`FLAX_RESNET_MALLOC=0` turns them off; `status()` says what happened.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import warnings

SWITCH = 'FLAX_RESNET_MALLOC'

# <malloc.h>'s parameter numbers (glibc).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# glibc keeps the trim threshold in a size_t, but mallopt takes an int: the
# largest it accepts; the heap's top is never that large.
NEVER_TRIM = 2**31 - 1
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_ARENA_MAX, 1))

# jax's accelerator plugins, any of which may take the default backend.
ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                       'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu',
                       'jax_plugins')
USER_MALLOC_VARIABLES = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_',
                         'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_',
                         'MALLOC_TOP_PAD_')

_status = 'not configured yet'


def status() -> str:
  """What `configure` did: 'applied', or why not."""
  return _status


def _jax_backend_started() -> bool:
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bridge is not None and bridge.backends_are_initialized()


def _jax_platforms() -> str:
  """JAX_PLATFORMS as jax will read it (its config, once jax is imported)."""
  jax = sys.modules.get('jax')
  configured = getattr(getattr(jax, 'config', None), 'jax_platforms', None)
  return (configured or os.environ.get('JAX_PLATFORMS', '')).strip().lower()


def _reason_not_to_apply() -> str | None:
  """Why the settings do not apply in this process, or None if they do."""
  if os.environ.get(SWITCH, '1').strip() == '0':
    return f'{SWITCH}=0'
  if not sys.platform.startswith('linux'):
    return f'not Linux ({sys.platform})'
  try:
    libc = os.confstr('CS_GNU_LIBC_VERSION') or ''
  except (AttributeError, ValueError, OSError):
    libc = ''
  if not libc.startswith('glibc'):
    return 'not glibc'
  users = [name for name in USER_MALLOC_VARIABLES if name in os.environ]
  if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    users.append('GLIBC_TUNABLES')
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):
    users.append('LD_PRELOAD')
  if users:
    return f'the user set malloc up ({", ".join(users)})'
  platforms = _jax_platforms()
  if platforms:
    if platforms.split(',')[0] != 'cpu':
      return f'JAX_PLATFORMS={platforms}'
  else:
    plugins = [name for name in ACCELERATOR_PLUGINS
               if importlib.util.find_spec(name) is not None]
    if plugins:
      return f'an accelerator plugin is installed ({", ".join(plugins)})'
  return None


def configure() -> str:
  """Applies the settings once per process where they help; returns status().

  Warns (once) when they would apply but JAX's CPU backend already runs, so
  its threads already have arenas of their own.
  """
  global _status
  if _status != 'not configured yet':
    return _status
  reason = _reason_not_to_apply()
  if reason is None and _jax_backend_started():
    reason = "JAX's backend had started before flax_resnet was imported"
    warnings.warn(
        "flax_resnet: JAX's CPU backend was already running when flax_resnet "
        'was imported, so its malloc settings (no per-step page faults: '
        "15-20% faster steps on large inputs) can't apply; import flax_resnet "
        "before JAX's first computation, or set FLAX_RESNET_MALLOC=0 to "
        'silence this.', RuntimeWarning, stacklevel=3)
  if reason is None:
    libc = ctypes.CDLL(None)
    failed = [number for number, value in SETTINGS
              if libc.mallopt(number, value) != 1]
    reason = f'mallopt refused {failed}' if failed else None
  _status = 'applied' if reason is None else f'not applied: {reason}'
  return _status

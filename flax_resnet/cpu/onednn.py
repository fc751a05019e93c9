"""oneDNN convolutions on CPU through `jax.ffi` custom calls.

XLA:CPU runs convolutions with Eigen kernels, 1.0-2.9x slower per layer than
the oneDNN kernels PyTorch uses (BENCHMARKS.md); no XLA flag routes them to
oneDNN. `onednn_conv.cc` calls oneDNN 3.2 (the `onednn-cpu-gomp` wheel) for
the forward conv, its input gradient and its kernel gradient, and
`conv_general_dilated` below wires them up with `jax.custom_vjp`, inside
`lax.platform_dependent` so GPU/TPU keep XLA's convolutions.

The extension is compiled on first use (about 4 s, g++) into a cache folder
keyed by the source, jaxlib and oneDNN versions, then loaded with ctypes:
building at first use rather than at `pip install` keeps the project a plain
pure-Python package (no build isolation pulling jaxlib, editable installs
work) and always matches the jaxlib that is installed. `python -m
flax_resnet.cpu` builds it ahead of time and prints where it is. Where
it cannot be built (no compiler, no oneDNN wheel, not x86-64 Linux) the model
still works with XLA's convolutions, after one warning line.
FLAX_RESNET_ONEDNN=0 switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import sys
import sysconfig
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from flax_resnet import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'onednn_conv.cc')
_TARGETS = {
    'forward': 'FlaxResnetOnednnConvForward',
    'input_grad': 'FlaxResnetOnednnConvInputGrad',
    'kernel_grad': 'FlaxResnetOnednnConvKernelGrad',
}
# The extension's identity call that fusion_barrier uses (onednn_conv.cc).
MATERIALIZE_TARGET = 'flax_resnet_materialize'
_DTYPES = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1}
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                out_spec=(0, 3, 1, 2))

log = logging.getLogger('flax_resnet')

BuildError = native.BuildError


def _onednn_prefix() -> str:
  """The prefix the onednn wheels install lib/ and include/ under."""
  try:
    dist = importlib.metadata.distribution('onednn-cpu-gomp')
  except importlib.metadata.PackageNotFoundError:
    raise BuildError('the onednn-cpu-gomp wheel is not installed') from None
  for file in dist.files or ():
    if file.name.startswith('libdnnl.so'):
      lib_dir = os.path.dirname(os.path.abspath(dist.locate_file(file)))
      prefix = os.path.dirname(lib_dir)
      if not os.path.exists(os.path.join(prefix, 'include', 'oneapi', 'dnnl',
                                         'dnnl.hpp')):
        raise BuildError('oneDNN headers missing: pip install '
                         'onednn-devel-cpu-gomp==2023.2.0')
      return prefix
  raise BuildError('onednn-cpu-gomp lists no libdnnl.so')


def library_path() -> str:
  """Where the extension for this source, jaxlib and oneDNN lives."""
  prefix = _onednn_prefix()
  return native.library_path(
      'onednn_conv', _SOURCE,
      (importlib.metadata.version('jaxlib'),
       importlib.metadata.version('onednn-cpu-gomp'), prefix))


def build(path: Optional[str] = None) -> str:
  """Compiles the extension to `path` (atomically); returns the path."""
  if not (sys.platform.startswith('linux') and
          sysconfig.get_platform().endswith('x86_64')):
    raise BuildError(f'oneDNN wheels exist for x86-64 Linux only, not '
                     f'{sysconfig.get_platform()}')
  prefix = _onednn_prefix()
  lib_dir = os.path.join(prefix, 'lib')
  return native.compile_library(
      _SOURCE, path or library_path(),
      [f'-I{jax.ffi.include_dir()}', f'-I{os.path.join(prefix, "include")}'],
      [f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}'])


def _register(library: ctypes.CDLL) -> None:
  library.FlaxResnetOnednnConvSupported.restype = ctypes.c_int
  library.FlaxResnetOnednnConvSupported.argtypes = (
      [ctypes.c_int] + [ctypes.c_int64] * 14)
  library.FlaxResnetOnednnVersion.restype = ctypes.c_char_p
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
        f'flax_resnet_onednn_conv_{name}',
        jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  jax.ffi.register_ffi_target(
      MATERIALIZE_TARGET,
      jax.ffi.pycapsule(library.FlaxResnetMaterialize), platform='cpu')


extension = native.LazyLibrary(
    'oneDNN convolutions', 'FLAX_RESNET_ONEDNN', "using XLA's, slower on CPU",
    library_path, build, _register)


_load = extension.load
available = extension.available
unavailable_reason = extension.unavailable_reason


def version() -> Optional[str]:
  library = _load()
  return library.FlaxResnetOnednnVersion().decode() if library else None


def supports(x_shape, kernel_shape, dtype, strides, padding,
             groups: int) -> bool:
  """Whether oneDNN runs this conv (also builds its primitives, once)."""
  library = _load()
  code = _DTYPES.get(jnp.dtype(dtype))
  if library is None or code is None:
    return False
  if any(p < 0 for pads in padding for p in pads):
    return False
  n, h, w, c = x_shape
  kh, kw, _, o = kernel_shape
  (pt, pb), (pl, pr) = padding
  return bool(library.FlaxResnetOnednnConvSupported(
      code, n, h, w, c, o, kh, kw, strides[0], strides[1], pt, pb, pl, pr,
      groups))


def _attributes(strides, padding, groups):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr),
              groups=np.int64(groups))


def _call(name, a, b, out_shape, dtype, strides, padding, groups):
  return jax.ffi.ffi_call(
      f'flax_resnet_onednn_conv_{name}',
      jax.ShapeDtypeStruct(out_shape, dtype), vmap_method='sequential')(
          a, b, **_attributes(strides, padding, groups))


def _xla_conv(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=NHWC,
                                  feature_group_count=groups)


def _output_shape(x_shape, kernel_shape, strides, padding):
  return (x_shape[0],
          *((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(
              x_shape[1:3], kernel_shape[:2], strides, padding)),
          kernel_shape[3])


def _onednn_forward(x, kernel, strides, padding, groups):
  return _call('forward', x, kernel,
               _output_shape(x.shape, kernel.shape, strides, padding),
               x.dtype, strides, padding, groups)


def _onednn_grads(x, kernel, grad, strides, padding, groups):
  grad = grad.astype(x.dtype)
  x_grad = _call('input_grad', grad, kernel, x.shape, x.dtype, strides,
                 padding, groups)
  kernel_grad = _call('kernel_grad', x, grad, kernel.shape, kernel.dtype,
                      strides, padding, groups)
  return x_grad, kernel_grad


def _xla_grads(x, kernel, grad, strides, padding, groups):
  return jax.vjp(functools.partial(_xla_conv, strides=strides,
                                   padding=padding, groups=groups),
                 x, kernel)[1](grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, kernel, strides, padding, groups):
  """NHWC x HWIO conv: oneDNN on CPU, XLA's elsewhere; same for gradients.

  strides: (sh, sw); padding: ((top, bottom), (left, right)), non-negative.
  Call only where `supports(...)` is True.
  """
  return lax.platform_dependent(
      x, kernel,
      cpu=functools.partial(_onednn_forward, strides=strides, padding=padding,
                            groups=groups),
      default=functools.partial(_xla_conv, strides=strides, padding=padding,
                                groups=groups))


def _conv_fwd(x, kernel, strides, padding, groups):
  return conv(x, kernel, strides, padding, groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, grad):
  x, kernel = residuals
  kw = dict(strides=strides, padding=padding, groups=groups)
  return lax.platform_dependent(
      x, kernel, grad,
      cpu=functools.partial(_onednn_grads, **kw),
      default=functools.partial(_xla_grads, **kw))


conv.defvjp(_conv_fwd, _conv_bwd)


def main() -> None:
  """Builds the extension now (CI, images); prints its path and version."""
  try:
    path = library_path()
    if not os.path.exists(path):
      build(path)
  except BuildError as e:
    print(f'error: oneDNN extension: {e}', file=sys.stderr)
    sys.exit(1)
  if not available():
    print(f'error: oneDNN extension: {extension.failure}', file=sys.stderr)
    sys.exit(1)
  print(f'{path} (oneDNN {version()})')

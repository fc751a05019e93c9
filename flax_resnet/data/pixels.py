"""Normalising uint8 images into float32 batches with a lookup table.

`(pixel - mean) / std` per channel costs numpy two float32 passes and a
division per value (0.30 ms for a 224x224 image here, an eighth of the
ImageNet train pipeline's time per image). A uint8 channel has only 256
values, so the 256 results per channel are computed once with numpy's own
float32 arithmetic and pixels.cc looks them up: the same floats, bit for bit,
in one pass.

pixels.cc needs only a C++ compiler and is built on first use like the other
extensions (flax_resnet/native.py; `python -m flax_resnet.cpu` builds it
ahead of time). Where it cannot be built, numpy normalises, after one warning
line. FLAX_RESNET_PIXELS=0 switches it off.
"""

import ctypes
import os
import sysconfig
from typing import Optional

import numpy as np

from flax_resnet import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'pixels.cc')


def library_path() -> str:
  return native.library_path('pixels', _SOURCE, (sysconfig.get_platform(),))


def build(path: Optional[str] = None) -> str:
  """Compiles the extension to `path` (atomically); returns the path."""
  return native.compile_library(_SOURCE, path or library_path(), ('-O3',), ())


def _declare(library: ctypes.CDLL) -> None:
  library.FlaxResnetNormalizeU8.restype = None
  library.FlaxResnetNormalizeU8.argtypes = (
      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)


extension = native.LazyLibrary(
    'table normaliser of uint8 pixels', 'FLAX_RESNET_PIXELS',
    'normalising with numpy, slower', library_path, build, _declare)

available = extension.available
unavailable_reason = extension.unavailable_reason


def normalization_table(mean, std) -> np.ndarray:
  """(256, C) float32: (value - mean[c]) / std[c] as numpy computes it."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  values = np.arange(256, dtype=np.uint8)[:, None]
  return np.ascontiguousarray(
      np.subtract(values, mean, dtype=np.float32) / std, np.float32)


def normalize_into(image: np.ndarray, table: np.ndarray,
                   out: np.ndarray) -> bool:
  """out[...] = table[image[..., c], c]; False (nothing written) if it can't.

  It can't when the extension is unavailable, or for arrays it does not
  take: image not uint8 (H, W, C) with adjacent channels (any row and pixel
  strides: flipped views are fine), out not C-contiguous writeable float32 of
  image's shape, table not C-contiguous (256, C) float32.
  """
  if (image.ndim != 3 or image.dtype != np.uint8 or image.strides[2] != 1
      or out.dtype != np.float32 or out.shape != image.shape
      or table.shape != (256, image.shape[2]) or table.dtype != np.float32
      or not out.flags.c_contiguous or not out.flags.writeable
      or not table.flags.c_contiguous):
    return False
  library = extension.load()
  if library is None:
    return False
  height, width, channels = image.shape
  library.FlaxResnetNormalizeU8(
      image.ctypes.data, height, width, channels, image.strides[0],
      image.strides[1], table.ctypes.data, out.ctypes.data)
  return True


"""Crop-window JPEG decoding with libjpeg-turbo (jpeg_crop.cc, via ctypes).

A training crop covers on average about half of an ImageNet image; decoding
only that window, as tf.data's `decode_and_crop_jpeg` does, skips the IDCT,
upsampling and colour conversion of everything else and stops after the
window's last row. The pixels are libjpeg-turbo's, bit for bit those of a
full decode at the same DCT scale then cropped (tests/test_jpeg.py checks it
against PIL).

The extension links the system libjpeg-turbo (`jpeglib.h` from
libjpeg62-turbo-dev / libjpeg-turbo-devel) and is compiled on first use like
the oneDNN one (flax_resnet/native.py); `python -m flax_resnet.cpu` builds it
ahead of time. Where it cannot be built, images are decoded by PIL as before,
after one warning line. FLAX_RESNET_JPEG=0 switches it off.
"""

import ctypes
import os
import sysconfig
from typing import Optional

import numpy as np

from flax_resnet import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'jpeg_crop.cc')
_MESSAGE_SIZE = 200
# Returned by the extension for JPEGs libjpeg cannot turn into RGB itself
# (CMYK, YCCK): PIL decodes those.
_LEFT_TO_PIL = 1


def library_path() -> str:
  return native.library_path('jpeg_crop', _SOURCE,
                             (sysconfig.get_platform(),))


def build(path: Optional[str] = None) -> str:
  """Compiles the extension to `path` (atomically); returns the path."""
  try:
    return native.compile_library(_SOURCE, path or library_path(), (),
                                  ('-ljpeg',))
  except native.BuildError as e:
    if 'jpeglib.h' in str(e):
      raise native.BuildError(
          f'{e} (install the libjpeg-turbo headers, e.g. apt-get install '
          'libjpeg62-turbo-dev)') from None
    raise


def _declare(library: ctypes.CDLL) -> None:
  library.FlaxResnetJpegInfo.restype = ctypes.c_int
  library.FlaxResnetJpegInfo.argtypes = (
      ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int),
      ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int)
  library.FlaxResnetJpegDecodeCrop.restype = ctypes.c_int
  library.FlaxResnetJpegDecodeCrop.argtypes = (
      ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
      ctypes.c_char_p, ctypes.c_int)


extension = native.LazyLibrary(
    'crop-window JPEG decoder', 'FLAX_RESNET_JPEG',
    'decoding JPEGs with PIL, slower', library_path, build, _declare)


_load = extension.load
available = extension.available
unavailable_reason = extension.unavailable_reason


def is_jpeg(data: bytes) -> bool:
  return data[:3] == b'\xff\xd8\xff'


def size(data: bytes) -> Optional[tuple[int, int]]:
  """(width, height) of JPEG bytes; None where PIL must decode them.

  None: the extension is unavailable, or the JPEG is CMYK/YCCK.

  Raises:
    ValueError: libjpeg cannot read the header (its reason).
  """
  library = _load()
  if library is None:
    return None
  width, height = ctypes.c_int(), ctypes.c_int()
  message = ctypes.create_string_buffer(_MESSAGE_SIZE)
  code = library.FlaxResnetJpegInfo(data, len(data), ctypes.byref(width),
                                    ctypes.byref(height), message,
                                    _MESSAGE_SIZE)
  if code < 0:
    raise ValueError(message.value.decode(errors='replace'))
  return None if code == _LEFT_TO_PIL else (width.value, height.value)


def decode_crop(data: bytes, scale: int, left: int, top: int, width: int,
                height: int) -> np.ndarray:
  """The window of the image decoded at 1/scale, uint8 (height, width, 3).

  Args:
    data: JPEG bytes that `size` accepted.
    scale: 1, 2, 4 or 8; the decoded image is ceil(size / scale), as with
      PIL's `draft`.
    left, top, width, height: the window, in pixels of the scaled image.

  Raises:
    ValueError: corrupt or truncated data (libjpeg's reason).
  """
  library = _load()
  out = np.empty((height, width, 3), np.uint8)
  message = ctypes.create_string_buffer(_MESSAGE_SIZE)
  code = library.FlaxResnetJpegDecodeCrop(
      data, len(data), scale, left, top, width, height, out.ctypes.data,
      message, _MESSAGE_SIZE)
  if code:
    raise ValueError(message.value.decode(errors='replace') if code < 0 else
                     'a CMYK/YCCK JPEG: decode it with PIL')
  return out


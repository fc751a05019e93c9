"""Image bytes -> 8-bit RGB, one way for prepare and training alike.

Every decode path (preprocess.StoredImage, the image-folder reader and the
prepare writers) opens images here, so they agree on:

  - Bit depth. 16-bit grayscale (PIL modes 'I;16', 'I;16B', ..., and 'I' as
    PIL opens 16-bit PNG/PGM/PPM) keeps its high byte, value >> 8: what
    TensorFlow's `decode_png` (so TFDS) gives, and what PIL itself does for
    16-bit RGB(A) PNGs. PIL's `convert('RGB')` clips them instead (everything
    above 255 becomes 255: a white image). 32-bit integer ('I' from TIFF) and
    float ('F') pixels have no standard scale and are refused, naming the file.
  - Other modes: PIL's `convert('RGB')` (grayscale repeated; palette applied;
    alpha and palette transparency dropped, as torchvision and TF's
    `channels=3` do; CMYK, YCbCr, 1-bit). EXIF orientation is not applied,
    as neither torchvision's ImageFolder nor TFDS applies it.
  - Size. An image of more than `max_pixels()` pixels (PIL's
    `Image.MAX_IMAGE_PIXELS`, 89,478,485 by default; the environment variable
    FLAX_RESNET_MAX_IMAGE_PIXELS overrides it) is refused from its header,
    before any pixel is decoded.
  - Errors: `ImageError` (a ValueError) naming the file and a human reason.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Optional

import numpy as np
from PIL import Image

MAX_PIXELS_ENV = 'FLAX_RESNET_MAX_IMAGE_PIXELS'
# Formats whose 'I' mode holds 16-bit samples (PNG and PGM/PPM go up to 16).
_SIXTEEN_BIT_I = ('PNG', 'PPM')


FIX = 'fix or remove it'


class ImageError(ValueError):
  """An image that cannot become 8-bit RGB: 'WHERE: REASON; FIX.'"""

  def __init__(self, where: str, reason: str, fix: str = FIX):
    super().__init__(f'{where}: {reason}; {fix}.')
    self.where, self.reason, self.fix = where, reason, fix

  def __reduce__(self):  # grain's worker processes pickle it
    return type(self), (self.where, self.reason, self.fix)


def max_pixels() -> Optional[int]:
  """The most pixels an image may have; None: no limit.

  FLAX_RESNET_MAX_IMAGE_PIXELS, if set, is also handed to PIL (its
  `Image.MAX_IMAGE_PIXELS`), whose own check would otherwise refuse images
  above twice its default before ours runs.
  """
  value = os.environ.get(MAX_PIXELS_ENV)
  if value is not None:
    try:
      limit = int(value)
      if limit < 1:
        raise ValueError
    except ValueError:
      raise ImageError(
          MAX_PIXELS_ENV, f'{value!r} is not a pixel count',
          'set it to a positive integer (the largest width x height to '
          'decode), or unset it for the default') from None
    Image.MAX_IMAGE_PIXELS = limit
  return Image.MAX_IMAGE_PIXELS


def check_pixels(width: int, height: int, where: str) -> None:
  """Refuses an image above `max_pixels()` (from its size, before decoding)."""
  limit = max_pixels()
  if limit is not None and width * height > limit:
    raise _too_big(width * height, f'{width}x{height} = ', limit, where)


def _too_big(count: int, size: str, limit: int, where: str) -> ImageError:
  return ImageError(
      where, f'{size}{count:,} pixels, more than the limit of {limit:,} (a '
      'guard against decompression bombs: decoding it would take '
      f'{count * 3 / 1e9:.1f} GB)', 'resize it, or if it is legitimate raise '
      f'the limit: {MAX_PIXELS_ENV}={count}')


def open_image(data: bytes, where: str) -> Image.Image:
  """PIL's lazy image of encoded `data`: header read and size checked."""
  if not data:
    raise ImageError(where, 'empty file (0 bytes)')
  limit = max_pixels()
  try:
    with warnings.catch_warnings():
      # Images between PIL's limit and twice it only warn in PIL; they are
      # refused below with the file named.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    # Above twice its limit PIL refuses in open(); its message has the count.
    found = re.search(r'\((\d+) pixels\)', str(e))
    count = int(found.group(1)) if found else 2 * limit + 1
    raise _too_big(count, '', limit, where) from e
  except Image.UnidentifiedImageError as e:
    raise ImageError(
        where, 'not an image PIL can read (cannot identify the format of its '
        f'{len(data):,} bytes, starting {data[:8]!r})') from e
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(where, str(e)) from e
  check_pixels(*image.size, where)
  return image


def to_rgb(image: Image.Image, where: str) -> Image.Image:
  """`image` decoded as 8-bit RGB (see the module doc for each mode)."""
  try:
    if image.mode == 'RGB':
      image.load()  # convert() would decode too, plus copy
      return image
    if image.mode.startswith('I;16') or (image.mode == 'I'
                                         and image.format in _SIXTEEN_BIT_I):
      high = np.asarray(image).astype(np.uint32) >> 8
      return Image.fromarray(np.minimum(high, 255).astype(np.uint8)).convert(
          'RGB')
    if image.mode in ('I', 'F'):
      kind = ('32-bit integer' if image.mode == 'I' else 'floating-point')
      raise ImageError(
          where, f'{kind} pixels (PIL mode {image.mode!r}, '
          f'{image.format or "unknown"} format) have no standard 8-bit scale',
          'save it as an 8- or 16-bit image (e.g. PNG), then run again')
    if image.mode in ('P', 'PA') and 'transparency' in image.info:
      # The same pixels as convert('RGB'), without PIL's warning about
      # palette transparency given in bytes.
      image = image.convert('RGBA')
    return image.convert('RGB')
  except ImageError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(where, str(e)) from e


def decode(data: bytes, where: str) -> Image.Image:
  """Encoded `data` as an 8-bit RGB PIL image; ImageError names `where`."""
  return to_rgb(open_image(data, where), where)


def read_file(path: str) -> bytes:
  """The bytes of `path`; ImageError names the file."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise ImageError(printable(path), e.strerror or str(e)) from e


def printable(path: str) -> str:
  """`path` as text any terminal or UTF-8 field takes.

  File names that are not UTF-8 reach Python as surrogate escapes (b'caf\\xe9'
  -> 'caf\\udce9'), which UTF-8 cannot encode; they are shown as
  'caf\\\\xe9' instead (backslash escapes of the raw bytes).
  """
  return os.fsencode(path).decode('utf-8', 'backslashreplace')

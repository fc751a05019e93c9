"""Hostile images: odd bit depths and modes, decompression bombs, empty files.

Every decode path (training's StoredImage, the folder reader that training
and prepare share, images.decode) must give the same 8-bit RGB pixels or one
ImageError naming the file; never nonsense (a 16-bit image clipped to white),
never a traceback of PIL's, never `<_io.BytesIO object at 0x...>`.
"""

import io
import os
import struct
import tempfile
import tracemalloc
import warnings
import zlib

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
from PIL import Image
import pytest

from flax_resnet.data import image_folder
from flax_resnet.data import images
from flax_resnet.data import preprocess

FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
WHERE = "dataset 'd' split 'train', file_name 'x.png'"


def encode(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def folder_pixels(data: bytes, name: str) -> np.ndarray:
  """What training reads from an image folder (or a dataset prepared from
  one) holding a file of `data`: the stored bytes, decoded."""
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
      f.write(data)
    stored = image_folder.ImageFolder.encoded(path)
  return preprocess.StoredImage(stored, WHERE).array()


def every_path(data: bytes, name: str) -> list[np.ndarray]:
  """The pixels of each decode path: training, the folder reader, decode."""
  return [preprocess.StoredImage(data, WHERE).array(),
          folder_pixels(data, name),
          np.asarray(images.decode(data, WHERE))]


# ---------------------------------------------------------------------------
# Bit depth: 16-bit keeps its high byte everywhere; 32-bit and float refused


SIXTEEN_BIT = {  # format: (how PIL saves a uint16 array, the mode it reopens as)
    'PNG': ('<u2', 'I;16'),
    'TIFF': ('>u2', 'I;16B'),
    'PPM': ('<u2', 'I'),
}


@pytest.mark.parametrize('fmt', sorted(SIXTEEN_BIT))
@FAST
@given(gray=hnp.arrays(np.uint16, st.tuples(st.integers(1, 6),
                                            st.integers(1, 6))))
def test_sixteen_bit_gray_keeps_its_high_byte_on_every_path(fmt, gray):
  dtype, mode = SIXTEEN_BIT[fmt]
  data = encode(Image.fromarray(gray.astype(dtype)), fmt)
  assert Image.open(io.BytesIO(data)).mode == mode
  want = np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, axis=-1)
  for got in every_path(data, f'x.{fmt.lower()}'):
    np.testing.assert_array_equal(got, want)
  # A dataset storing the array itself (a uint16 Tensor feature) agrees.
  np.testing.assert_array_equal(preprocess.StoredImage(gray, WHERE).array(),
                                want)


def test_sixteen_bit_png_decodes_as_tensorflow_decodes_it():
  """TFDS decodes with tf.io.decode_png: the reference for 16 -> 8 bits."""
  tf = pytest.importorskip('tensorflow')
  gray = (np.arange(40 * 30, dtype=np.uint16) * 54).reshape(40, 30)
  data = encode(Image.fromarray(gray), 'PNG')
  reference = tf.io.decode_png(data, channels=3, dtype=tf.uint8).numpy()
  # The old decode (PIL's convert('RGB')) clipped: 97% of it was 255.
  assert (np.asarray(Image.open(io.BytesIO(data)).convert('RGB')) == 255
          ).mean() > 0.9
  for got in every_path(data, 'x.png'):
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize('dtype, mode, kind', [
    (np.int32, 'I', '32-bit integer'), (np.float32, 'F', 'floating-point')])
def test_pixels_without_an_eight_bit_scale_are_refused_naming_the_file(
    dtype, mode, kind):
  data = encode(Image.fromarray(np.full((4, 5), 300, dtype)), 'TIFF')
  for decode in (lambda: preprocess.StoredImage(data, WHERE).array(),
                 lambda: folder_pixels(data, 'x.tiff'),
                 lambda: images.decode(data, WHERE)):
    with pytest.raises(ValueError, match=f"x.(png|tiff).*: {kind} pixels "
                       rf"\(PIL mode '{mode}', TIFF format\) have no standard "
                       '8-bit scale; save it as an 8- or 16-bit image'):
      decode()


def _palette_with_transparency():
  image = Image.new('P', (5, 4))
  image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] * 85 + [0, 0, 0])
  image.putdata([0, 1, 2, 1, 0] * 4)
  return encode_reopened(image, 'PNG', transparency=b'\x00\x80')


def encode_reopened(image, fmt, **options):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **options)
  return buffer.getvalue()


def _mode_image(mode):
  rng = np.random.default_rng(3)
  rgba = Image.fromarray(rng.integers(0, 256, (4, 5, 4), np.uint8), 'RGBA')
  return rgba.convert(mode) if mode != 'RGBA' else rgba


# Each mode reopens as itself from that format.
ODD_MODES = [('L', 'PNG'), ('LA', 'PNG'), ('RGBA', 'PNG'), ('P', 'PNG'),
             ('1', 'PNG'), ('CMYK', 'JPEG'), ('CMYK', 'TIFF'),
             ('YCbCr', 'TIFF'), ('LA', 'TIFF'), ('P', 'BMP')]


@pytest.mark.parametrize('mode, fmt', ODD_MODES + [('P+transparency', 'PNG')])
def test_other_modes_are_pils_rgb_on_every_path_without_warnings(mode, fmt):
  """Alpha and palette transparency dropped, as torchvision and TF do."""
  if mode == 'P+transparency':
    data = _palette_with_transparency()
  else:
    data = encode_reopened(_mode_image(mode), fmt)
  opened = Image.open(io.BytesIO(data))
  assert opened.mode == mode.split('+')[0]
  want = np.asarray(opened.convert('RGBA' if 'transparency' in opened.info
                                   else 'RGB').convert('RGB'))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # PIL warns on P + transparency bytes
    for got in every_path(data, f'x.{fmt.lower()}'):
      np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# Size: refused from the header, the file named, before decoding


def png_header_only(width, height):
  """A PNG claiming width x height (1-bit gray) whose pixel data is cut."""
  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body
            + struct.pack('>I', zlib.crc32(kind + body)))
  return (b'\x89PNG\r\n\x1a\n'
          + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0,
                                       0))
          + chunk(b'IDAT', zlib.compress(b'\0' * 1000)) + chunk(b'IEND', b''))


def jpeg_claiming(width, height):
  """A real small JPEG whose frame header claims width x height."""
  data = bytearray(encode(Image.new('RGB', (16, 16), (10, 20, 30)), 'JPEG'))
  sof = data.index(b'\xff\xc0')
  data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
  return bytes(data)


@pytest.fixture
def pil_limit(monkeypatch):
  """PIL's limit, restored after the test (max_pixels() may set it)."""
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)
  monkeypatch.delenv(images.MAX_PIXELS_ENV, raising=False)
  return monkeypatch


@pytest.mark.parametrize('kind', ['png', 'jpeg'])
def test_a_20000_pixel_square_is_refused_naming_file_and_limit(kind, pil_limit):
  data = (png_header_only if kind == 'png' else jpeg_claiming)(20000, 20000)
  tracemalloc.start()
  try:
    with pytest.raises(images.ImageError) as error:
      preprocess.StoredImage(data, WHERE).array()
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 20e6  # decoding it would take 1.2 GB
  # Above twice its limit PIL refuses in open(), whose message has no sides.
  sides = '' if kind == 'png' else '20000x20000 = '
  assert str(error.value) == (
      f'{WHERE}: {sides}400,000,000 pixels, more than the limit of '
      '89,478,485 (a guard against decompression bombs: decoding it would '
      'take 1.2 GB); resize it, or if it is legitimate raise the limit: '
      'FLAX_RESNET_MAX_IMAGE_PIXELS=400000000.')


@pytest.mark.parametrize('side', [11, 14, 20])  # 1x-2x the limit, and > 2x
def test_every_size_above_the_limit_is_refused_alike(side, pil_limit):
  """PIL only warns between its limit and twice it, then raises its own
  DecompressionBombError: both become the same ImageError, no warning."""
  pil_limit.setenv(images.MAX_PIXELS_ENV, '100')
  data = encode(Image.new('RGB', (side, side)), 'PNG')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    with pytest.raises(images.ImageError,
                       match=rf"x.png': (\d+x\d+ = )?{side * side:,} pixels, "
                       'more than the limit of 100 .*'
                       f'FLAX_RESNET_MAX_IMAGE_PIXELS={side * side}'):
      preprocess.StoredImage(data, WHERE)
  assert preprocess.StoredImage(encode(Image.new('RGB', (10, 10)), 'PNG'),
                                WHERE).array().shape == (10, 10, 3)


def test_the_limit_can_be_raised_for_a_legitimate_image(pil_limit):
  pil_limit.setenv(images.MAX_PIXELS_ENV, str(20000 * 20000))
  stored = preprocess.StoredImage(png_header_only(20000, 20000), WHERE)
  assert (stored.width, stored.height) == (20000, 20000)  # not decoded
  pil_limit.setenv(images.MAX_PIXELS_ENV, 'lots')
  with pytest.raises(images.ImageError,
                     match="FLAX_RESNET_MAX_IMAGE_PIXELS: 'lots' is not a "
                     'pixel count; set it to a positive integer'):
    preprocess.StoredImage(png_header_only(8, 8), WHERE)


# ---------------------------------------------------------------------------
# Empty and unreadable files: a human reason, the file named


def test_an_empty_file_says_so():
  with pytest.raises(images.ImageError) as error:
    preprocess.StoredImage(b'', WHERE)
  assert str(error.value) == f'{WHERE}: empty file (0 bytes); fix or remove it.'
  with pytest.raises(image_folder.SourceError,
                     match=r"x.png: empty file \(0 bytes\); fix or remove"):
    folder_pixels(b'', 'x.png')


@FAST
@given(data=st.binary(min_size=1, max_size=64))
def test_any_bytes_decode_or_give_one_named_reason(data):
  """Never PIL's `<_io.BytesIO object at 0x...>`, never another exception."""
  try:
    pixels = preprocess.StoredImage(data, WHERE).array()
  except images.ImageError as e:
    message = str(e)
    assert message.startswith(f'{WHERE}: ') and 'object at 0x' not in message
    assert '\n' not in message
  else:
    assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3

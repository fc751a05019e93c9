"""The crop-window JPEG decoder (flax_resnet/data/jpeg.py) and its fallback.

Compared with PIL's decoder: both are libjpeg-turbo with the same defaults
(integer IDCT, fancy upsampling), so a window must be bit for bit the same
pixels as PIL's full decode at the same DCT scale, cropped.
"""

import io
import textwrap

import conftest
import numpy as np
from PIL import Image
import pytest

from flax_resnet.data import jpeg
from flax_resnet.data import preprocess

SIZES = [(29, 37), (67, 121), (9, 17), (375, 500)]  # (height, width)
SUBSAMPLINGS = {'4:4:4': 0, '4:2:2': 1, '4:2:0': 2}


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
  """Gradients plus noise: every 8x8 block has detail to get wrong."""
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([x * 255 // width, y * 255 // height, (x + y) * 3 % 256],
                   -1)
  noise = np.random.default_rng(seed).integers(0, 40, image.shape)
  return np.clip(image + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, mode: str = 'RGB', **save_options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, format='JPEG', quality=90,
                                             **save_options)
  return buffer.getvalue()


def pil_decode(data: bytes, scale: int) -> np.ndarray:
  """PIL's full decode at DCT scale 1/scale, as RGB."""
  pil = Image.open(io.BytesIO(data))
  if scale > 1:
    pil.draft('RGB', (pil.size[0] // scale, pil.size[1] // scale))
  return np.asarray(pil.convert('RGB'))


def windows(height: int, width: int, rng: np.random.Generator):
  """Windows touching each edge and corner, single pixels, random ones."""
  yield from [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, 1, 1),
              (0, height - 1, width, 1), (width - 1, 0, 1, height),
              (width // 2, 0, width - width // 2, height // 2 + 1)]
  for _ in range(12):
    left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
    yield (left, top, int(rng.integers(1, width - left + 1)),
           int(rng.integers(1, height - top + 1)))


@pytest.fixture(autouse=True)
def extension():
  conftest.require_extension(jpeg, 'JPEG crop decoder')


def without_extension(monkeypatch):
  monkeypatch.setattr(jpeg.extension, 'library', None)
  monkeypatch.setattr(jpeg.extension, 'failure', 'switched off by the test')


@pytest.mark.parametrize('height,width', SIZES)
@pytest.mark.parametrize('subsampling', SUBSAMPLINGS)
@pytest.mark.parametrize('mode,progressive', [('RGB', False), ('RGB', True),
                                              ('L', False)])
def test_window_equals_pils_full_decode_cropped(height, width, subsampling,
                                                mode, progressive):
  data = encode(texture(height, width), mode,
                subsampling=SUBSAMPLINGS[subsampling], progressive=progressive)
  rng = np.random.default_rng(height * width)
  for scale in (1, 2, 4, 8):
    full = pil_decode(data, scale)
    assert full.shape[:2] == (-(-height // scale), -(-width // scale))
    for left, top, w, h in windows(*full.shape[:2], rng):
      window = jpeg.decode_crop(data, scale, left, top, w, h)
      np.testing.assert_array_equal(
          window, full[top:top + h, left:left + w],
          err_msg=f'scale 1/{scale}, window {w}x{h} at ({left}, {top})')


def test_size_reads_the_header_and_leaves_cmyk_to_pil():
  assert jpeg.size(encode(texture(29, 37))) == (37, 29)
  assert jpeg.size(encode(texture(29, 37), 'L')) == (37, 29)
  assert jpeg.size(encode(texture(29, 37), 'CMYK')) is None


def test_cmyk_jpeg_is_decoded_by_pil_as_before():
  data = encode(texture(40, 60), 'CMYK')
  stored = preprocess.StoredImage(data, 'd')
  want = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  np.testing.assert_array_equal(stored.array(), want)
  assert stored.crop_resize((5, 4, 45, 36), 16).shape == (16, 16, 3)


@pytest.mark.parametrize('damage', ['truncated', 'header_only', 'garbage'])
def test_corrupt_jpeg_is_a_value_error_naming_the_image(damage):
  data = encode(texture(120, 160))
  data = {'truncated': data[:len(data) // 2],
          'header_only': data[:200],
          'garbage': data[:2] + b'\xff' + bytes(range(256)) * 4}[damage]
  where = "dataset 'd' split 'train', file_name 'n01440764_18.JPEG'"
  with pytest.raises(ValueError, match=r"file_name 'n01440764_18[^']*': "):
    preprocess.StoredImage(data, where).crop_resize((10, 10, 110, 90), 32)


def test_damaged_bytes_never_crash():
  data = encode(texture(64, 96), subsampling=2)
  rng = np.random.default_rng(0)
  errors = 0
  for i in range(300):
    damaged = bytearray(data[:int(rng.integers(2, len(data) + 1))])
    for position in rng.integers(2, len(damaged), size=i % 4):
      damaged[position] = int(rng.integers(0, 256))
    try:
      size = jpeg.size(bytes(damaged))
      if size is not None:
        window = jpeg.decode_crop(bytes(damaged), 1, 0, 0, *size)
        assert window.shape == (size[1], size[0], 3)
    except ValueError as e:
      assert str(e)  # libjpeg's reason
      errors += 1
  assert errors > 0  # truncations really were refused


def test_window_outside_the_image_is_refused():
  data = encode(texture(29, 37))
  with pytest.raises(ValueError, match='outside the 37x29 image'):
    jpeg.decode_crop(data, 1, 30, 0, 10, 5)
  with pytest.raises(ValueError, match=r'outside the 19x15 image'):
    jpeg.decode_crop(data, 2, 0, 0, 20, 15)


def test_crop_resize_matches_the_pil_path(monkeypatch):
  """The window decode feeds the same pixels to the same bilinear resize.

  PIL's resize picks which pass (horizontal or vertical) runs first from
  the input's shape, and rounds to uint8 in between: on the smaller window
  it may pick the other order, so pixels may differ by one level.
  """
  rng = np.random.default_rng(0)
  cases = []
  for i, (height, width) in enumerate([(375, 500), (900, 1200), (97, 131)]):
    data = encode(texture(height, width, i), subsampling=i % 3)
    for size in (224, 32):
      for _ in range(4):
        cases.append((data, preprocess.random_resized_crop_box(
            rng, height, width), size))
  ours = [preprocess.StoredImage(d, 'd').crop_resize(b, s, True, flip=True)
          for d, b, s in cases]
  without_extension(monkeypatch)
  for (data, box, size), got in zip(cases, ours):
    want = preprocess.StoredImage(data, 'd').crop_resize(box, size, True,
                                                         flip=True)
    assert got.shape == want.shape == (size, size, 3)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_reduced_scale_is_the_one_pil_draft_picks():
  for width, height, box, size in [(500, 375, (0, 0, 500, 375), 224),
                                   (1200, 900, (0, 0, 1000, 900), 224),
                                   (1200, 900, (100, 0, 300, 300), 32),
                                   (64, 48, (10, 6, 42, 38), 8),
                                   (500, 375, (0, 0, 100, 100), 224)]:
    pil = Image.open(io.BytesIO(encode(texture(height, width))))
    request = preprocess._draft_request(width, height, box, size)
    pil.draft('RGB', request)
    scale = preprocess._draft_scale(width, height, request)
    assert pil.size == (-(-width // scale), -(-height // scale))


def test_switch_off_and_build_failure_warn_once_and_fall_back(tmp_path):
  script = textwrap.dedent('''
      import io, logging
      import numpy as np
      from PIL import Image
      from flax_resnet.data import jpeg, preprocess
      buffer = io.BytesIO()
      Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(buffer, 'JPEG')
      for _ in range(3):
        image = preprocess.StoredImage(buffer.getvalue(), 'd').crop_resize(
            (0, 0, 40, 30), 8)
      assert image.shape == (8, 8, 3)
      print('available', jpeg.available(), jpeg.unavailable_reason())
  ''')
  conftest.check_extension_fallback(script, 'FLAX_RESNET_JPEG', 'JPEG decoder',
                                    tmp_path / 'cache')

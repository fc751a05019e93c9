"""Per-example preprocessing in numpy and PIL, wrapped as grain transforms.

Training ('augment' in the config):
  - 'imagenet': Inception-style random-resized crop (area 8%-100%, aspect
    ratio 3/4-4/3 log-uniform, 10 tries, then a centre crop of the whole image
    clamped to that aspect range), bilinear resize to image_size, random
    horizontal flip.
  - 'cifar': resize to image_size if the stored size differs, zero-pad 4
    pixels, random image_size crop, random horizontal flip (He et al. 2016).
  - 'none': bilinear resize to image_size.
Evaluation: images already image_size x image_size are only normalised; with
'imagenet' the shorter side is resized to image_size / eval_crop_ratio and the
centre image_size crop kept; otherwise the image is resized to image_size.

Everything ends normalised as (pixel - mean_rgb) / std_rgb in float32, with
grayscale repeated to 3 channels, in R, G, B order, or B, G, R with
channel_order 'BGR' (Keras ResNet50 weights). Random choices come from the generator grain
passes to `RandomMap.random_map`, seeded by (seed, position in the stream), so
the output is deterministic and resumable.

Encoded images (JPEG/PNG bytes) are decoded here. For training crops, JPEGs
are decoded at the largest power-of-two reduction (libjpeg's DCT scaling) that
still leaves the crop at least image_size pixels wide and high: up to ~30%
faster at low resolutions, a slightly different (still antialiased)
downsampling. Evaluation always decodes at full size, matching the usual
protocol exactly. JPEGs are decoded by the crop-window decoder (jpeg.py):
only the rows and columns the bilinear resize reads, the same pixels PIL
decodes; other formats, CMYK JPEGs and every JPEG where that decoder is
unavailable, by PIL. (PIL's resize then sees a smaller image and may run its
two passes in the other order: results can differ by one level of 255.)

Training images leave `TrainPreprocess` as uint8 and are normalised as they
are copied into the batch (`NormalizedBatch`), by table lookup (pixels.py).
"""

import dataclasses
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

from flax_resnet.data import images
from flax_resnet.data import jpeg
from flax_resnet.data import pixels

AUGMENTATIONS = ('imagenet', 'cifar', 'none')
CIFAR_PAD = 4
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
_MAX_PIXEL = 255.0
# config.channel_order: output channel c is decoded (RGB) channel order[c].
RGB_ORDER = [0, 1, 2]
CHANNEL_ORDERS = {'RGB': RGB_ORDER, 'BGR': [2, 1, 0]}


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """The config fields preprocessing reads, plus names for error messages."""
  dataset: str
  split: str
  num_classes: int
  image_size: int
  augment: str
  eval_crop_ratio: float
  mean_rgb: tuple[float, ...]
  std_rgb: tuple[float, ...]
  channel_order: str = 'RGB'

  @classmethod
  def from_config(cls, config, split_field: str) -> 'PreprocessOptions':
    return cls(
        dataset=config.dataset,
        split=config[split_field],
        num_classes=config.num_classes,
        image_size=config.image_size,
        augment=config.augment,
        eval_crop_ratio=config.eval_crop_ratio,
        mean_rgb=tuple(float(m) for m in config.mean_rgb),
        std_rgb=tuple(float(s) for s in config.std_rgb),
        channel_order=config.channel_order,
    )

  @property
  def where(self) -> str:
    return f'dataset {self.dataset!r} split {self.split!r}'


def to_rgb_array(image: Any, where: str) -> np.ndarray:
  """A decoded image as uint8 (H, W, 3); raises ValueError if it is unusable.

  Args:
    image: (H, W), (H, W, 1) or (H, W, 3) array, uint8, uint16 (kept: its
      high byte) or float on the 0..255 scale.
    where: dataset and split, for error messages.

  Returns:
    The image as a uint8 RGB array.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(
        f'Image of shape {image.shape} (rank {image.ndim}) in {where}: the '
        "'image' feature must be (height, width, channels) or (height, "
        'width); choose an image dataset or fix its image feature.')
  if image.shape[-1] not in (1, 3):
    raise ValueError(
        f'Image of shape {image.shape} in {where} has {image.shape[-1]} '
        'channels; the pipeline needs 1 (grayscale) or 3 (RGB), e.g. drop an '
        'alpha channel when building the dataset.')
  if image.dtype == np.uint8:
    pass
  elif image.dtype == np.uint16:
    # 16-bit samples keep their high byte, as decoded 16-bit PNGs do
    # (images.py), and as TFDS's decode_png gives them.
    image = (image >> 8).astype(np.uint8)
  elif np.issubdtype(image.dtype, np.floating):
    # Float images are taken on the uint8 scale; anything else would be
    # silently mis-normalised.
    if image.size and not (image.min() >= 0 and image.max() <= _MAX_PIXEL):
      raise ValueError(
          f'Float image in {where} has values in [{image.min()}, '
          f'{image.max()}]; float images must be on the 0..255 scale (or '
          'stored as uint8).')
    image = np.rint(image).astype(np.uint8)
  else:
    raise ValueError(
        f'Image dtype {image.dtype} in {where}: images must be uint8 (0..255), '
        "uint16 or float on the 0..255 scale; store the 'image' feature as "
        'uint8.')
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def _is_encoded(image: Any) -> bool:
  if isinstance(image, (bytes, np.bytes_)):
    return True
  return (isinstance(image, np.ndarray) and image.dtype.kind in 'SO'
          and image.size == 1)


class StoredImage:
  """A stored image whose size is known before its (costly) decoding."""

  def __init__(self, image: Any, where: str):
    self._where = where
    self._pil = None
    self._jpeg = None
    self._array = None
    if _is_encoded(image):
      data = image.item() if isinstance(image, np.ndarray) else image
      size = self._jpeg_size(data) if jpeg.is_jpeg(data) else None
      if size is not None:
        images.check_pixels(*size, self._where)
        self._jpeg = data
        self.width, self.height = size
        return
      self._pil = images.open_image(data, self._where)
      self.width, self.height = self._pil.size
    else:
      self._array = to_rgb_array(image, where)
      self.height, self.width = self._array.shape[:2]

  def array(self) -> np.ndarray:
    """The whole image, uint8 (H, W, 3)."""
    if self._array is None:
      if self._jpeg is not None:
        self._array = self._decode_window(1, 0, 0, self.width, self.height)
      else:
        self._array = np.asarray(self._decode(self._pil))
    return self._array

  def crop_resize(self, box: tuple[float, float, float, float], size: int,
                  reduced_decode: bool = False,
                  flip: bool = False) -> np.ndarray:
    """Region box=(left, top, right, bottom) resized bilinearly to size^2.

    Args:
      box: region of the stored image, in its pixels.
      size: output height and width.
      reduced_decode: let a JPEG be decoded at a reduced scale that still
        covers the box with `size` pixels (see the module docstring).
      flip: mirror the result left-right.

    Returns:
      uint8 (size, size, 3).
    """
    if self._array is not None:
      image = Image.fromarray(self._array).resize(
          (size, size), Image.Resampling.BILINEAR, box=box)
    elif self._jpeg is not None:
      image = self._jpeg_crop_resize(box, size, reduced_decode)
    else:
      image = self._pil_crop_resize(box, size, reduced_decode)
    if flip:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)

  def _pil_crop_resize(self, box, size: int,
                       reduced_decode: bool) -> Image.Image:
    pil = self._pil
    if reduced_decode and pil.format == 'JPEG':
      left, top, right, bottom = box
      # Ask for the smallest full-image size at which the box still spans at
      # least `size` pixels; draft() then decodes at that reduction or more.
      pil.draft('RGB', _draft_request(self.width, self.height, box, size))
      scale_x, scale_y = pil.size[0] / self.width, pil.size[1] / self.height
      box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return self._decode(pil).resize((size, size), Image.Resampling.BILINEAR,
                                    box=box)

  def _jpeg_crop_resize(self, box, size: int,
                        reduced_decode: bool) -> Image.Image:
    """_pil_crop_resize's result, decoding only the pixels the resize reads."""
    scale = 1
    if reduced_decode:
      scale = _draft_scale(self.width, self.height,
                           _draft_request(self.width, self.height, box, size))
    width = (self.width + scale - 1) // scale
    height = (self.height + scale - 1) // scale
    scale_x, scale_y = width / self.width, height / self.height
    left, top = box[0] * scale_x, box[1] * scale_y
    right, bottom = box[2] * scale_x, box[3] * scale_y
    # PIL's bilinear filter reads `support` = max(1, box side / size) pixels
    # either side of each sample's centre; one more pixel covers its
    # rounding. Pixels past the image edge are clamped by PIL either way.
    margin_x = math.ceil(max(1.0, (right - left) / size)) + 1
    margin_y = math.ceil(max(1.0, (bottom - top) / size)) + 1
    x0 = max(0, math.floor(left) - margin_x)
    y0 = max(0, math.floor(top) - margin_y)
    x1 = min(width, math.ceil(right) + margin_x)
    y1 = min(height, math.ceil(bottom) + margin_y)
    window = self._decode_window(scale, x0, y0, x1 - x0, y1 - y0)
    return Image.fromarray(window).resize(
        (size, size), Image.Resampling.BILINEAR,
        box=(left - x0, top - y0, right - x0, bottom - y0))

  def _decode_error(self, error: Exception) -> images.ImageError:
    return images.ImageError(self._where, str(error))

  def _jpeg_size(self, data: bytes):
    try:
      return jpeg.size(data)
    except ValueError as e:
      raise self._decode_error(e) from e

  def _decode_window(self, scale: int, left: int, top: int, width: int,
                     height: int) -> np.ndarray:
    try:
      return jpeg.decode_crop(self._jpeg, scale, left, top, width, height)
    except ValueError as e:
      raise self._decode_error(e) from e

  def _decode(self, pil: Image.Image) -> Image.Image:
    # Grayscale, palette, CMYK, RGBA (alpha dropped), 16-bit (>> 8), ...
    return images.to_rgb(pil, self._where)


def _draft_request(width: int, height: int, box, size: int) -> tuple[int, int]:
  """The smallest full-image size at which `box` spans `size` pixels."""
  left, top, right, bottom = box
  return (math.ceil(width * size / (right - left)),
          math.ceil(height * size / (bottom - top)))


def _draft_scale(width: int, height: int, request: tuple[int, int]) -> int:
  """The DCT reduction PIL's JPEG `draft(mode, request)` picks."""
  fits = min(width // request[0], height // request[1])
  return next((scale for scale in (8, 4, 2) if fits >= scale), 1)


def image_where(element: dict[str, Any], options: PreprocessOptions) -> str:
  """Where an example's image is, for errors: its file_name when it has one."""
  name = element.get('file_name')
  if name is None:
    return options.where
  if isinstance(name, np.ndarray):
    name = name.item()
  if isinstance(name, bytes):
    name = name.decode(errors='replace')
  return f'{options.where}, file_name {name!r}'


def check_label(label: Any, options: PreprocessOptions) -> np.int32:
  """The label as int32, checked to lie in [0, num_classes)."""
  label = np.asarray(label)
  if label.shape != () or label.dtype.kind not in 'iu':
    raise ValueError(
        f"Label {label!r} in {options.where}: the 'label' feature must be a "
        'scalar integer class index.')
  if not 0 <= label < options.num_classes:
    raise ValueError(
        f'config.num_classes is {options.num_classes} but label {int(label)} '
        f"appeared in {options.where}; set config.num_classes to the "
        f"dataset's number of classes (labels must lie in [0, num_classes), so "
        f'at least {int(label) + 1}).')
  return np.int32(label)


def random_resized_crop_box(rng: np.random.Generator, height: int,
                            width: int) -> tuple[int, int, int, int]:
  """Inception-style crop (left, top, right, bottom), as torchvision does."""
  area = height * width
  log_ratio = np.log(CROP_ASPECT_RANGE)
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(*CROP_AREA_RANGE)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  # Fallback: the whole image, cropped centrally to the allowed aspect range.
  in_ratio = width / height
  if in_ratio < CROP_ASPECT_RANGE[0]:
    w, h = width, int(round(width / CROP_ASPECT_RANGE[0]))
  elif in_ratio > CROP_ASPECT_RANGE[1]:
    w, h = int(round(height * CROP_ASPECT_RANGE[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resize_center_crop_box(height: int, width: int, size: int,
                           crop_ratio: float) -> tuple[float, ...]:
  """Box of the stored image that "resize shorter side, centre crop" keeps.

  Resizing the shorter side to size / crop_ratio and then cropping the centre
  size x size equals resizing just this box to size x size (PIL samples the
  same source positions), without computing the discarded pixels.

  Args:
    height: stored image height.
    width: stored image width.
    size: output side.
    crop_ratio: fraction of the resized shorter side kept.

  Returns:
    (left, top, right, bottom) in stored-image pixels.
  """
  resize_to = max(size, int(round(size / crop_ratio)))
  if height <= width:
    new_h, new_w = resize_to, int(resize_to * width / height)
  else:
    new_h, new_w = int(resize_to * height / width), resize_to
  top = int(round((new_h - size) / 2))
  left = int(round((new_w - size) / 2))
  scale_x, scale_y = width / new_w, height / new_h
  return (left * scale_x, top * scale_y, (left + size) * scale_x,
          (top + size) * scale_y)


def _resized(stored: StoredImage, size: int) -> np.ndarray:
  """The whole image at size x size (no copy when it already is)."""
  if (stored.height, stored.width) == (size, size):
    return stored.array()
  return stored.crop_resize((0, 0, stored.width, stored.height), size)


def cifar_crop_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad CIFAR_PAD pixels, random crop back to the input size, flip."""
  h, w, c = image.shape
  padded = np.zeros((h + 2 * CIFAR_PAD, w + 2 * CIFAR_PAD, c), image.dtype)
  padded[CIFAR_PAD:CIFAR_PAD + h, CIFAR_PAD:CIFAR_PAD + w] = image
  top, left = rng.integers(0, 2 * CIFAR_PAD + 1, size=2)
  image = padded[top:top + h, left:left + w]
  return image[:, ::-1] if rng.random() < 0.5 else image


def train_image(stored: StoredImage, rng: np.random.Generator,
                options: PreprocessOptions) -> np.ndarray:
  """Augmented uint8 (image_size, image_size, 3) training image."""
  size = options.image_size
  if options.augment == 'imagenet':
    box = random_resized_crop_box(rng, stored.height, stored.width)
    flip = rng.random() < 0.5
    return stored.crop_resize(box, size, reduced_decode=True, flip=flip)
  if options.augment == 'cifar':
    return cifar_crop_flip(_resized(stored, size), rng)
  if options.augment == 'none':
    return _resized(stored, size)
  raise ValueError(f'config.augment={options.augment!r}; use one of '
                   f'{AUGMENTATIONS}.')


def eval_image(stored: StoredImage, options: PreprocessOptions) -> np.ndarray:
  """Deterministic uint8 (image_size, image_size, 3) evaluation image."""
  size = options.image_size
  if (options.augment == 'imagenet'
      and (stored.height, stored.width) != (size, size)):
    box = resize_center_crop_box(stored.height, stored.width, size,
                                 options.eval_crop_ratio)
    return stored.crop_resize(box, size)
  return _resized(stored, size)


class _Normalizer:
  """(pixel - mean) / std in float32, channels in options.channel_order."""

  def __init__(self, options: PreprocessOptions):
    # Output channel c reads input channel order[c], against its own mean.
    self._order = CHANNEL_ORDERS[options.channel_order]
    self._mean = np.asarray(options.mean_rgb, np.float32)[self._order]
    self._std = np.asarray(options.std_rgb, np.float32)[self._order]
    self._table = pixels.normalization_table(self._mean, self._std)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != self._mean.size:
      return (image.astype(np.float32) - self._mean) / self._std
    out = np.empty(image.shape, np.float32)
    self.write(image, out)
    return out

  def write(self, image: np.ndarray, out: np.ndarray) -> None:
    """Normalises uint8 (H, W, 3) RGB `image` into float32 `out` of its
    shape."""
    if self._order != RGB_ORDER:
      # The extension needs adjacent channels: one uint8 copy, reordered.
      image = np.ascontiguousarray(image[..., self._order])
    if pixels.normalize_into(image, self._table, out):
      return
    # The same float32 operations, on rows against the constants tiled along
    # a row: numpy then runs its vector loops over whole rows, not over
    # 3-element inner loops (2.5x faster on 224x224, bit for bit equal).
    height, width, channels = image.shape
    rows = out.reshape(height, width * channels)
    np.subtract(image.reshape(height, width * channels),
                np.tile(self._mean, width), out=rows, dtype=np.float32)
    rows /= np.tile(self._std, width)


class TrainPreprocess(grain.transforms.RandomMap):
  """Example dict -> {'image': uint8 (S, S, 3), 'label': int32}.

  The image is normalised by `NormalizedBatch` when batched.
  """

  def __init__(self, options: PreprocessOptions):
    self._options = options

  def random_map(self, element: dict[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    label = check_label(element['label'], self._options)
    stored = StoredImage(element['image'], image_where(element, self._options))
    image = train_image(stored, rng, self._options)
    return {'image': image, 'label': label}


class NormalizedBatch:
  """grain batch_fn: TrainPreprocess outputs -> one float32 batch.

  Normalising while copying each uint8 image into the batch touches every
  float once, instead of a float32 image per example that stacking copies
  again.
  """

  def __init__(self, options: PreprocessOptions):
    self._normalize = _Normalizer(options)

  def __call__(self, examples) -> dict[str, np.ndarray]:
    first = examples[0]['image']
    images = np.empty((len(examples), *first.shape), np.float32)
    for example, out in zip(examples, images):
      self._normalize.write(example['image'], out)
    labels = np.stack([example['label'] for example in examples])
    return {'image': images, 'label': labels}


class EvalPreprocess(grain.transforms.Map):
  """Example with 'mask' -> {'image', 'label', 'mask'}; padding -> zeros."""

  def __init__(self, options: PreprocessOptions):
    self._options = options
    self._normalize = _Normalizer(options)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    if not element['mask']:
      size = self._options.image_size
      return {'image': np.zeros((size, size, 3), np.float32),
              'label': np.int32(0), 'mask': np.bool_(False)}
    label = check_label(element['label'], self._options)
    stored = StoredImage(element['image'], image_where(element, self._options))
    image = eval_image(stored, self._options)
    return {'image': self._normalize(image), 'label': label,
            'mask': np.bool_(True)}

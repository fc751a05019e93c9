"""The evaluation preprocessing each set of published weights was measured with.

A checkpoint's top-1 holds only for the preprocessing its publisher used:
torchvision V1 weights resize the shorter side to 256, V2 to 232; timm resizes
bicubically to input_size / crop_pct; Keras' ResNet50 wants BGR minus the
caffe means, its ResNetV2 [-1, 1]; MXNet resizes with OpenCV (no antialias).
`EvalTransform` states one such rule as data and applies it to a PIL image or
a uint8 array, giving what the publisher's own code gives (the tests compare
against that code on photographs and odd sizes; README lists the measured
worst differences).

    pre = flax_resnet.load_pretrained('resnet50', 'IMAGENET1K_V2')
    x = pre.transform(PIL.Image.open(path))   # float32 (224, 224, 3)
    logits = pre.model.apply(pre.variables, x[None], train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras imagenet_utils 'caffe'

# How the image reaches crop_size x crop_size.
RESIZE_RULES = {
    'shorter': 'resize shorter side to {resize_size} -> centre crop '
               '{crop_size}',
    'exact': 'resize both sides to {resize_size}',
    'box': 'resize the centre box that "shorter side to {resize_size}, centre '
           'crop {crop_size}" keeps to {crop_size}x{crop_size} (an image '
           'already {crop_size}x{crop_size} is kept as is)',
}
INTERPOLATIONS = {'nearest': Image.Resampling.NEAREST,
                  'bilinear': Image.Resampling.BILINEAR,
                  'bicubic': Image.Resampling.BICUBIC}
# 'pil': PIL's Image.resize (a convolution that widens with the scale factor:
# antialiased); torchvision and timm call it for PIL images, Keras' load_img
# too. 'opencv': OpenCV's cv::resize INTER_LINEAR on uint8, MXNet's
# image.resize (2x2 taps whatever the scale: no antialias), see _opencv.py.
RESAMPLERS = ('pil', 'opencv')
# Centre-crop offset (image side - crop) / 2: torchvision rounds it
# (int(round(x))), MXNet's image.center_crop truncates (int(x)).
CROP_OFFSETS = ('round', 'floor')


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """One evaluation preprocessing rule: image -> float32 (crop, crop, 3).

  Output pixel = (uint8 value / scale - mean[c]) / std[c] in float32, in the
  channel order `channels` (mean and std are given in that order).

  Attributes:
    name: the publisher's name for the rule (shown by describe()).
    resize: a key of RESIZE_RULES.
    resize_size: shorter side ('shorter', 'box') or both sides ('exact').
    crop_size: output side.
    interpolation: 'nearest', 'bilinear' or 'bicubic'.
    resampler: 'pil' or 'opencv' (see RESAMPLERS).
    crop_offset: 'round' or 'floor' (see CROP_OFFSETS).
    channels: 'RGB' or 'BGR'.
    scale: pixels are divided by this first (255.0, 127.5, 1.0).
    mean: subtracted after scaling, per output channel.
    std: divides after the mean, per output channel.
    crop_pct: for 'box', the kept fraction the training config gives
      (eval_crop_ratio); elsewhere only shown (timm's crop_pct).
  """
  name: str
  resize: str
  resize_size: int
  crop_size: int
  interpolation: str = 'bilinear'
  resampler: str = 'pil'
  crop_offset: str = 'round'
  channels: str = 'RGB'
  scale: float = 255.0
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  crop_pct: Optional[float] = None

  def __post_init__(self):
    for field, allowed in (('resize', tuple(RESIZE_RULES)),
                           ('interpolation', tuple(INTERPOLATIONS)),
                           ('resampler', RESAMPLERS),
                           ('crop_offset', CROP_OFFSETS),
                           ('channels', ('RGB', 'BGR'))):
      if getattr(self, field) not in allowed:
        raise ValueError(f'EvalTransform {field}={getattr(self, field)!r}; '
                         f'use one of {allowed}.')
    if self.resampler == 'opencv' and (self.interpolation != 'bilinear'
                                       or self.resize == 'box'):
      raise ValueError("EvalTransform resampler='opencv' implements only "
                       "interpolation='bilinear' (MXNet's default) and "
                       "resize 'shorter' or 'exact'.")
    if self.resize == 'box' and self.crop_pct is None:
      raise ValueError("EvalTransform resize='box' needs crop_pct.")
    if self.crop_size < 1 or self.resize_size < self.crop_size:
      raise ValueError(
          f'EvalTransform crop_size={self.crop_size}, resize_size='
          f'{self.resize_size}: need 1 <= crop_size <= resize_size.')
    for field in ('mean', 'std'):
      if len(getattr(self, field)) != 3:
        raise ValueError(f'EvalTransform {field} needs 3 values, one per '
                         f'channel; got {getattr(self, field)!r}.')
    if 0 in self.std or self.scale == 0:
      raise ValueError(f'EvalTransform std={self.std!r}, scale={self.scale!r}'
                       ': they divide, so none may be 0.')
    object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
    object.__setattr__(self, 'std', tuple(float(s) for s in self.std))

  @property
  def image_size(self) -> int:
    """Side of the square output."""
    return self.crop_size

  def describe(self) -> str:
    """One line: the resize, the crop, the normalisation."""
    resize = RESIZE_RULES[self.resize].format(
        resize_size=self.resize_size, crop_size=self.crop_size)
    if self.resize == 'exact' and self.crop_size < self.resize_size:
      resize += f' -> centre crop {self.crop_size}'

    how = [self.interpolation]
    if self.resampler == 'opencv':
      how.append('OpenCV, no antialias')
    else:
      how.append('PIL' if self.interpolation == 'nearest' else
                 'PIL, antialias')
    if self.crop_offset == 'floor' and self.resize != 'exact':
      how.append('crop offset floored')
    parts = resize.split(' -> ', 1)
    parts[0] += f' ({", ".join(how)})'
    scale = '' if self.scale == 1 else f' /{self.scale:g}'
    norm = f'{self.channels}{scale}, mean {_numbers(self.mean)}'
    if any(s != 1 for s in self.std):
      norm += f', std {_numbers(self.std)}'
    return f'{" -> ".join(parts)} -> {norm}'

  def __call__(self, image: Any) -> np.ndarray:
    """float32 (crop_size, crop_size, 3) of an image.

    Args:
      image: a PIL image (any mode; converted to RGB as the publishers'
        loaders do), a uint8 (H, W, 3) RGB or (H, W) grayscale array, or the
        bytes of an encoded file (for a training config's transform, decoded
        exactly as the training pipeline decodes them).
    """
    pixels = self.resized(image)
    return normalization_table(self)[pixels, np.arange(3)]

  def batch(self, images: Sequence[Any]) -> np.ndarray:
    """float32 (N, crop_size, crop_size, 3)."""
    out = np.empty((len(images), self.crop_size, self.crop_size, 3),
                   np.float32)
    for i, image in enumerate(images):
      out[i] = self(image)
    return out

  def resized(self, image: Any) -> np.ndarray:
    """The uint8 (crop_size, crop_size, 3) image before normalisation."""
    if isinstance(image, (bytes, bytearray)):
      if self.resize == 'box':
        return self._pipeline_resized(bytes(image))
      image = _open(bytes(image))
    pil, array = _as_rgb(image)
    size = self.crop_size
    if self.resampler == 'opencv':
      from flax_resnet.pretrained import _opencv  # pylint: disable=g-import-not-at-top
      if array is None:
        array = np.asarray(pil)
      height, width = array.shape[:2]
      new_h, new_w = _resized_shape(height, width, self)
      array = _opencv.resize_linear(array, new_h, new_w)
      out = _center_crop(array, size, self.crop_offset)
    else:
      if pil is None:
        pil = Image.fromarray(array)
      out = self._pil_resized(pil)
    if self.channels == 'BGR':
      out = out[..., ::-1]
    return np.ascontiguousarray(out)

  def _pipeline_box(self, height: int, width: int):
    """The training pipeline's own box (data/preprocess.py) for 'box', so
    that a config's transform is what its eval feeds the model; None for an
    image already crop_size square, which the pipeline only normalises."""
    from flax_resnet.data import preprocess  # pylint: disable=g-import-not-at-top
    if (height, width) == (self.crop_size, self.crop_size):
      return None
    return preprocess.resize_center_crop_box(height, width, self.crop_size,
                                             self.crop_pct)

  def _pipeline_resized(self, data: bytes) -> np.ndarray:
    """The training pipeline's decode + resize of an encoded image: its JPEG
    decoder reads only the box, and PIL's resize of that smaller window can
    round 1/255 apart from resizing the whole decoded image."""
    from flax_resnet.data import preprocess  # pylint: disable=g-import-not-at-top
    stored = preprocess.StoredImage(data, 'image')
    box = self._pipeline_box(stored.height, stored.width)
    return stored.array() if box is None else stored.crop_resize(
        box, self.crop_size)

  def _pil_resized(self, pil: Image.Image) -> np.ndarray:
    size = self.crop_size
    width, height = pil.size
    method = INTERPOLATIONS[self.interpolation]
    if self.resize == 'box':
      box = self._pipeline_box(height, width)
      return np.asarray(pil if box is None else
                        pil.resize((size, size), method, box=box))
    new_h, new_w = _resized_shape(height, width, self)
    if (new_h, new_w) != (height, width):
      pil = pil.resize((new_w, new_h), method)
    return _center_crop(np.asarray(pil), size, self.crop_offset)


def _numbers(values: Sequence[float]) -> str:
  return '(' + ', '.join(f'{v:g}' for v in values) + ')'


def _open(data: bytes) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except (OSError, ValueError) as e:
    raise ValueError(f'image: could not decode the {len(data)} bytes '
                     f'given: {e}') from e
  return image


def _as_rgb(image: Any) -> tuple[Optional[Image.Image], Optional[np.ndarray]]:
  """(PIL RGB image, None) or (None, uint8 (H, W, 3) array)."""
  if isinstance(image, Image.Image):
    # Every publisher's loader converts this way (torchvision's and timm's
    # ImageFolder, keras load_img): grayscale repeated, alpha dropped,
    # palette looked up.
    return (image if image.mode == 'RGB' else image.convert('RGB')), None
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3) or array.dtype != np.uint8:
    raise ValueError(
        f'image: got an array of shape {array.shape} and dtype {array.dtype};'
        ' pass a PIL image or a uint8 (height, width, 3) RGB array.')
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f'image: got an empty array of shape {array.shape}.')
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return None, np.ascontiguousarray(array)


def _resized_shape(height: int, width: int,
                   transform: EvalTransform) -> tuple[int, int]:
  """(new_h, new_w) before the crop; torchvision's and MXNet's arithmetic."""
  size = transform.resize_size
  if transform.resize == 'exact':
    return size, size
  if height <= width:  # int(size * long / short): both libraries' rule
    return size, int(size * width / height)
  return int(size * height / width), size


def _center_crop(array: np.ndarray, size: int, offset: str) -> np.ndarray:
  height, width = array.shape[:2]
  if (height, width) == (size, size):
    return array
  if offset == 'round':
    top, left = (int(round((height - size) / 2.0)),
                 int(round((width - size) / 2.0)))
  else:
    top, left = int((height - size) / 2), int((width - size) / 2)
  return array[top:top + size, left:left + size]


@functools.lru_cache(maxsize=64)
def normalization_table(transform: EvalTransform) -> np.ndarray:
  """(256, 3) float32: (value / scale - mean[c]) / std[c], float32 steps.

  Each step rounds to float32 as torchvision's, timm's, MXNet's and Keras'
  own float32 arithmetic does (the parity tests compare bit for bit).
  """
  values = np.arange(256, dtype=np.float32)[:, None]
  scaled = values / np.float32(transform.scale)
  table = ((scaled - np.asarray(transform.mean, np.float32))
           / np.asarray(transform.std, np.float32)).astype(np.float32)
  table.setflags(write=False)  # shared by every call (cached)
  return table


# ------------------------------------------------------ the publishers' rules


def torchvision(resize_size: int = 256, crop_size: int = 224) -> EvalTransform:
  """torchvision.transforms._presets.ImageClassification (PIL input)."""
  return EvalTransform(
      f'torchvision ImageClassification(crop_size={crop_size}, '
      f'resize_size={resize_size})', 'shorter', resize_size, crop_size)


def timm(input_size: int, crop_pct: float,
         interpolation: str = 'bicubic',
         mean: tuple[float, ...] = IMAGENET_MEAN,
         std: tuple[float, ...] = IMAGENET_STD) -> EvalTransform:
  """timm.data.create_transform(**resolve_data_config(pretrained_cfg)).

  crop_mode 'center' with a square input_size: torchvision's Resize of the
  shorter side to floor(input_size / crop_pct), CenterCrop(input_size).
  """
  return EvalTransform(
      f'timm input_size={input_size} crop_pct={crop_pct:g} {interpolation}',
      'shorter', math.floor(input_size / crop_pct), input_size,
      interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct)


def gluon(resize_size: int = 256, crop_size: int = 224) -> EvalTransform:
  """Gluon model zoo / GluonCV ImageNet eval: Resize(keep_ratio=True),
  CenterCrop, ToTensor, Normalize (mxnet.gluon.data.vision.transforms)."""
  return EvalTransform(
      f'gluon Resize({resize_size}, keep_ratio=True), '
      f'CenterCrop({crop_size})', 'shorter', resize_size, crop_size,
      resampler='opencv', crop_offset='floor')


def keras(mode: str, size: int = 224) -> EvalTransform:
  """keras.utils.load_img(path, target_size=(size, size)) (interpolation
  'nearest', Keras' documented example), then preprocess_input in `mode`:
  'caffe' (keras.applications.resnet) or 'tf' (resnet_v2)."""
  if mode == 'caffe':
    return EvalTransform(
        f'keras load_img(target_size=({size}, {size})) + preprocess_input '
        "mode 'caffe'", 'exact', size, size, interpolation='nearest',
        channels='BGR', scale=1.0, mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0))
  if mode == 'tf':
    return EvalTransform(
        f'keras load_img(target_size=({size}, {size})) + preprocess_input '
        "mode 'tf'", 'exact', size, size, interpolation='nearest',
        scale=127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))
  raise ValueError(f"keras mode={mode!r}; use 'caffe' or 'tf'.")


def from_config(config) -> EvalTransform:
  """The eval transform a training config implies (data/preprocess.py).

  Bit for bit what `EvalPreprocess` feeds the model for a decoded image:
  with augment 'imagenet' the box that "shorter side to image_size /
  eval_crop_ratio, centre crop" keeps, resized bilinearly (an image already
  image_size square is only normalised); otherwise the whole image resized
  to image_size. Then (pixel - mean_rgb) / std_rgb, in config.channel_order
  (mean and std reordered with the channels).
  """
  size = int(config.image_size)
  channels = config.get('channel_order', 'RGB')  # older runs' configs: RGB
  order = slice(None, None, -1 if channels == 'BGR' else 1)
  mean = tuple(float(m) for m in config.mean_rgb)[order]
  std = tuple(float(s) for s in config.std_rgb)[order]
  if config.augment == 'imagenet':
    ratio = float(config.eval_crop_ratio)
    return EvalTransform(
        f'training config (augment imagenet, eval_crop_ratio {ratio:g})',
        'box', max(size, int(round(size / ratio))), size, scale=1.0,
        channels=channels, mean=mean, std=std, crop_pct=ratio)
  return EvalTransform(f'training config (augment {config.augment})',
                       'exact', size, size, scale=1.0, channels=channels,
                       mean=mean, std=std)

"""OpenCV's cv::resize(INTER_LINEAR) on uint8 images, in numpy.

MXNet's image.resize (Gluon's transforms.Resize) calls the OpenCV linked
into it (3.4.2 in mxnet 1.9.1). OpenCV is not a dependency here, so its
arithmetic (modules/imgproc/src/resize.cpp) is reproduced: 2 taps per axis
at (d + 0.5) * scale - 0.5, weights rounded to 11-bit fixed point; the
horizontal pass keeps ints, the vertical pass is OpenCV's vectorised one
(VResizeLinearVec_32s8u: the high 16 bits of (row >> 4) * weight for each of
the two rows, summed, rounded by 2 bits; its scalar loop would round
differently on ~12% of the pixels). An exact 2x reduction on both axes is
INTER_AREA (2x2 means), as OpenCV switches to. No antialiasing: that is
MXNet's behaviour. tests/test_transforms_parity.py compares it with MXNet.
"""

from __future__ import annotations

import numpy as np

_COEF_BITS = 11
_COEF_SCALE = 1 << _COEF_BITS


def _taps(src: int, dst: int, clamp_weights: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per output index: first source index, 2nd index, int16 weights (2,).

  Past the borders OpenCV clamps the source index either way, but moves the
  weight onto one pixel only horizontally (clamp_weights); vertically the
  same row is read twice with both weights, and each product truncates.
  """
  scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x
  pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(
      np.float32)
  first = np.floor(pos).astype(np.int64)
  frac = (pos - first.astype(np.float32)).astype(np.float32)
  if clamp_weights:
    low = first < 0
    frac[low], first[low] = 0, 0
    high = first >= src - 1
    frac[high], first[high] = 0, src - 1
  weights = np.stack([np.float32(1) - frac, frac], axis=-1)
  # saturate_cast<short>(w * 2048): cvRound, half to even.
  weights = np.rint(weights * np.float32(_COEF_SCALE)).astype(np.int32)
  return (np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1),
          weights)


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (height, width, C) as cv::resize INTER_LINEAR."""
  src_h, src_w = image.shape[:2]
  if (src_h, src_w) == (height, width):
    return image
  if src_h == 2 * height and src_w == 2 * width:
    quads = image.reshape(height, 2, width, 2, -1).astype(np.int32)
    return ((quads.sum(axis=(1, 3)) + 2) >> 2).astype(np.uint8)
  x0, x1, wx = _taps(src_w, width, clamp_weights=True)
  y0, y1, wy = _taps(src_h, height, clamp_weights=False)
  pixels = image.astype(np.int32)
  # Horizontal pass: ints, S[x0] * a0 + S[x1] * a1 (up to 255 * 2048).
  rows = (pixels[:, x0] * wx[None, :, 0, None]
          + pixels[:, x1] * wx[None, :, 1, None])
  top, bottom = rows[y0] >> 4, rows[y1] >> 4
  # v_mul_hi on int16: (a * b) >> 16, then a rounding shift by 2.
  out = (((top * wy[:, 0, None, None]) >> 16)
         + ((bottom * wy[:, 1, None, None]) >> 16) + 2) >> 2
  return np.clip(out, 0, 255).astype(np.uint8)

"""XLA:CPU compiler options the model's steps need, if any."""

from __future__ import annotations

from typing import Optional

import jax

from flax_resnet.cpu import onednn

# XLA:CPU hands every convolution with more than 16 channels to YNNPACK, whose
# weight-gradient convolutions (a window as large as the image) run up to 10x
# slower than XLA's own Eigen convolution; dots and reductions stay on
# YNNPACK. Enum names as jaxlib 0.10.2 spells them (see BENCHMARKS.md).
XLA_CONV_COMPILER_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def compiler_options(platform: Optional[str] = None) -> Optional[dict]:
  """Options for `jax.jit(..., compiler_options=...)` of the model's steps.

  Only needed where XLA:CPU runs the convolutions itself (the oneDNN
  extension unavailable, or several devices: see conv.py): then
  XLA_CONV_COMPILER_OPTIONS. With oneDNN there
  are no XLA convolutions left to steer, and XLA's defaults measured faster
  (BENCHMARKS.md); None on other platforms.
  """
  platform = platform or jax.default_backend()
  if platform != 'cpu' or (onednn.available() and jax.device_count() == 1):
    return None
  return dict(XLA_CONV_COMPILER_OPTIONS)

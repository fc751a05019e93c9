"""`load_weights`: one entry point for every format, told from the content.

The file's bytes pick the reader (files.sniff); the tensor names pick the
name map. Each format module offers `matches(names)` and a converter; to add
a format, add its module and one line to NAMINGS.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import numpy as np

from flax_resnet.convert import files
from flax_resnet.convert import huggingface
from flax_resnet.convert import keras
from flax_resnet.convert import mxnet
from flax_resnet.convert import pytorch
from flax_resnet.convert.keymap import ModelLike

Source = Union[Mapping[str, Any], str, os.PathLike]

# Checked in this order; torchvision / timm names are the fallback.
NAMINGS = (
    ('keras', keras.matches),
    ('gluon', mxnet.matches),
    ('huggingface', huggingface.matches),
    ('torch', pytorch.matches),
)


def read_arrays(source: Source) -> tuple[str, dict[str, Any]]:
  """(file format, {name: array}) of a file or mapping, read by content."""
  if isinstance(source, (str, os.PathLike)):
    kind = files.sniff(source)
    if kind == 'mxnet':
      return kind, mxnet.read_params(source)
    if kind in ('hdf5', 'keras-zip'):
      return kind, keras.read_h5(source)
    return kind, pytorch.load_state_dict(source)
  if isinstance(source, Mapping):
    return 'mapping', pytorch.load_state_dict(source)
  raise ValueError(
      f'weights must be a file path or a mapping of names to arrays, got '
      f'{type(source).__name__}.')


def naming(names) -> str:
  """Which library's names these are: keras, gluon, huggingface or torch."""
  names = list(names)
  return next(label for label, match in NAMINGS if match(names))


def load_weights(source: Source, model: ModelLike, *, strict: bool = True,
                 skip_head: bool = False, base=None, rng=None,
                 **overrides: Any) -> dict[str, Any]:
  """Flax variables for `model` from weights of any supported library.

  Args:
    source: a file — torch `.pth`/`.pt`/`.bin` (zip or legacy pickle, read
      with weights_only=True: nothing in it is executed), `.safetensors`,
      MXNet Gluon `.params` (structural or prefixed names), Keras 3
      `.weights.h5` / `.keras`, legacy Keras `.h5` — or a mapping of names to
      arrays (torch tensors, numpy, jax). The format is told from the bytes
      and the names, not from the file extension. Hugging Face transformers
      ResNet names and timm names (e.g. resnet50d) are recognised.
    model: a preset name, ResNetSpec or ResNet that is the same network as
      the file's: 'resnet50' for torchvision, 'gluon_resnet50_v1' for Gluon,
      'keras_resnet50' / 'keras_resnet50_v2' for Keras, 'resnet50d' for timm.
    strict, skip_head, base, rng: as in `torch_to_flax`.
    **overrides: ResNetSpec fields, e.g. num_classes=10.

  Returns:
    {'params': ..., 'batch_stats': ...} for `model.apply(variables, x,
    train=False)`.

  Raises:
    StateDictMismatch (a ValueError) listing missing, unexpected and
    mis-shaped tensors with a suggested fix; ValueError naming the file when
    it cannot be read.
  """
  _, arrays = read_arrays(source)
  if not arrays:
    raise ValueError(f'{source} holds no tensors.')
  kw = dict(strict=strict, skip_head=skip_head, base=base, rng=rng,
            **overrides)
  label = naming(arrays)
  if label == 'keras':
    return keras.keras_to_flax(arrays, model, **kw)
  if label == 'gluon':
    return mxnet.gluon_to_flax(arrays, model, **kw)
  if label == 'huggingface':
    arrays = huggingface.hf_to_torchvision_keys(arrays)
  return pytorch.torch_to_flax(arrays, model, **kw)

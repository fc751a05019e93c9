"""`load_weights`: one entry point for every format, told from the content.

The file's bytes pick the reader (files.sniff); the tensor names pick the
name map. Each format module offers `matches(names)` and a converter; to add
a format, add its module and one line to NAMINGS.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from flax_resnet.convert import files
from flax_resnet.convert import huggingface
from flax_resnet.convert import keras
from flax_resnet.convert import mxnet
from flax_resnet.convert import pytorch
from flax_resnet.convert.keymap import ModelLike, StateDictMismatch

Source = Union[Mapping[str, Any], str, os.PathLike]


class NonFiniteWeights(ValueError):
  """Weights hold NaN/Inf (or a negative BatchNorm variance): the file is
  damaged or was saved from a run that diverged."""

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


def nonfinite_problem(named_arrays: Iterable[tuple[str, Any]]
                      ) -> Optional[str]:
  """'tensor NAME (shape) holds 3 NaN ...' for the first array with NaN/Inf.

  Integer arrays (num_batches_tracked) are skipped; None if all are finite.
  """
  for name, array in named_arrays:
    array = np.asarray(array)
    if array.dtype.kind in 'biu':
      continue
    if array.dtype.kind not in 'fc':  # bfloat16 and other ml_dtypes floats
      array = array.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
      nan = int(np.isnan(array).sum())
      return (f'tensor {name!r} {tuple(array.shape)} holds {nan:,} NaN and '
              f'{int(array.size - finite.sum()) - nan:,} Inf of its '
              f'{array.size:,} values')
  return None


def negative_variance_problem(batch_stats: Mapping[str, Any], prefix=()
                              ) -> Optional[str]:
  """The first BatchNorm 'var' below zero (its outputs would be NaN)."""
  for key, value in batch_stats.items():
    path = (*prefix, key)
    if isinstance(value, Mapping):
      problem = negative_variance_problem(value, path)
      if problem:
        return problem
    elif key == 'var' and (np.asarray(value) < 0).any():
      return (f'BatchNorm variance batch_stats/{"/".join(path)} has '
              f'{int((np.asarray(value) < 0).sum())} negative values (a '
              'variance is >= 0; its outputs would be NaN)')
  return None


def _check_numbers(arrays: Mapping[str, Any], variables, where: str):
  """Raises NonFiniteWeights naming the first bad tensor and `where`."""
  problem = nonfinite_problem(arrays.items()) or negative_variance_problem(
      variables.get('batch_stats', {}))
  if problem:
    raise NonFiniteWeights(
        f'{where}: {problem}. The file is damaged or was saved from a run '
        'that diverged; use a checkpoint from before the divergence, or '
        'download it again.')


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
    mis-shaped tensors with a suggested fix; NonFiniteWeights (a ValueError)
    naming the first tensor with NaN/Inf, or a negative BatchNorm variance,
    and the file; ValueError naming the file when it cannot be read.
  """
  _, arrays = read_arrays(source)
  where = (str(source) if isinstance(source, (str, os.PathLike)) else
           'the state_dict')
  if not arrays:
    raise ValueError(f'{where} holds no tensors.')
  kw = dict(strict=strict, skip_head=skip_head, base=base, rng=rng,
            **overrides)
  label = naming(arrays)
  try:
    if label == 'keras':
      variables = keras.keras_to_flax(arrays, model, **kw)
    elif label == 'gluon':
      variables = mxnet.gluon_to_flax(arrays, model, **kw)
    else:
      if label == 'huggingface':
        arrays = huggingface.hf_to_torchvision_keys(arrays)
      variables = pytorch.torch_to_flax(arrays, model, **kw)
  except StateDictMismatch as e:
    if where == 'the state_dict':
      raise
    # Which file: it may be a download, cached under a name of its URL.
    raise StateDictMismatch(f'{where}: {e}', e.missing, e.unexpected,
                            e.mismatched, e.head_only) from None
  _check_numbers(arrays, variables, where)
  return variables

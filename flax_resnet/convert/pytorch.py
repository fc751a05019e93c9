"""PyTorch (torchvision / timm) state_dicts and safetensors <-> Flax variables.

Conventions:
  * conv weight (out, in/groups, kh, kw) <-> kernel (kh, kw, in/groups, out).
  * Linear weight (out, in) <-> Dense kernel (in, out).
  * BatchNorm weight/bias <-> scale/bias; running_mean/running_var <->
    batch_stats mean/var. `num_batches_tracked` is ignored on the way in and
    written as int64 0 on the way out (torchvision state_dicts carry it, so
    `load_state_dict(strict=True)` needs it; it only matters for momentum=None).
  * BN momentum: torch's momentum=0.1 updates running = 0.9 * running +
    0.1 * batch, which is Flax's momentum=0.9 (our `bn_momentum`, the default).

timm names are torchvision's (timm's deep stem and avg-pool shortcut included),
so timm state_dicts such as resnet50d load here too.

    variables = torch_to_flax('resnet50.pth', 'resnet50')
    state_dict = flax_to_torch(variables, 'resnet50')  # OrderedDict of numpy
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Mapping, Optional, Union

import numpy as np

from flax_resnet.convert import files
from flax_resnet.convert.assemble import assemble, variables_to_arrays
from flax_resnet.convert.keymap import ModelLike, key_map, resolve_model

StateDictLike = Union[Mapping[str, Any], str, os.PathLike]


def _to_numpy(value: Any) -> Any:
  if value is None:
    return None  # reported by name when the model needs it
  if type(value).__module__.startswith('torch'):
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      # numpy has no bfloat16; reinterpret the bits so nothing is rounded.
      import ml_dtypes
      return value.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        'reading or writing .pth files needs PyTorch: pip install '
        'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu') from e
  return torch


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  """The state_dict inside a checkpoint that nests it under a key."""
  for key in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      return obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(
        f'{source} holds a {type(obj).__name__}, not a state_dict; save '
        'model.state_dict() rather than the model object.')
  return obj


def read_safetensors(path) -> dict[str, Any]:
  import safetensors
  import safetensors.numpy
  try:
    try:
      return dict(safetensors.numpy.load_file(str(path)))
    except TypeError:  # bfloat16 has no numpy reader
      import safetensors.torch
      return dict(safetensors.torch.load_file(str(path)))
  except (safetensors.SafetensorError, ValueError) as e:
    raise ValueError(f'{path} is not a readable safetensors file ({e}); its '
                     'header or data is damaged. Save it again.') from e


def read_torch(path) -> Mapping[str, Any]:
  """torch.load with weights_only=True: a pickle is never executed."""
  torch = _torch()
  try:
    # An open file, not the path: torch.load picks a reader by the file's
    # extension (.safetensors), and here the bytes have been checked already.
    with open(path, 'rb') as f:
      obj = torch.load(f, map_location='cpu', weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError,
          ValueError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ValueError(
        f'{path} could not be read as a PyTorch state_dict: {first}. Only '
        'tensors, dicts and plain values are loaded (torch.load with '
        'weights_only=True); a pickled model object or other code is refused '
        'and was not executed. Save model.state_dict() instead.') from e
  return _unwrap(obj, str(path))


def read_file(path) -> dict[str, Any]:
  """The tensors of a torch checkpoint or safetensors file, by content."""
  kind = files.sniff(path)
  if kind == 'safetensors':
    return read_safetensors(path)
  if kind in ('torch-zip', 'torch-pickle'):
    return dict(read_torch(path))
  raise ValueError(
      f'{path} holds {files.FORMATS[kind]}, not PyTorch weights; read it with '
      'flax_resnet.convert.load_weights, which handles every format.')


def load_state_dict(source: StateDictLike) -> dict[str, np.ndarray]:
  """A state_dict as {name: numpy array}.

  Args:
    source: a mapping of names to torch tensors / numpy / jax arrays, or the
      path of a torch checkpoint (`.pth`/`.pt`/`.bin`, zip or legacy pickle,
      read with weights_only=True; a checkpoint that nests the weights under
      'state_dict' or 'model' is unwrapped) or of a safetensors file. The
      format is told from the file's bytes, not its name. A 'module.' prefix
      left by DataParallel / DDP is stripped.
  """
  if isinstance(source, (str, os.PathLike)):
    raw = read_file(files.existing_file(source, 'state_dict file'))
  elif isinstance(source, Mapping):
    raw = _unwrap(source, 'the state_dict')
  else:
    raise ValueError(
        f'state_dict must be a mapping or a file path, got '
        f'{type(source).__name__}.')
  arrays = {str(k): _to_numpy(v) for k, v in raw.items()}
  if arrays and all(k.startswith('module.') for k in arrays):
    arrays = {k[len('module.'):]: v for k, v in arrays.items()}
  return arrays


def matches(keys) -> bool:
  """torchvision / timm names are the default: anything else is checked first."""
  del keys
  return True


def torch_to_flax(state_dict: StateDictLike, model: ModelLike, *,
                  strict: bool = True, skip_head: bool = False,
                  base: Optional[Mapping[str, Any]] = None, rng=None,
                  **overrides: Any) -> dict[str, Any]:
  """Converts a torchvision-named state_dict into Flax variables.

  Args:
    state_dict: see `load_state_dict` (mapping, torch file or safetensors).
    model: a flax_resnet.ResNet, a ResNetSpec or a preset name such as
      'resnet50' / 'resnet50d' (timm names for the deep stem and avg-pool
      shortcut).
    strict: raise `StateDictMismatch` on missing or unexpected keys. Shape
      mismatches always raise. With strict=False unexpected keys are ignored
      and missing ones keep the values of `base` (with a warning).
    skip_head: do not load `fc.*` (any shape); the head comes from `base`.
      For fine-tuning on a new number of classes.
    base: variables supplying whatever is not loaded; by default those
      layers' values under `model.init(rng)` (rng defaults to
      jax.random.key(0)), computed only when needed and only for them.
    rng: see `base`.
    **overrides: ResNetSpec fields applied to `model`, e.g. num_classes=10.

  Returns:
    {'params': ..., 'batch_stats': ...} as jax arrays in the model's dtypes,
    ready for `model.apply(variables, x, train=False)`.

  Raises:
    StateDictMismatch (a ValueError): listing every missing key, unexpected
      key and shape mismatch, with a suggested fix.
  """
  model = resolve_model(model, **overrides)
  arrays = load_state_dict(state_dict)
  if skip_head:
    arrays = {k: v for k, v in arrays.items() if not k.startswith('fc.')}
  return assemble(arrays, key_map(model), model, strict=strict,
                  skip_head=skip_head, base=base, rng=rng,
                  ignored=lambda k: k.endswith('num_batches_tracked'))


def flax_to_torch(variables: Mapping[str, Any], model: ModelLike,
                  **overrides: Any) -> collections.OrderedDict[str, np.ndarray]:
  """Flax variables -> torchvision-named state_dict of numpy arrays.

  The order matches torchvision's `state_dict()`, and each BatchNorm gets a
  `num_batches_tracked` of int64 0, so `torch_model.load_state_dict(
  {k: torch.from_numpy(v) ...}, strict=True)` works. Use `save_torch` /
  `save_safetensors` to write a file.
  """
  model = resolve_model(model, **overrides)
  return variables_to_arrays(variables, key_map(model), model)


def _to_torch_tensor(array: np.ndarray):
  torch = _torch()
  if array.dtype.name == 'bfloat16':
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(array))


def save_torch(variables: Mapping[str, Any], model: ModelLike,
               path: Union[str, os.PathLike], **overrides: Any) -> None:
  """Writes a torchvision-loadable `.pth` (a plain state_dict)."""
  state_dict = flax_to_torch(variables, model, **overrides)
  _torch().save(collections.OrderedDict(
      (k, _to_torch_tensor(v)) for k, v in state_dict.items()), path)


def save_safetensors(variables: Mapping[str, Any], model: ModelLike,
                     path: Union[str, os.PathLike], **overrides: Any) -> None:
  """Writes torchvision names to a `.safetensors` file."""
  state_dict = flax_to_torch(variables, model, **overrides)
  if any(v.dtype.name == 'bfloat16' for v in state_dict.values()):
    import safetensors.torch
    safetensors.torch.save_file(
        {k: _to_torch_tensor(v) for k, v in state_dict.items()}, str(path))
  else:
    import safetensors.numpy
    safetensors.numpy.save_file(dict(state_dict), str(path))

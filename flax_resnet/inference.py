"""Weights to run: a registry tag, a weights file or URL, or a training workdir.

    loaded = inference.load('resnet50', 'IMAGENET1K_V2')
    loaded = inference.load(None, 'runs/quickstart', checkpoint='best')
    loaded.transform(image)   # the weights' own eval preprocessing
    loaded.logits(batch)      # jitted model.apply(variables, batch)

A workdir brings its run's model, its eval preprocessing
(`transforms.from_config`) and its dataset's class names; a registry tag its
publisher's preprocessing and the ImageNet class names. Shared by
`python -m flax_resnet.predict` and `python -m flax_resnet.evaluate`; every
bad input raises `UsageError` naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import pathlib
import sys
from typing import Any, Optional

import numpy as np

from flax_resnet import workdir as workdir_lib

CHECKPOINT_CHOICES = ('latest', 'best')


class UsageError(ValueError):
  """A bad argument; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model with its variables, preprocessing and class names.

  Attributes:
    model: the flax_resnet.ResNet.
    variables: {'params': ..., 'batch_stats': ...}.
    transform: the EvalTransform that turns an image into the model's input.
    transform_source: where `transform` comes from, for the user.
    categories: a name per classifier output, or None (indices are shown).
    source: what was loaded, for the user ('resnet50 IMAGENET1K_V2
      (torchvision)', 'workdir runs/x, step 12').
    published_top1: the publisher's ImageNet top-1 in percent, or None.
    run_config: the training config of a workdir, else None.
    step: the workdir checkpoint's step, else None.
    workdir: the training workdir, else None.
  """
  model: Any
  variables: Any
  transform: Any
  transform_source: str
  categories: Optional[tuple[str, ...]]
  source: str
  published_top1: Optional[float] = None
  run_config: Any = None
  step: Optional[int] = None
  workdir: Optional[pathlib.Path] = None

  @property
  def num_classes(self) -> int:
    return self.model.spec.num_classes

  def category(self, index: int) -> str:
    if self.categories is None:
      return f'class {index}'
    return self.categories[index]

  @functools.cached_property
  def logits(self):
    """jitted (N, S, S, 3) float32 -> (N, num_classes) float32 logits."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax_resnet.train import steps  # pylint: disable=g-import-not-at-top
    model, variables = self.model, self.variables
    return jax.jit(
        lambda x: model.apply(variables, x, train=False).astype(jnp.float32),
        compiler_options=steps.compiler_options())


def load(model: Optional[str], weights: str, *,
         transform: Optional[str] = None, checkpoint: str = 'latest',
         progress: bool = True) -> Loaded:
  """The model and variables `--model`/`--weights` name; see the module doc.

  Args:
    model: a preset (flax_resnet.list_models()); optional for a workdir.
    weights: a registry tag, an http(s)/file URL, a weights file, or a
      training workdir (or its checkpoints/ folder).
    transform: 'PRESET:TAG', whose registry preprocessing to use for a weights
      file or URL; None for the default.
    checkpoint: for a workdir: 'latest', 'best' (highest eval top-1) or a step.
    progress: show download progress bars.

  Raises:
    UsageError: any argument is unusable; the message says which and how.
  """
  path = pathlib.Path(os.path.expanduser(weights))
  if workdir_lib.looks_like_workdir(weights):
    if transform is not None:
      raise UsageError(
          f'--transform {transform}: a workdir brings its own preprocessing '
          "(its run's eval pipeline); leave --transform out.")
    return _load_workdir(model, path, checkpoint)
  if model is not None:
    _check_preset(model)
  check_weights_path(weights)
  if checkpoint != 'latest':
    raise UsageError(f'--checkpoint {checkpoint}: only a training workdir has '
                     f'checkpoints to choose from; --weights {weights} is not '
                     'a folder. Leave --checkpoint out.')
  if model is None:
    raise UsageError(
        f'--model is needed with --weights {weights} (only a training '
        'workdir knows its model); give a preset, e.g. --model resnet50 '
        '(python -m flax_resnet.pretrained lists the published weights).')
  return _load_weights(model, weights, transform, progress)


# ----------------------------------------------------- weights files and tags


_URL_SCHEMES = ('http://', 'https://', 'file://')
_WEIGHT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors', '.params', '.h5',
                    '.keras', '.npz', '.msgpack', '.zip')


def check_weights_path(weights: str) -> None:
  """UsageError for a --weights path (not a tag or URL) that is not on disk."""
  if _names_a_missing_path(weights):
    raise UsageError(
        f'--weights {weights} does not exist; give a training workdir, a '
        'weights file, a URL or a registry tag (python -m '
        'flax_resnet.pretrained lists them).')


def _names_a_missing_path(weights: str) -> bool:
  """A path (not a tag or URL) that is not on disk: a typo or a missing run."""
  if weights.startswith(_URL_SCHEMES):
    return False
  looks_like_path = ('/' in weights or os.sep in weights
                     or weights.startswith(('~', '.'))
                     or weights.lower().endswith(_WEIGHT_SUFFIXES))
  return looks_like_path and not os.path.exists(os.path.expanduser(weights))


def _check_preset(model: str, flag: str = '--model') -> None:
  from flax_resnet import zoo  # pylint: disable=g-import-not-at-top
  try:
    zoo.get_spec(model)
  except ValueError as e:
    raise UsageError(f'{flag} {model}: {e}') from None


def _registry_transform(preset: str, tag: str):
  """(EvalTransform, Weights) of `--transform PRESET:TAG`, or UsageError."""
  from flax_resnet import pretrained  # pylint: disable=g-import-not-at-top
  _check_preset(preset, '--transform')
  entry = pretrained.REGISTRY.get((preset, tag))
  if entry is None or entry.transform is None:
    known = ', '.join(f'{w.preset}:{w.tag}'
                      for w in pretrained.list_pretrained(preset)
                      if w.transform is not None) or f'none for {preset}'
    raise UsageError(
        f'--transform {preset}:{tag} names no registered weights with a known '
        f'preprocessing ({known}; python -m flax_resnet.pretrained lists '
        'all).')
  return entry.transform, entry


def _default_transform(preset: str):
  """(EvalTransform, Weights) of the preset's own publisher's first weights
  with a known preprocessing, or (None, None)."""
  from flax_resnet import pretrained, zoo  # pylint: disable=g-import-not-at-top
  publisher = zoo.get_spec(preset).reference
  entries = sorted((w for w in pretrained.list_pretrained(preset)
                    if w.transform is not None),
                   key=lambda w: (w.publisher != publisher, w.tag))
  if not entries:
    return None, None
  return entries[0].transform, entries[0]


def _parse_transform(text: str) -> tuple[str, str]:
  preset, sep, tag = text.partition(':')
  if not sep or not preset or not tag:
    raise UsageError(
        f'--transform {text}: give PRESET:TAG, a registered weight whose '
        'preprocessing to use, e.g. --transform resnet50:IMAGENET1K_V2.')
  return preset, tag


def _load_weights(model: str, weights: str, transform: Optional[str],
                  progress: bool) -> Loaded:
  from flax_resnet import convert, pretrained  # pylint: disable=g-import-not-at-top
  _check_preset(model)
  if transform is not None:
    chosen = _registry_transform(*_parse_transform(transform))
  else:
    chosen = None
    tag = weights[len(model) + 1:] if weights.startswith(model + '.') else (
        weights)  # 'resnet50.a1_in1k' names the tag 'a1_in1k' too
    is_file = weights.startswith(_URL_SCHEMES) or (
        os.path.exists(os.path.expanduser(weights)))
    if (is_file and (model, tag) not in pretrained.REGISTRY
        and _default_transform(model)[0] is None):
      raise UsageError(
          f'--weights {weights}: no preprocessing is known for these weights '
          f'({model} has no registered weights to take it from); pass '
          '--transform PRESET:TAG naming registered weights with the same '
          'preprocessing, e.g. --transform resnet50:IMAGENET1K_V1.')
  try:
    loaded = _load_pretrained(model, weights, progress)
  except (pretrained.DownloadError, pretrained.ChecksumMismatch) as e:
    raise UsageError(f'--weights {weights}: {e}') from None
  except convert.StateDictMismatch as e:
    raise UsageError(f'--weights {weights} does not fit --model {model}:\n'
                     f'{e}') from None
  except ValueError as e:  # unknown tag, missing file, unreadable file
    raise UsageError(f'--weights {weights}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    # torch / safetensors errors on a file that is no state_dict at all.
    raise UsageError(
        f'--weights {weights} is not a readable weights file '
        f'({convert.unreadable_reason(e)}); give a torchvision '
        '.pth/.safetensors file, a registry tag, a URL or a training '
        'workdir.') from None
  entry = loaded.entry
  if chosen is not None:
    how, (found, source_entry) = 'chosen with --transform', chosen
  elif entry is not None and loaded.transform is not None:
    how, found, source_entry = 'the publisher\'s', loaded.transform, entry
  else:
    found, source_entry = _default_transform(model)
    how = ('a weights file\'s default; choose another with --transform '
           'PRESET:TAG')
  if found is None:  # a registered entry without a recorded preprocessing
    raise UsageError(
        f'--weights {weights}: its registry entry records no preprocessing; '
        'pass --transform PRESET:TAG naming registered weights with the same '
        'preprocessing, e.g. --transform resnet50:IMAGENET1K_V1.')
  categories = loaded.categories
  if categories is None and loaded.model.spec.num_classes == 1000:
    categories = tuple(pretrained.imagenet_categories())
  where = (f'{entry.preset} {entry.tag} ({entry.publisher})' if entry else
           f'{model} from {weights}')
  return Loaded(
      model=loaded.model, variables=loaded.variables, transform=found,
      transform_source=f'{source_entry.preset}:{source_entry.tag} ({how})',
      categories=categories, source=where,
      published_top1=entry.top1 if entry else None)


def _load_pretrained(model: str, weights: str, progress: bool):
  """load_pretrained; a file whose classifier has another size loads whole."""
  from flax_resnet import convert, pretrained  # pylint: disable=g-import-not-at-top
  try:
    loaded = pretrained.load_pretrained(model, weights, progress=progress)
  except convert.StateDictMismatch as e:
    outputs = {got[0] for _, got, _ in e.mismatched if len(got) == 1}
    if not (e.head_only and len(outputs) == 1):
      raise
    # A fine-tuned classifier (the bias is (num_classes,) in every format).
    return pretrained.load_pretrained(model, weights, progress=progress,
                                      num_classes=outputs.pop())
  entry = loaded.entry
  if entry is not None and entry.num_classes != loaded.model.spec.num_classes:
    # load_pretrained gave the preset's head, fresh: here the entry's counts.
    return pretrained.load_pretrained(model, weights, progress=progress,
                                      num_classes=entry.num_classes)
  return loaded


def _load_workdir(model: Optional[str], path: pathlib.Path,
                  checkpoint: str) -> Loaded:
  from flax_resnet.model import ResNet  # pylint: disable=g-import-not-at-top
  from flax_resnet.pretrained import transforms  # pylint: disable=g-import-not-at-top
  try:
    run = workdir_lib.read_run(path, checkpoint, model)
  except workdir_lib.WorkdirError as e:
    raise UsageError(str(e)) from None
  return Loaded(
      model=ResNet(run.spec), variables=run.variables,
      transform=transforms.from_config(run.config),
      transform_source="the run's eval pipeline",
      categories=workdir_lib.run_categories(run.config),
      source=f'{run.config.model} from {run.checkpoints}, step {run.step}' + (
          f' (initialised from {run.initialised_from})'
          if run.initialised_from else ''),
      run_config=run.config, step=run.step, workdir=run.directory)


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
  """--model, --weights, --transform and --checkpoint, as `load` takes them."""
  parser.add_argument('--weights', required=True,
                      help='a registry tag (IMAGENET1K_V2; python -m '
                      'flax_resnet.pretrained lists them), a weights file or '
                      'URL, or a training workdir')
  parser.add_argument('--model', default=None,
                      help='preset, e.g. resnet50 (a workdir knows its own)')
  parser.add_argument('--transform', default=None, metavar='PRESET:TAG',
                      help='for a weights file or URL: use the preprocessing '
                      "of these registered weights (default: the preset's "
                      "own publisher's)")
  parser.add_argument('--checkpoint', default='latest',
                      help='for a workdir: latest, best (highest eval top-1) '
                      'or a step (default latest)')


def quiet_libraries() -> None:
  """Warnings as 'warning: ...' lines; the libraries' INFO chatter off."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(levelname)s: %(message)s'))
  handler.addFilter(_lower_level_name)
  root = logging.getLogger()
  root.handlers[:] = [handler]
  root.setLevel(logging.WARNING)


def _lower_level_name(record: logging.LogRecord) -> bool:
  if 'has no dataset_info.json' in record.getMessage():
    return False  # TFDS, looking for a dataset that is not prepared
  record.levelname = record.levelname.lower()
  return True


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1, else a usage error naming the value."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r} is not an integer; give a whole number >= 1.') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} must be at least 1.')
  return value


def checked_batch_size(batch_size: int, count: int, transform,
                       held: int) -> int:
  """--batch_size capped at `count` images, checked against host memory.

  A batch larger than what there is to score only adds padding. Counted:
  `held` float32 input batches at the transform's crop size; not the
  model's activations, so this catches the impossible, not every
  out-of-memory.

  Raises:
    UsageError: the batches cannot fit in the memory available.
  """
  from flax_resnet.train import run_checks  # pylint: disable=g-import-not-at-top
  batch_size = max(1, min(batch_size, count))
  available = run_checks.available_memory()
  image_bytes = transform.crop_size ** 2 * 3 * 4
  if available is not None and batch_size * image_bytes * held > available:
    fits = max(1, available // (image_bytes * held))
    raise UsageError(
        f'--batch_size {batch_size}: {held} batches of {batch_size} '
        f'{transform.crop_size}x{transform.crop_size}x3 float32 images need '
        f'{batch_size * image_bytes * held / 1e9:.3g} GB, more than the '
        f'{available / 1e9:.3g} GB of memory available; use --batch_size <= '
        f'{fits} (64 is plenty).')
  return batch_size


def model_input(transform, image: Any, where: str) -> np.ndarray:
  """transform(image) for a stored image (encoded bytes or an array).

  Decoded by the training pipeline's decoder (data/preprocess.py), so its
  errors name `where`. A training run's 'box' transform takes the encoded
  bytes themselves: it then decodes only the box, as the run's eval did (a
  whole decoded image can resize 1/255 apart).
  """
  from flax_resnet.data import preprocess  # pylint: disable=g-import-not-at-top
  stored = preprocess.StoredImage(image, where)
  if transform.resize == 'box' and isinstance(image, (bytes, np.bytes_)):
    try:
      return transform(bytes(image))
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None
  return transform(stored.array())


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=-1, keepdims=True)

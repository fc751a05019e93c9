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
import json
import logging
import os
import pathlib
import sys
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

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
  if looks_like_workdir(weights):
    if transform is not None:
      raise UsageError(
          f'--transform {transform}: a workdir brings its own preprocessing '
          "(its run's eval pipeline); leave --transform out.")
    return _load_workdir(model, path, checkpoint)
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
    is_file = weights.startswith(('http://', 'https://', 'file://')) or (
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
    reason = str(e).strip().split('\n')[0].split('. ')[0][:150]
    raise UsageError(
        f'--weights {weights} is not a readable weights file '
        f'({type(e).__name__}: {reason}); give a torchvision .pth/.safetensors '
        'file, a registry tag, a URL or a training workdir.') from None
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


# ------------------------------------------------------------- workdirs


def looks_like_workdir(weights: str) -> bool:
  return pathlib.Path(os.path.expanduser(weights)).is_dir()


def checkpoint_folder(path: pathlib.Path) -> Optional[pathlib.Path]:
  """The folder of a workdir's checkpoints (or `path` itself), else None."""
  for folder in (path / 'checkpoints', path):
    if folder.is_dir() and any(
        (step / 'meta').is_dir() for step in folder.iterdir()
        if step.name.isdigit()):
      return folder
  return None


def logged_top1(workdir: pathlib.Path) -> dict[int, float]:
  """{step: eval top-1} of the evals WORKDIR/metrics.jsonl records."""
  scores = {}
  metrics = workdir / 'metrics.jsonl'
  if not metrics.is_file():
    return scores
  for line in metrics.read_bytes().decode('utf-8', 'replace').splitlines():
    try:
      record = json.loads(line)
      if 'eval_top1' in record:
        scores[int(record['step'])] = float(record['eval_top1'])
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short: it names no step
  return scores


def _best_step(workdir: pathlib.Path, steps: list[int]) -> int:
  """The step on disk with the highest eval top-1 in WORKDIR/metrics.jsonl."""
  scores = {step: top1 for step, top1 in logged_top1(workdir).items()
            if step in steps}
  if not scores:
    raise UsageError(
        f'--checkpoint best: no checkpoint of {workdir} (steps {steps}) has '
        f'an eval record in {workdir / "metrics.jsonl"}; use --checkpoint '
        'latest or a step.')
  return max(scores, key=lambda step: (scores[step], step))


def _choose_step(workdir: pathlib.Path, steps: list[int],
                 checkpoint: str) -> int:
  if checkpoint == 'latest':
    return steps[-1]
  if checkpoint == 'best':
    return _best_step(workdir, steps)
  if not checkpoint.isdigit() or int(checkpoint) not in steps:
    raise UsageError(
        f'--checkpoint {checkpoint}: {workdir} has checkpoints at steps '
        f'{steps}; give one of them, latest or best.')
  return int(checkpoint)


def _run_config(meta: dict[str, Any], folder: pathlib.Path, step: int):
  """The training config saved with a checkpoint, as a ConfigDict."""
  from flax_resnet.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  try:
    saved = meta['config']
    config.update(json.loads(saved) if isinstance(saved, str) else saved)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise UsageError(
        f'{folder}/{step}/meta holds no training config this version reads '
        f'({type(e).__name__}: {e}); was it written by train.py?') from None
  return config


def _restore_variables(folder: pathlib.Path, step: int, config, spec):
  """params and batch_stats of one step, read as train.py resumes it.

  The train state's structure comes from the run's config, so the step is
  checked like a resume checks it: shapes, and the CRC32 checksum saved
  with it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax_resnet.model import ResNet  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import optim, steps  # pylint: disable=g-import-not-at-top
  # The optimizer state's structure does not depend on the schedule's values.
  tx = optim.create_optimizer(config, optim.create_schedule(config, 1, 1))
  abstract_state = jax.eval_shape(
      lambda rng: steps.create_train_state(
          ResNet(spec), tx, rng, (config.image_size, config.image_size, 3),
          float16=config.precision == 'float16'), jax.random.PRNGKey(0))
  meta = {'model': config.model, 'spec': repr(spec),
          'config': config.to_json_best_effort()}
  checkpointer = checkpoint_lib.Checkpointer(folder, keep=1000,
                                             keep_best=False)
  try:
    state, _ = checkpointer.restore(step, abstract_state, meta)
  except checkpoint_lib.CheckpointError as e:
    raise UsageError(f'--checkpoint: {e}; choose another step with '
                     '--checkpoint STEP.') from None
  finally:
    checkpointer.close()
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _load_workdir(model: Optional[str], workdir: pathlib.Path,
                  checkpoint: str) -> Loaded:
  from flax_resnet.model import ResNet  # pylint: disable=g-import-not-at-top
  from flax_resnet.pretrained import transforms  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import config_check  # pylint: disable=g-import-not-at-top
  folder = checkpoint_folder(workdir)
  if folder is None:
    raise UsageError(
        f'--weights {workdir} is a folder without checkpoints (no '
        f'{workdir}/checkpoints/STEP/); give a training workdir that '
        'train.py has saved a checkpoint in, or a weights file.')
  steps = sorted(int(p.name) for p in folder.iterdir()
                 if p.name.isdigit() and (p / 'meta').is_dir())
  run_dir = folder.parent if folder.name == 'checkpoints' else folder
  step = _choose_step(run_dir, steps, checkpoint)
  try:
    meta = checkpoint_lib.load_meta(folder, step)
  except (OSError, ValueError) as e:
    raise UsageError(
        f'--weights {workdir}: the metadata of step {step} is unreadable '
        f'({e}); choose another step with --checkpoint STEP.') from None
  config = _run_config(meta, folder, step)
  if model is not None and model != config.model:
    raise UsageError(
        f'--model {model}: the run in {workdir} trained {config.model}; leave '
        '--model out (a workdir knows its model) or pass --model '
        f'{config.model}.')
  try:
    spec = config_check.model_spec(config)
  except ValueError as e:
    raise UsageError(f'--weights {workdir}: its config does not give a '
                     f'model ({e}).') from None
  variables = _restore_variables(folder, step, config, spec)
  return Loaded(
      model=ResNet(spec), variables=variables,
      transform=transforms.from_config(config),
      transform_source="the run's eval pipeline",
      categories=run_categories(config), source=f'{config.model} from '
      f'{folder}, step {step}', run_config=config, step=step,
      workdir=run_dir)


def run_categories(config) -> Optional[tuple[str, ...]]:
  """The class names of a run's dataset; None (with a warning) if unknown."""
  try:
    return dataset_categories(config)
  except ValueError as e:
    log.warning('class names of %s are unavailable (%s); showing class '
                'indices.', config.dataset, str(e).splitlines()[0])
    return None


def dataset_categories(config) -> Optional[tuple[str, ...]]:
  """Class names of config.dataset in label order (None for synthetic).

  Raises:
    DatasetNotFoundError: the dataset is not prepared (says how to).
  """
  from flax_resnet.data import image_folder, sources  # pylint: disable=g-import-not-at-top
  if config.dataset == sources.SYNTHETIC:
    return None
  if image_folder.is_folder_dataset(config.dataset):
    try:
      return tuple(image_folder.ImageFolder(
          image_folder.root_of(config.dataset)).classes)
    except image_folder.SourceError as e:
      raise sources.DatasetNotFoundError(
          f'--dataset {config.dataset}: {e}') from None
  builder = sources._prepared_builder(config.dataset, config.data_dir)  # pylint: disable=protected-access
  label = builder.info.features['label']
  names = getattr(label, 'names', None)
  return tuple(names) if names else None


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

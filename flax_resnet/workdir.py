"""A training workdir, read for inference: a checkpoint, its run, its classes.

    run = workdir.read_run(pathlib.Path('runs/quickstart'), 'best')
    run.config, run.spec, run.step, run.variables   # the run's own
    workdir.run_categories(run.config)              # its dataset's class names

Read-only. A step is restored as train.py resumes it (the train state's
structure from the run's config; shapes and the saved checksum checked);
'best' is the step with the highest eval top-1 in WORKDIR/metrics.jsonl.
Errors are `WorkdirError`s that name the flag (--weights, --checkpoint,
--model) and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Optional

log = logging.getLogger(__name__)


class WorkdirError(ValueError):
  """The workdir or the step asked for cannot be used; says why and how."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One checkpoint of a training run.

  Attributes:
    directory: the workdir.
    checkpoints: its checkpoints folder.
    step: the checkpoint's step.
    config: the run's training config (ConfigDict).
    spec: the ResNetSpec it trained.
    variables: {'params': ..., 'batch_stats': ...} of that step.
    initialised_from: what the run's initial weights were ('torchvision
      resnet50 IMAGENET1K_V2', a path or a URL), or None (random init).
  """
  directory: pathlib.Path
  checkpoints: pathlib.Path
  step: int
  config: Any
  spec: Any
  variables: Any
  initialised_from: Optional[str] = None


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
    raise WorkdirError(
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
    raise WorkdirError(
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
    raise WorkdirError(
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
    raise WorkdirError(f'--checkpoint: {e}; choose another step with '
                     '--checkpoint STEP.') from None
  finally:
    checkpointer.close()
  return {'params': state.params, 'batch_stats': state.batch_stats}


def read_run(path: pathlib.Path, checkpoint: str = 'latest',
             model: Optional[str] = None) -> Run:
  """The run in `path` (a workdir or its checkpoints/ folder) at a step.

  Args:
    path: the training workdir.
    checkpoint: 'latest', 'best' (highest logged eval top-1) or a step.
    model: the preset the caller expects, or None for the run's own.

  Raises:
    WorkdirError: no checkpoint, no such step, a damaged or incompatible
      step, another model; the message names the flag and the fix.
  """
  from flax_resnet.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import config_check  # pylint: disable=g-import-not-at-top
  folder = checkpoint_folder(path)
  if folder is None:
    raise WorkdirError(
        f'--weights {path} is a folder without checkpoints (no '
        f'{path}/checkpoints/STEP/); give a training workdir that '
        'train.py has saved a checkpoint in, or a weights file.')
  steps = sorted(int(p.name) for p in folder.iterdir()
                 if p.name.isdigit() and (p / 'meta').is_dir())
  directory = folder.parent if folder.name == 'checkpoints' else folder
  step = _choose_step(directory, steps, checkpoint)
  try:
    meta = checkpoint_lib.load_meta(folder, step)
  except (OSError, ValueError) as e:
    raise WorkdirError(
        f'--weights {path}: the metadata of step {step} is unreadable '
        f'({e}); choose another step with --checkpoint STEP.') from None
  config = _run_config(meta, folder, step)
  if model is not None and model != config.model:
    raise WorkdirError(
        f'--model {model}: the run in {path} trained {config.model}; leave '
        '--model out (a workdir knows its model) or pass --model '
        f'{config.model}.')
  try:
    spec = config_check.model_spec(config)
  except ValueError as e:
    raise WorkdirError(f'--weights {path}: its config does not give a '
                       f'model ({e}).') from None
  from flax_resnet.train import init_from  # pylint: disable=g-import-not-at-top
  return Run(directory=directory, checkpoints=folder, step=step,
             config=config, spec=spec,
             variables=_restore_variables(folder, step, config, spec),
             initialised_from=init_from.origin_of_run(meta, config))


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
  builder = sources.prepared_builder(config.dataset, config.data_dir)
  label = builder.info.features['label']
  names = getattr(label, 'names', None)
  return tuple(names) if names else None

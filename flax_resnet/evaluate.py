"""python -m flax_resnet.evaluate --model M --weights W --dataset D [--split S]

Top-1, top-5 and loss of published weights, a weights file or a training
workdir's checkpoint over a whole split, each image preprocessed as the
weights expect (their publisher's transform, or the run's eval pipeline):

    python -m flax_resnet.evaluate --model resnet50 --weights IMAGENET1K_V2 \\
        --dataset imagenet2012 --data_dir ~/tensorflow_datasets
    python -m flax_resnet.evaluate --weights runs/quickstart --checkpoint best

Datasets are read as training reads them (prepared TFDS array_record,
`folder:ROOT` image folders); a workdir is scored on its run's own dataset and
eval split unless --dataset / --split say otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from flax_resnet import command_line
from flax_resnet import inference
from flax_resnet import workdir as workdir_lib

DEFAULT_SPLITS = ('validation', 'test')


@dataclasses.dataclass(frozen=True)
class Result:
  """Scores of one split; top1/top5 are fractions."""
  examples: int
  top1: float
  top5: float
  loss: float
  seconds: float


def dataset_config(run, dataset: Optional[str], data_dir: Optional[str],
                   split: Optional[str]):
  """The config that opens the split to score: the run's, or a fresh one.

  Raises:
    UsageError: no dataset is given for weights without a run, or the split
      does not exist.
    DatasetNotFoundError: the dataset is not prepared (says how to).
  """
  from flax_resnet.train import config as config_lib  # pylint: disable=g-import-not-at-top
  if run is not None and dataset in (None, run.dataset):
    config = run.copy_and_resolve_references()
  elif dataset is None:
    raise inference.UsageError(
        '--dataset is needed unless --weights is a training workdir (which '
        'defaults to its own): give imagenet2012, cifar10, folder:ROOT, ...')
  else:
    config = config_lib.default_config()
    config.dataset = dataset
    config.eval_split = ''
  if data_dir is not None:
    config.data_dir = data_dir
  if split is not None:
    config.eval_split = split
  categories = workdir_lib.dataset_categories(config)
  # A label feature without class names: the classifier's size is trusted
  # (check_classifier then passes; labels out of range still fail).
  config.num_classes = len(categories) if categories else 0
  config.eval_split = _checked_split(config)
  return config


def check_classifier(loaded: inference.Loaded, config) -> None:
  """Raises UsageError if the classifier does not fit the dataset's labels."""
  if not config.num_classes:
    config.num_classes = loaded.num_classes
  if config.num_classes != loaded.num_classes:
    raise inference.UsageError(
        f'--dataset {config.dataset} has {config.num_classes} classes but '
        f'the classifier of {loaded.source} has {loaded.num_classes} outputs; '
        'score weights trained on this dataset (e.g. the workdir of a run on '
        'it), or choose the dataset they were trained on.')


def _checked_split(config) -> str:
  """config.eval_split if it exists, or the first default split that does."""
  from flax_resnet.data import image_folder, sources  # pylint: disable=g-import-not-at-top
  if config.dataset == sources.SYNTHETIC:
    return config.eval_split or 'test'
  if image_folder.is_folder_dataset(config.dataset):
    folder = image_folder.ImageFolder(image_folder.root_of(config.dataset))
    available = folder.splits

    def exists(split):
      try:
        folder.split_name(split)
        return True
      except image_folder.SourceError:
        return False
  else:
    builder = sources.prepared_builder(config.dataset, config.data_dir)
    available = sorted(builder.info.splits.keys())

    def exists(split):
      try:
        return builder.info.splits[split].num_examples > 0
      except (KeyError, ValueError):
        return False

  wanted = [config.eval_split] if config.eval_split else list(DEFAULT_SPLITS)
  for split in wanted:
    if exists(split):
      return split
  raise inference.UsageError(
      f'--split {config.eval_split or "(default: validation or test)"} is not '
      f'a split of --dataset {config.dataset}; it has {available}. Pass '
      '--split with one of them (slices such as test[:1000] also work for '
      'TFDS datasets).')


class _Prepare:
  """Example -> {'image': the transform's output, 'label': int32}."""

  def __init__(self, transform, options):
    self._transform = transform
    self._options = options

  def __call__(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    from flax_resnet.data import preprocess  # pylint: disable=g-import-not-at-top
    label = preprocess.check_label(element['label'], self._options)
    image = element['image']
    if isinstance(image, np.ndarray) and image.dtype.kind in 'SO':
      image = image.item()  # encoded bytes, as a TFDS source returns them
    return {'image': inference.model_input(
        self._transform, image,
        preprocess.image_where(element, self._options)), 'label': label}


def batches(config, transform, batch_size: int, threads: int):
  """(number of examples, iterator of {'image', 'label', 'mask'} batches).

  Every example once, in the source's order; the last batch is padded with
  zero images whose mask is False, so every batch has one shape. batch_size
  is capped at the split's size.

  Raises:
    UsageError: batches of batch_size images cannot fit in memory.
  """
  import grain  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import preprocess, sources  # pylint: disable=g-import-not-at-top
  source = sources.open_source(config, 'eval_split')
  options = preprocess.PreprocessOptions.from_config(config, 'eval_split')
  # Held at once: the threads' read-ahead, the batch in use and its padding.
  batch_size = inference.checked_batch_size(batch_size, len(source),
                                            transform, held=threads + 2)
  prepare = _Prepare(transform, options)
  prepare(source[0])  # bad data fails here, before the threads start
  ds = (grain.MapDataset.source(source).map(prepare).batch(batch_size)
        .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=threads)))

  def padded():
    for batch in ds:
      count = len(batch['label'])
      mask = np.arange(batch_size) < count
      if count < batch_size:
        batch = {k: np.concatenate([v, np.zeros((batch_size - count,
                                                 *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
      yield {**batch, 'mask': mask}

  return len(source), padded()


def _score_fn(loaded: inference.Loaded):
  """jitted batch -> sums of loss, top-1 and top-5 over the masked examples."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import steps  # pylint: disable=g-import-not-at-top
  model, variables = loaded.model, loaded.variables
  num_classes = loaded.num_classes

  def score(images, labels, mask):
    logits = model.apply(variables, images, train=False)
    mask = mask.astype(jnp.float32)
    return {
        'loss': jnp.sum(steps.cross_entropy(logits, labels, num_classes) *
                        mask),
        'top1': jnp.sum(steps.top_k_correct(logits, labels, 1) * mask),
        'top5': jnp.sum(steps.top_k_correct(logits, labels, 5) * mask),
    }

  return jax.jit(score, compiler_options=steps.compiler_options())


def evaluate(loaded: inference.Loaded, config, *, batch_size: int = 64,
             threads: int = 4, progress: bool = True) -> Result:
  """Scores every example of config.eval_split with `loaded`."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  started = time.time()
  total, stream = batches(config, loaded.transform, batch_size, threads)
  score = _score_fn(loaded)
  sums = {'loss': 0.0, 'top1': 0.0, 'top5': 0.0}
  seen = 0
  with tqdm(total=total, unit='img', disable=not progress or None,
            file=sys.stderr, desc=f'{config.dataset} {config.eval_split}'
            ) as bar:
    for batch in stream:
      out = score(batch['image'], batch['label'], batch['mask'])
      for key, value in out.items():
        sums[key] += float(value)
      count = int(batch['mask'].sum())
      seen += count
      bar.update(count)
      bar.set_postfix({'top1': f'{sums["top1"] / seen * 100:.2f}%'},
                      refresh=False)
  assert seen == total, (seen, total)
  return Result(examples=total, top1=sums['top1'] / total,
                top5=sums['top5'] / total, loss=sums['loss'] / total,
                seconds=time.time() - started)


def report(result: Result, reference: Optional[str]) -> str:
  beside = f' ({reference})' if reference else ''
  return '\n'.join([f'{result.examples:,} images in {result.seconds:.1f} s',
                    f'top-1 {result.top1 * 100:.3f} %{beside}',
                    f'top-5 {result.top5 * 100:.3f} %',
                    f'loss  {result.loss:.4f}'])


def reference_top1(loaded: inference.Loaded, config) -> Optional[str]:
  """What to print beside our top-1: the publisher's or the run's figure."""
  if loaded.published_top1 is not None and config.dataset == 'imagenet2012':
    return f'published {loaded.published_top1:.3f} %'
  run = loaded.run_config
  if run is not None and (config.dataset, config.eval_split) == (
      run.dataset, run.eval_split):
    top1 = workdir_lib.logged_top1(loaded.workdir).get(loaded.step)
    if top1 is not None:
      return f'the run logged {top1 * 100:.3f} % at step {loaded.step}'
  return None


def parser() -> argparse.ArgumentParser:
  p = command_line.ArgumentParser(
      prog='python -m flax_resnet.evaluate',
      description='Top-1/top-5/loss of weights or a training checkpoint over '
      'a whole dataset split.')
  inference.add_weights_arguments(p)
  p.add_argument('--dataset', default=None,
                 help="imagenet2012, cifar10, folder:ROOT, ... (default: a "
                 "workdir's own)")
  p.add_argument('--data_dir', default=None,
                 help='TFDS data folder (default: TFDS\'s, or the run\'s)')
  p.add_argument('--split', default=None,
                 help="the split to score (default: a run's eval split, else "
                 'validation, else test)')
  p.add_argument('--batch_size', type=inference.positive_int, default=64,
                 help='images per forward pass (default 64)')
  p.add_argument('--threads', type=inference.positive_int, default=4,
                 help='threads decoding and preprocessing images (default 4)')
  p.add_argument('--json', action='store_true',
                 help='print the scores as one JSON object')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parser().parse_args(argv)
  inference.quiet_libraries()
  from flax_resnet.data import sources  # pylint: disable=g-import-not-at-top
  try:
    if not workdir_lib.looks_like_workdir(args.weights):
      inference.check_weights_path(args.weights)
      # The dataset is checked before any download.
      dataset_config(None, args.dataset, args.data_dir, args.split)
    loaded = inference.load(args.model, args.weights, transform=args.transform,
                            checkpoint=args.checkpoint)
    config = dataset_config(loaded.run_config, args.dataset, args.data_dir,
                            args.split)
    check_classifier(loaded, config)
  except (inference.UsageError, sources.DatasetNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{loaded.source} on {config.dataset} {config.eval_split}; '
        f'transform: {loaded.transform.describe()} '
        f'[{loaded.transform_source}]', file=sys.stderr)
  try:
    result = evaluate(loaded, config, batch_size=args.batch_size,
                      threads=args.threads)
  except inference.UsageError as e:  # --batch_size too large for memory
    print(f'error: {e}', file=sys.stderr)
    return 2
  except ValueError as e:  # an undecodable image, a label out of range
    print(f'error: {e}', file=sys.stderr)
    return 1
  reference = reference_top1(loaded, config)
  if args.json:
    print(json.dumps({**dataclasses.asdict(result), 'dataset': config.dataset,
                      'split': config.eval_split, 'weights': loaded.source,
                      'reference': reference}))
  else:
    print(report(result, reference))
  return 0 if math.isfinite(result.loss) else 1


if __name__ == '__main__':
  command_line.exit_on_stop_signals()
  sys.exit(main())

"""python -m flax_resnet.predict IMAGE... --model M --weights TAG|URL|FILE|WORKDIR

Prints the top-k classes of each image (a folder is walked for images):

    photos/cat.jpg: tabby (61.2%), tiger cat (21.0%), Egyptian cat (9.9%), ...

`--weights` is a registry tag (its publisher's preprocessing and the ImageNet
class names), a weights file or URL (the preprocessing of `--transform
PRESET:TAG`, by default the preset's own publisher's), or a training workdir
(its newest or best checkpoint, its run's eval preprocessing and class names;
--model may be left out). An unreadable image gets one `error:` line and the
others are still scored; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from flax_resnet import command_line
from flax_resnet import inference

_DECODE_THREADS = 4


def image_paths(arguments: Sequence[str]) -> list[str]:
  """Files as given; folders walked (sorted) for the image folder extensions.

  Raises:
    UsageError: an argument does not exist, or a folder holds no image.
  """
  from flax_resnet.data import image_folder  # pylint: disable=g-import-not-at-top
  paths = []
  for argument in arguments:
    path = os.path.expanduser(argument)
    if os.path.isdir(path):
      try:
        found = image_folder.images_below(path)
      except image_folder.SourceError as e:
        raise inference.UsageError(f'IMAGE {argument}: {e}') from None
      if not found:
        raise inference.UsageError(
            f'IMAGE {argument}: the folder holds no images '
            f'({", ".join(image_folder.EXTENSIONS)}); give image files or a '
            'folder of them.')
      paths.extend(found)
    elif os.path.exists(path):
      paths.append(path)
    else:
      raise inference.UsageError(
          f'IMAGE {argument} does not exist; give image files or folders.')
  return paths


def read_image(path: str, transform) -> np.ndarray:
  """The model input for one file; ValueError naming the file if unusable."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f'{path}: {e.strerror}') from None
  return inference.model_input(transform, data, f'file {path!r}')


def _top(probabilities: np.ndarray, k: int) -> list[int]:
  order = np.argsort(-probabilities, kind='stable')
  return [int(i) for i in order[:k]]


def predict(loaded: inference.Loaded, paths: Sequence[str], *, top: int,
            batch_size: int):
  """Yields (path, [(index, probability), ...] or None, error or None).

  Raises:
    UsageError: batches of batch_size images cannot fit in memory.
  """
  top = min(top, loaded.num_classes)
  # Held at once: the decoded images, their stack and the padded batch.
  batch_size = inference.checked_batch_size(batch_size, len(paths),
                                            loaded.transform, held=3)
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      futures = [pool.submit(read_image, p, loaded.transform) for p in chunk]
      images, errors = [], {}
      for path, future in zip(chunk, futures):
        try:
          images.append(future.result())
        except ValueError as e:
          errors[path] = str(e)
      if images:
        batch = np.stack(images)
        # One compiled shape: the last batch is padded with zeros.
        padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
        padded[:len(batch)] = batch
        logits = np.asarray(loaded.logits(padded))[:len(batch)]
        probabilities = iter(inference.softmax(logits.astype(np.float64)))
      for path in chunk:
        if path in errors:
          yield path, None, errors[path]
        else:
          p = next(probabilities)
          yield path, [(i, float(p[i])) for i in _top(p, top)], None


def _format(loaded, path, scores) -> str:
  return f'{path}: ' + ', '.join(
      f'{loaded.category(i)} ({p * 100:.1f}%)' for i, p in scores)


def _json(loaded, path, scores, error) -> str:
  if error is not None:
    return json.dumps({'path': path, 'error': error})
  return json.dumps({'path': path, 'top': [
      {'index': i, 'name': loaded.category(i), 'probability': p}
      for i, p in scores]})


def parser() -> argparse.ArgumentParser:
  p = command_line.ArgumentParser(
      prog='python -m flax_resnet.predict',
      description='Top-k classes of images with published weights, a weights '
      'file or a training workdir.')
  p.add_argument('images', nargs='+', metavar='IMAGE',
                 help='image files, or folders to walk for images')
  inference.add_weights_arguments(p)
  p.add_argument('--top', type=inference.positive_int, default=5,
                 help='classes shown per image (default 5)')
  p.add_argument('--batch_size', type=inference.positive_int, default=32,
                 help='images per forward pass (default 32)')
  p.add_argument('--json', action='store_true',
                 help='one JSON object per image on stdout')
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parser().parse_args(argv)
  inference.quiet_libraries()
  try:
    paths = image_paths(args.images)
    loaded = inference.load(args.model, args.weights, transform=args.transform,
                            checkpoint=args.checkpoint)
  except inference.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{loaded.source}; transform: {loaded.transform.describe()} '
        f'[{loaded.transform_source}]', file=sys.stderr)
  failed = 0
  try:
    scored = predict(loaded, paths, top=args.top, batch_size=args.batch_size)
    first = next(scored)  # the batch size is checked before anything is read
  except inference.UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path, scores, error in itertools.chain([first], scored):
    if args.json:
      print(_json(loaded, path, scores, error), flush=True)
    elif error is not None:
      print(f'error: {error}', file=sys.stderr, flush=True)
    else:
      print(_format(loaded, path, scores), flush=True)
    failed += error is not None
  if failed:
    rest = ('the others are scored' if failed < len(paths) else
            'none was scored')
    print(f'error: {failed} of {len(paths)} images could not be read (named '
          f'above); {rest}.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  command_line.exit_on_stop_signals()
  sys.exit(main())

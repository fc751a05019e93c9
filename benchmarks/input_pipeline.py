"""Input-pipeline throughput (images/s) on generated data; prints JSON.

Measures `flax_resnet.data.make_train_iterator` end to end (array_record read,
decode, augmentation, normalisation, batching) on two generated TFDS datasets:

  - cifar_png: 32x32 PNG images, augment='cifar' (pad 4, crop, flip);
  - imagenet_jpeg: 500x375 photo-like JPEGs (quality 90), augment='imagenet'
    (random-resized crop to 224, flip).

for each worker_count. Building the datasets needs TensorFlow (the `build`
extra); pass --data_dir to reuse them between runs. Worker start-up is timed
separately (`startup_s`: iterator creation to first batch) from the
steady-state rate (`images_per_s`, after `--warmup_batches`).

  python benchmarks/input_pipeline.py --workers 0 2 --batches 20
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)  # configs/ is not part of the package

# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_datasets  # registers the generated datasets; see its docstring
from configs import base
from flax_resnet import data
import tensorflow_datasets as tfds
# pylint: enable=g-import-not-at-top,wrong-import-position

CASES = {
    'cifar_png': dict(dataset='bench_cifar_png', num_classes=10, image_size=32,
                      augment='cifar', batch_size=256),
    'imagenet_jpeg': dict(dataset='bench_imagenet_jpeg', num_classes=1000,
                          image_size=224, augment='imagenet', batch_size=64),
}


def measure(case: str, data_dir: str, worker_count: int, batches: int,
            warmup_batches: int, prefetch_batches: int, **overrides) -> dict:
  """Times one configuration of the train iterator.

  overrides: config fields to change in CASES[case] (device_check.py reads a
  folder of JPEGs, `dataset='folder:ROOT'`, at the accelerator's batch size).
  """
  config = base.get_config()
  config.update(CASES[case])
  config.update(dict(data_dir=data_dir, eval_split='train',
                     worker_count=worker_count,
                     prefetch_batches=prefetch_batches, **overrides))
  start = time.perf_counter()
  iterator = data.make_train_iterator(config)
  try:
    next(iterator)
    startup = time.perf_counter() - start
    for _ in range(warmup_batches):
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  finally:
    iterator.close()
  return {
      'case': case, 'worker_count': worker_count,
      'prefetch_batches': prefetch_batches, 'batch_size': config.batch_size,
      'image_size': config.image_size, 'batches': batches,
      'images_per_s': round(batches * config.batch_size / elapsed, 1),
      'startup_s': round(startup, 2),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None,
                      help='where to build/reuse the datasets (default: tmp)')
  parser.add_argument('--cases', nargs='+', default=list(CASES),
                      choices=list(CASES))
  parser.add_argument('--workers', nargs='+', type=int, default=[0, 2])
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--warmup_batches', type=int, default=3)
  parser.add_argument('--prefetch_batches', type=int, default=2)
  args = parser.parse_args()

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    for case in args.cases:
      data.prepare.prepare(CASES[case]['dataset'], data_dir)
    results = [measure(case, data_dir, workers, args.batches,
                       args.warmup_batches, args.prefetch_batches)
               for case in args.cases for workers in args.workers]
  print(json.dumps({
      'benchmark': 'input_pipeline',
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'jpeg_size': [bench_datasets.JPEG_WIDTH, bench_datasets.JPEG_HEIGHT],
      'results': results,
  }, indent=2))


if __name__ == '__main__':
  main()

"""ImageNet train preprocessing per core: our pipeline next to tf.data's.

  python benchmarks/pipeline_vs_tfdata.py --rounds 5

Both turn the same JPEG bytes (the generated 500x375, quality 90
`bench_imagenet_jpeg` set, see bench_datasets.py) into normalised float32
224x224 training images with a random-resized crop and a random flip:

  - ours: `flax_resnet.data.make_train_iterator` (grain, worker_count=0: in
    this process), end to end from the array_record files, batches of 64;
    PIL decodes at a reduced DCT scale (`draft`) and resizes the crop
    bilinearly (`flax_resnet/data/preprocess.py`).
  - tf.data: the Flax ImageNet example's `preprocess_for_train`
    (`sample_distorted_bounding_box`, `decode_and_crop_jpeg`: only the crop is
    decoded; bicubic resize; flip; normalise), from the bytes held in memory,
    batched by 64, on one thread (intra/inter-op 1, private pool of 1).

They alternate for --rounds, and report images per CPU-second of this
process (all threads: per core, insensitive to other tenants' load) and
images per wall-second. The ratio is ours / tf.data of the medians. Both
compute only when asked (no read-ahead), so each timed window holds only
its own contestant's work; `max_cpu_ms_in_idle_after` checks that.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_REPO, os.path.dirname(os.path.abspath(__file__))):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax_resnet import host_allocator  # first: its malloc settings
import bench_datasets  # registers the generated datasets
import input_pipeline
from machine import load_average
from machine import machine_info
from configs import base
from flax_resnet import data
import tensorflow as tf
import tensorflow_datasets as tfds
# pylint: enable=g-import-not-at-top,wrong-import-position

IMAGE_SIZE = 224
BATCH = 64
IDLE_S = 0.3
MEAN_RGB = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STDDEV_RGB = [0.229 * 255, 0.224 * 255, 0.225 * 255]


# ---- The Flax ImageNet example's train preprocessing (examples/imagenet).
def _distorted_bounding_box_crop(image_bytes, bbox, min_object_covered=0.1,
                                 aspect_ratio_range=(0.75, 1.33),
                                 area_range=(0.05, 1.0), max_attempts=100):
  shape = tf.io.extract_jpeg_shape(image_bytes)
  bbox_begin, bbox_size, _ = tf.image.sample_distorted_bounding_box(
      shape, bounding_boxes=bbox, min_object_covered=min_object_covered,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(bbox_begin)
  target_height, target_width, _ = tf.unstack(bbox_size)
  crop_window = tf.stack([offset_y, offset_x, target_height, target_width])
  return tf.io.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)


def _at_least_x_are_equal(a, b, x):
  match = tf.equal(a, b)
  match = tf.cast(match, tf.int32)
  return tf.greater_equal(tf.reduce_sum(match), x)


def _decode_and_center_crop(image_bytes, image_size):
  shape = tf.io.extract_jpeg_shape(image_bytes)
  image_height, image_width = shape[0], shape[1]
  padded_center_crop_size = tf.cast(
      ((image_size / (image_size + 32)) *
       tf.cast(tf.minimum(image_height, image_width), tf.float32)), tf.int32)
  offset_height = ((image_height - padded_center_crop_size) + 1) // 2
  offset_width = ((image_width - padded_center_crop_size) + 1) // 2
  crop_window = tf.stack([offset_height, offset_width,
                          padded_center_crop_size, padded_center_crop_size])
  image = tf.io.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)
  return tf.image.resize([image], [image_size, image_size],
                         method=tf.image.ResizeMethod.BICUBIC)[0]


def _decode_and_random_crop(image_bytes, image_size):
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
  image = _distorted_bounding_box_crop(
      image_bytes, bbox, min_object_covered=0.1,
      aspect_ratio_range=(3. / 4, 4. / 3.), area_range=(0.08, 1.0),
      max_attempts=10)
  original_shape = tf.io.extract_jpeg_shape(image_bytes)
  bad = _at_least_x_are_equal(original_shape, tf.shape(image), 3)
  return tf.cond(
      bad, lambda: _decode_and_center_crop(image_bytes, image_size),
      lambda: tf.image.resize([image], [image_size, image_size],
                              method=tf.image.ResizeMethod.BICUBIC)[0])


def preprocess_for_train(image_bytes, image_size=IMAGE_SIZE):
  image = _decode_and_random_crop(image_bytes, image_size)
  image = tf.reshape(image, [image_size, image_size, 3])
  image = tf.image.random_flip_left_right(image)
  image -= tf.constant(MEAN_RGB, shape=[1, 1, 3], dtype=image.dtype)
  image /= tf.constant(STDDEV_RGB, shape=[1, 1, 3], dtype=image.dtype)
  return tf.image.convert_image_dtype(image, dtype=tf.float32)
# ---- end of the Flax example's code.


def tf_iterator(jpegs: list[bytes], labels: list[int]):
  ds = tf.data.Dataset.from_tensor_slices((jpegs, labels)).repeat()
  ds = ds.map(lambda b, l: {'image': preprocess_for_train(b), 'label': l})
  ds = ds.batch(BATCH, drop_remainder=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  # Fused into MapAndBatch, tf.data computes the next batch in a background
  # thread after each one it hands over: about 130 ms of CPU landing in the
  # next contestant's timed window (and that batch then free in its own).
  # Unfused, it computes on demand, like ours with worker_count=0.
  options.experimental_optimization.map_and_batch_fusion = False
  return iter(ds.with_options(options))


def ours_iterator(data_dir: str):
  config = base.get_config()
  config.update(input_pipeline.CASES['imagenet_jpeg'])
  config.update(dict(data_dir=data_dir, eval_split='train', worker_count=0,
                     prefetch_batches=0, batch_size=BATCH))
  return data.make_train_iterator(config)


def timed(iterator, batches: int) -> tuple[float, float, float]:
  """(images per CPU-second of this process, per wall-second, CPU after).

  The last is this process's CPU milliseconds in the IDLE_S after the timed
  batches: work still running in the background, which would be charged to
  whatever is timed next. It should be ~0.
  """
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  after = time.process_time()
  time.sleep(IDLE_S)
  after = (time.process_time() - after) * 1e3
  return batches * BATCH / cpu, batches * BATCH / wall, after


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batches', type=int, default=4)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()

  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tfds.disable_progress_bar()
  load_before = load_average()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    data.prepare.prepare('bench_imagenet_jpeg', data_dir)
    source = tfds.data_source('bench_imagenet_jpeg', split='train',
                              data_dir=data_dir, decoders={
                                  'image': tfds.decode.SkipDecoding()})
    records = [source[i] for i in range(len(source))]
    jpegs = [r['image'] for r in records]
    labels = [int(r['label']) for r in records]
    contestants = {'ours': ours_iterator(data_dir),
                   'tf_data': tf_iterator(jpegs, labels)}
    for it in contestants.values():  # warm-up: graph tracing, first reads
      next(it)
    per_cpu = {n: [] for n in contestants}
    per_wall = {n: [] for n in contestants}
    cpu_after = {n: [] for n in contestants}
    for r in range(args.rounds):
      names = list(contestants)[r % 2:] + list(contestants)[:r % 2]
      for name in names:
        cpu_rate, wall_rate, after = timed(contestants[name], args.batches)
        per_cpu[name].append(cpu_rate)
        per_wall[name].append(wall_rate)
        cpu_after[name].append(after)
    contestants['ours'].close()
  result = {
      'benchmark': 'pipeline_vs_tfdata', 'jpeg_size': [
          bench_datasets.JPEG_WIDTH, bench_datasets.JPEG_HEIGHT],
      'batch': BATCH, 'rounds': args.rounds, 'batches_per_round': args.batches,
      'tensorflow': tf.__version__, 'machine': machine_info(),
      'malloc': host_allocator.status(),
      'load_average_before': load_before, 'load_average_after': load_average(),
  }
  for name in per_cpu:
    result[name] = {
        'images_per_cpu_s': round(statistics.median(per_cpu[name]), 1),
        'images_per_wall_s': round(statistics.median(per_wall[name]), 1),
        'rounds_per_cpu_s': [round(v, 1) for v in per_cpu[name]],
        'max_cpu_ms_in_idle_after': round(max(cpu_after[name]), 1)}
  result['ratio_per_core'] = round(result['ours']['images_per_cpu_s'] /
                                   result['tf_data']['images_per_cpu_s'], 3)
  result['ratio_wall'] = round(result['ours']['images_per_wall_s'] /
                               result['tf_data']['images_per_wall_s'], 3)
  print(json.dumps(result, indent=2))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()

"""One call on a lent GPU/TPU: train speed, input pipeline, XLA conv accuracy.

  bash benchmarks/device_wheels.sh  # here first: .whl/, the packages the
                                    # device's image lacks (it has no index)
  bash benchmarks/device_check.sh   # on the device, carrying .whl: installs
                                    # them, then runs this file with
                                    # --out "$OUT/device_check.json"
  python benchmarks/device_check.py --smoke      # CPU, tiny sizes (CI test)

Measures, on the first accelerator jax sees (< 8 minutes on one H100/H200):

  (a) speed: resnet50 in bfloat16 (float32 parameters), batch 256 at 224x224,
      the project's `train_step` and `eval_step` (flax_resnet/train/steps.py)
      under a plain `jax.jit`, on one fixed batch already on the device
      (benchmarks/jax_side.py), compile and --warmup steps excluded: the
      median images/s over --rounds rounds of --steps steps;
  (b) the input pipeline feeding it: `make_train_iterator` with one grain
      worker per host core, ImageNet training preprocessing of generated
      500x375 JPEGs (benchmarks/bench_datasets.py) in a folder, batches of the
      same size (benchmarks/input_pipeline.py), against the step's rate:
      below 1.0 the GPU waits for the host;
  (c) the convolutions XLA runs on the accelerator compute the model's
      function: the same resnet50 forward and gradient of the loss with
      respect to every parameter (so each conv's forward, input and kernel
      gradients), in float32 with 'highest' matmul precision, on the
      accelerator and on the host CPU (oneDNN's convolutions there, or
      XLA's where the oneDNN wheels are not installed), compared by
      relative L2 error of the logits and of all gradients together,
      against LOGITS_TOLERANCE / GRADS_TOLERANCE.

Writes one JSON (--out, default $OUT/device_check.json when $OUT is set),
rewritten after every part, and prints one summary line. A part that raises
is recorded as {"error": ...} with its traceback on stderr, and the next
part runs. Exit status 1 if (c) fails or a part raised; 2, with an `error:`
line, if jax sees no GPU/TPU (a CUDA plugin that did not start, or the
CPU-only jaxlib). --smoke runs the same code on the CPU with tiny sizes, (c)
then comparing XLA's convolutions with oneDNN's where its wheels are
installed (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Optional
from unittest import mock

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import flax_resnet
from flax_resnet import layers
from flax_resnet.cpu import onednn
# Only jax, flax and optax: a part that needs grain or TFDS imports them
# itself, so where they fail to import only that part fails.
from flax_resnet.train import steps as steps_lib
from machine import machine_info
# pylint: enable=g-import-not-at-top,wrong-import-position

# (c): float32 on both sides, BatchNorm on its running statistics. Measured
# on CPU for the full check's resnet50 at 64x64, batch 8: oneDNN's against
# XLA's convolutions differ by 1.0e-6 (logits) and 6.5e-7 (gradients); one
# ulp more on every input pixel moves the host's own result by 1.1e-6 and
# 1.1e-4. The bounds are 100x the first and 10x the gradients' sensitivity to
# that ulp: room for cuDNN's algorithms, while a wrong padding, stride or
# layout is O(1). (In train mode, BatchNorm over 8x2x2 values per channel
# amplifies one ulp at the input to 1.5e-2 in the gradients: too chaotic to
# compare.)
LOGITS_TOLERANCE = 1e-4
GRADS_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How big each part runs: the real check, or --smoke on a CPU."""
  net: str
  image_size: int
  batch_size: int
  num_classes: int
  check_net: str  # (c)
  check_image_size: int
  check_batch_size: int
  jpegs: int  # (b): generated pictures in the folder
  pipeline_image_size: int


FULL = Sizes('resnet50', 224, 256, 1000, 'resnet50', 64, 8, 512, 224)
SMOKE = Sizes('resnet20', 16, 4, 10, 'resnet20', 16, 4, 8, 32)
DEFAULTS = dict(rounds=5, steps=20, warmup=3, pipeline_batches=10)
SMOKE_DEFAULTS = dict(rounds=2, steps=2, warmup=1, pipeline_batches=2)


def train_speed(sizes: Sizes, args) -> dict:
  """(a): median images/s of the project's jitted train and eval steps."""
  import jax_side  # pylint: disable=g-import-not-at-top
  import run  # pylint: disable=g-import-not-at-top
  case = run.Case(sizes.net, (('dtype', 'bfloat16'),), sizes.image_size,
                  sizes.batch_size, sizes.num_classes, '', args.steps,
                  args.steps)
  options = tuple(sorted((steps_lib.compiler_options() or {}).items()))
  contestant = jax_side.JaxContestant(case, jax_side.Variant(options, True,
                                                             True))
  out = {'net': sizes.net, 'dtype': 'bfloat16', 'batch_size': sizes.batch_size,
         'image_size': sizes.image_size, 'steps_per_round': args.steps,
         'rounds': args.rounds, 'compile_s': contestant.compile()}
  for phase in ('train', 'eval'):
    run_steps = getattr(contestant, phase)
    run_steps(args.warmup)
    rates = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      run_steps(args.steps)  # ends in block_until_ready
      rates.append(args.steps * sizes.batch_size /
                   (time.perf_counter() - start))
    out[phase] = {'images_per_s': round(statistics.median(rates), 1),
                  'rounds': [round(r, 1) for r in rates]}
  return out


def write_jpeg_folder(root: str, count: int) -> str:
  """ROOT/train/CLASS/*.jpg: bench_datasets' photo-like 500x375 JPEGs."""
  import bench_datasets  # pylint: disable=g-import-not-at-top
  for i in range(count):
    folder = os.path.join(root, 'train', f'class{i % 4}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(bench_datasets.photo_like(
        i, bench_datasets.JPEG_HEIGHT, bench_datasets.JPEG_WIDTH)).save(
            os.path.join(folder, f'{i:05d}.jpg'), quality=90)
  return root


def pipeline_speed(sizes: Sizes, args,
                   train_images_per_s: Optional[float]) -> dict:
  """(b): images/s of the train iterator on all host cores vs the step.

  `train_images_per_s` is None when (a) failed: then no ratio.
  """
  import input_pipeline  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import jpeg  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import pixels  # pylint: disable=g-import-not-at-top
  workers = args.workers if args.workers is not None else os.cpu_count()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    root = write_jpeg_folder(os.path.join(tmp, 'pictures'), sizes.jpegs)
    written_s = time.perf_counter() - start
    result = input_pipeline.measure(
        'imagenet_jpeg', os.path.join(tmp, 'tfds'), workers,
        args.pipeline_batches, 2, 2, dataset=f'folder:{root}',
        num_classes=4, batch_size=sizes.batch_size,
        image_size=sizes.pipeline_image_size)
  result.update(
      jpegs=sizes.jpegs, write_jpegs_s=round(written_s, 1),
      jpeg_decoder='crop-window libjpeg-turbo' if jpeg.available() else 'PIL',
      pixel_normaliser='table' if pixels.available() else 'numpy',
      train_images_per_s=train_images_per_s,
      pipeline_over_train=(
          round(result['images_per_s'] / train_images_per_s, 3)
          if train_images_per_s else None))
  result['bottleneck'] = (result['pipeline_over_train'] is not None and
                          result['pipeline_over_train'] < 1.0)
  return result


def relative_error(got, want) -> float:
  got, want = (np.concatenate([np.ravel(np.asarray(x, np.float64))
                               for x in jax.tree.leaves(t)])
               for t in (got, want))
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def conv_accuracy(sizes: Sizes, device, host) -> dict:
  """(c): forward + gradient in float32 on `device` vs the host CPU.

  `host_one_ulp_input` is how far the host's own result moves when every
  input pixel grows by one ulp: the noise floor the errors compare with.

  When `device` is itself a CPU (--smoke), its side runs XLA's convolutions
  (as every GPU/TPU does) and the host side oneDNN's.
  """
  model = flax_resnet.create_model(sizes.check_net,
                                   num_classes=sizes.num_classes)
  rng = np.random.default_rng(0)
  shape = (sizes.check_batch_size, sizes.check_image_size,
           sizes.check_image_size, 3)
  images = rng.standard_normal(shape).astype(np.float32)
  labels = rng.integers(0, sizes.num_classes, shape[0]).astype(np.int32)
  with jax.default_device(host):
    variables = jax.jit(model.init, static_argnames='train')(
        jax.random.key(0), images[:1], train=False)

  def loss_and_logits(params, batch_stats, images, labels):
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         images, train=False)
    loss = steps_lib.cross_entropy(logits, labels, sizes.num_classes).mean()
    return loss, logits

  grad_fn = jax.value_and_grad(loss_and_logits, has_aux=True)
  args = (variables['params'], variables['batch_stats'], images, labels)
  one_ulp = (*args[:2], images * np.float32(1 + 2**-23), labels)
  # One jitted function per side, so each is traced under its own conv (jit
  # caches traces by function); committed inputs make it run where they are.
  device_fn = jax.jit(lambda *a: grad_fn(*a))  # pylint: disable=unnecessary-lambda
  host_fn = jax.jit(lambda *a: grad_fn(*a))  # pylint: disable=unnecessary-lambda
  results = {}
  for side, fn, where, inputs in (('device', device_fn, device, args),
                                  ('host', host_fn, host, args),
                                  ('host_one_ulp', host_fn, host, one_ulp)):
    xla_convs_on_cpu = side == 'device' and device.platform == 'cpu'
    with jax.default_matmul_precision('highest'), mock.patch.object(
        layers, 'conv_general_dilated', lax.conv_general_dilated
        if xla_convs_on_cpu else layers.conv_general_dilated):
      (_, logits), grads = fn(*jax.device_put(inputs, where))
    results[side] = jax.device_get((logits, grads))
  logits_error, grads_error = (
      relative_error(results['device'][i], results['host'][i]) for i in (0, 1))
  return {
      'net': sizes.check_net, 'batch_shape': list(shape),
      'batch_norm': 'running statistics', 'device_convs': 'XLA',
      'host_convs': 'oneDNN' if onednn.available() else 'XLA',
      'logits_relative_error': logits_error,
      'grads_relative_error': grads_error,
      'host_one_ulp_input': {
          'logits': relative_error(results['host_one_ulp'][0],
                                   results['host'][0]),
          'grads': relative_error(results['host_one_ulp'][1],
                                  results['host'][1])},
      'logits_tolerance': LOGITS_TOLERANCE, 'grads_tolerance': GRADS_TOLERANCE,
      'ok': logits_error <= LOGITS_TOLERANCE and grads_error <= GRADS_TOLERANCE,
  }


def _speed_text(speed: dict) -> str:
  return (f"{speed['net']} bf16 batch {speed['batch_size']}: train "
          f"{speed['train']['images_per_s']} img/s, eval "
          f"{speed['eval']['images_per_s']} img/s")


def _pipeline_text(pipe: dict) -> str:
  if pipe['pipeline_over_train'] is None:
    versus = ' (no train rate to compare)'
  else:
    versus = (f" = {pipe['pipeline_over_train']}x the train step"
              f"{' (BOTTLENECK)' if pipe['bottleneck'] else ''}")
  return (f"input pipeline {pipe['worker_count']} workers "
          f"{pipe['images_per_s']} img/s{versus}")


def _conv_text(conv: dict) -> str:
  return (f"f32 {conv['device_convs']} vs host {conv['host_convs']}: logits "
          f"{conv['logits_relative_error']:.1e} (<= {LOGITS_TOLERANCE:.0e}), "
          f"grads {conv['grads_relative_error']:.1e} (<= "
          f"{GRADS_TOLERANCE:.0e}) {'OK' if conv['ok'] else 'FAIL'}")


def summary(result: dict) -> str:
  texts = []
  for name, text in (('speed', _speed_text), ('pipeline', _pipeline_text),
                     ('conv', _conv_text)):
    part = result.get(name)
    if part is None:
      texts.append(f'{name}: not run')
    elif 'error' in part:
      texts.append(f"{name}: ERROR {part['error']}")
    else:
      texts.append(text(part))
  return (f"device_check {result['device']['kind']}: " + ' | '.join(texts) +
          f" | {result['wall_s']} s")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes, and allowed on CPU (for CI)')
  parser.add_argument('--out', default=None,
                      help='JSON path (default: $OUT/device_check.json if '
                      '$OUT is set)')
  parser.add_argument('--rounds', type=int, default=None,
                      help='timed rounds (default 5; --smoke 2)')
  parser.add_argument('--steps', type=int, default=None,
                      help='steps per timed round (default 20; --smoke 2)')
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed steps after compiling (default 3; '
                      '--smoke 1)')
  parser.add_argument('--workers', type=int, default=None,
                      help='grain workers for (b); default: one per core')
  parser.add_argument('--pipeline_batches', type=int, default=None,
                      help='timed batches of (b) (default 10; --smoke 2)')
  args = parser.parse_args(argv)
  defaults = SMOKE_DEFAULTS if args.smoke else DEFAULTS
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  for name in ('rounds', 'steps', 'pipeline_batches'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
  if args.warmup < 0 or (args.workers is not None and args.workers < 0):
    parser.error('--warmup and --workers must be >= 0')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  out = args.out or (os.path.join(os.environ['OUT'], 'device_check.json')
                     if os.environ.get('OUT') else None)
  device = jax.devices()[0]
  if device.platform == 'cpu' and not args.smoke:
    print(f'error: no GPU/TPU backend: jax {jax.__version__} sees only '
          f'{jax.devices()}; if a CUDA plugin is installed, its message above '
          "says why it did not start, else install one (pip install -U "
          "'jax[cuda13]', or 'jax[cuda12]' for a CUDA 12 driver), or pass "
          '--smoke to try this script on the CPU', file=sys.stderr)
    return 2
  sizes = SMOKE if args.smoke else FULL
  started = time.time()
  result = {
      'benchmark': 'device_check', 'smoke': args.smoke,
      'command': ' '.join([os.path.relpath(sys.argv[0], _REPO)] +
                          (sys.argv[1:] if argv is None else list(argv))),
      'device': {'platform': device.platform, 'kind': device.device_kind,
                 'count': jax.device_count()},
      'jax': jax.__version__, 'packages': _package_versions(),
      'host': machine_info(),
  }
  parts = {
      'speed': lambda: train_speed(sizes, args),
      'pipeline': lambda: pipeline_speed(sizes, args, _train_rate(result)),
      'conv': lambda: conv_accuracy(sizes, device, jax.devices('cpu')[0]),
  }
  result['part_s'] = {}
  if out:  # the device and versions, even if the first part never ends
    try:
      _write(out, result)
    except OSError as e:
      print(f'error: --out {out}: cannot write it ({e.strerror}); pass a '
            'path in a writable folder', file=sys.stderr)
      return 2
  for name, measure in parts.items():
    start = time.time()
    try:
      result[name] = measure()
    except Exception as e:  # pylint: disable=broad-except
      # One lent device, minutes long: a part that breaks (a package the
      # device's image lacks, an out-of-memory) must not cost the others.
      traceback.print_exc()
      result[name] = {'error': f'{type(e).__name__}: {e}'.splitlines()[0]}
    result['part_s'][name] = round(time.time() - start, 1)
    result['wall_s'] = round(time.time() - started, 1)
    if out:  # after every part: a run cut off by its time limit keeps these
      _write(out, result)
  print(summary(result))
  failed = [name for name in parts if 'error' in result[name]]
  if failed:
    missing = any(result[name]['error'].startswith('ModuleNotFoundError')
                  for name in failed)
    print(f"error: device_check part{'s' if len(failed) > 1 else ''} "
          f"{', '.join(failed)} failed (traceback above)"
          + ('; for a package missing on a machine without an index, run '
             'bash benchmarks/device_wheels.sh where pip reaches one and '
             'carry .whl' if missing else '')
          + ('; the other parts were measured'
             if len(failed) < len(parts) else ''), file=sys.stderr)
  return 0 if not failed and result['conv']['ok'] else 1


# What a device's image brings and what .whl/ adds (benchmarks/
# device_wheels.sh): a part that fails on a version has it on record.
_PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'flax',
             'optax', 'chex', 'orbax-checkpoint', 'numpy', 'protobuf', 'grain',
             'tensorflow-datasets', 'ml_collections', 'pillow')


def _package_versions() -> dict:
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def _train_rate(result: dict) -> Optional[float]:
  speed = result.get('speed', {})
  return speed['train']['images_per_s'] if 'train' in speed else None


def _write(out: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.tmp', 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(out + '.tmp', out)


if __name__ == '__main__':
  sys.exit(main())

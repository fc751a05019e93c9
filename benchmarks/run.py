"""Our jitted train/eval step against PyTorch on CPU, side by side; a table.

  python benchmarks/run.py --nets resnet20,resnet20_B,resnet50 \
      --out benchmarks/results/cpu.json

For each net the real `flax_resnet.train.steps.train_step` (optax SGD momentum
0.9, weight decay 1e-4 on kernels, from `optim.create_optimizer`; synthetic
batch already on the device; the state donated as in the training loop) runs in
the SAME process as a PyTorch model of the same architecture, batch, input
size and optimizer (channels_last, `torch.optim.SGD` with the same decay
mask). The contestants alternate, A B C A B C ..., after a warm-up, and each
reports the median images/s over the rounds; the ratio JAX/PyTorch is taken
from those medians (and, more robust to a neighbour's load, as the median of
the per-round ratios). The JAX variants (jax_side.VARIANTS) are the same
jitted step built with and without this project's CPU speed-ups (XLA compiler
options; layers' gradients), so 'before' and 'after' run side by side.

Also measured, each in its own subprocess so imports and compilers of the
other framework do not count: jit compile time with an empty persistent
compilation cache (cold) and again with the cache that run filled (warm), peak
resident memory (VmHWM) of a process that runs a few steps, and the
input pipeline (`benchmarks/input_pipeline.py`) in images/s against the train
step's rate.

Other tenants on the machine skew absolute numbers; only the ratios measured
here within one process are meant to be compared. The load average is
recorded before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
# First, so that its malloc settings (flax_resnet/host_allocator.py) apply to
# the whole process, PyTorch included, as they would in a user's process:
# FLAX_RESNET_MALLOC=0 measures without them.
from flax_resnet import host_allocator
from machine import cpu_label
from machine import load_average
from machine import machine_info
# pylint: enable=g-import-not-at-top,wrong-import-position

@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked network: our preset plus the matching PyTorch model."""
  preset: str
  overrides: tuple[tuple[str, Any], ...]
  image_size: int
  batch_size: int
  num_classes: int
  torch_model: str  # 'torchvision:<name>' or 'cifar:<depth>:<option>'
  steps_per_round: int
  eval_steps_per_round: int


CASES = {
    'resnet20': Case('resnet20', (), 32, 128, 10, 'cifar:20:A', 3, 6),
    'resnet20_B': Case('resnet20', (('shortcut', 'B'),), 32, 128, 10,
                       'cifar:20:B', 3, 6),
    'resnet56': Case('resnet56', (), 32, 128, 10, 'cifar:56:A', 1, 3),
    'resnet50': Case('resnet50', (), 224, 16, 1000, 'torchvision:resnet50', 1,
                     3),
}

VARIANT_NAMES = ('stock', 'flags', 'grads', 'xla_tuned', 'user_jit_xla',
                 'user_jit_flax_bn', 'tuned', 'user_jit',
                 'user_jit_no_barriers')  # jax_side

WARMUP_TRAIN_STEPS = 2

# Which generated input-pipeline case feeds which kind of net.
PIPELINE_CASE = {32: 'cifar_png', 224: 'imagenet_jpeg'}


# ------------------------------------------------------------ measurement


def alternate(contestants: dict[str, Callable[[int], None]], steps: int,
              rounds: int, images_per_step: int) -> dict[str, dict]:
  """Runs each contestant `steps` steps per round, rotating the start.

  Returns per contestant the wall-clock images/s of every round and their
  median, plus the process CPU seconds per image (robust to time-slicing by
  other tenants, inflated by OpenMP spin-waiting), the kernel's share of them
  and the minor page faults per step (BENCHMARKS.md, "Round 4").
  """
  names = list(contestants)
  rates = {n: [] for n in names}
  cpu = {n: [] for n in names}
  system = {n: [] for n in names}
  faults = {n: [] for n in names}
  images = steps * images_per_step
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      usage0 = resource.getrusage(resource.RUSAGE_SELF)
      wall0, cpu0 = time.perf_counter(), time.process_time()
      contestants[name](steps)
      wall, cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0
      usage = resource.getrusage(resource.RUSAGE_SELF)
      rates[name].append(images / wall)
      cpu[name].append(cpu_s / images)
      system[name].append((usage.ru_stime - usage0.ru_stime) / images)
      faults[name].append((usage.ru_minflt - usage0.ru_minflt) / steps)
  return {n: {'images_per_s': round(statistics.median(rates[n]), 2),
              'rounds': [round(v, 2) for v in rates[n]],
              'cpu_ms_per_image': round(1e3 * statistics.median(cpu[n]), 3),
              'sys_ms_per_image': round(1e3 * statistics.median(system[n]),
                                        3),
              'minor_faults_per_step': round(statistics.median(faults[n])),
              'minor_faults_per_step_rounds': [round(v) for v in faults[n]]}
          for n in names}


def add_ratios(results: dict[str, dict], reference: str) -> None:
  """ratio = median rate / reference median; round_ratio = median of rounds."""
  ref = results[reference]
  for name, res in results.items():
    if name == reference:
      continue
    res['ratio'] = round(res['images_per_s'] / ref['images_per_s'], 3)
    res['round_ratio'] = round(statistics.median(
        a / b for a, b in zip(res['rounds'], ref['rounds'])), 3)


def max_rss_mb() -> float:
  """Peak resident memory of this process image (VmHWM), in MB.

  Not getrusage's ru_maxrss: Linux carries that over from the parent through
  fork and exec, so a probe would report the benchmark process's own peak.
  """
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  raise OSError('no VmHWM in /proc/self/status')


def run_probe(args: argparse.Namespace, extra: list[str],
              timeout: float = 900) -> dict:
  """Runs this script in probe mode in a fresh process; returns its JSON."""
  cmd = [sys.executable, os.path.abspath(__file__), '--probe', *extra]
  if args.cpu_threads:
    cmd += ['--cpu_threads', str(args.cpu_threads)]
  return json_from_subprocess(cmd, timeout)


def json_from_subprocess(cmd: list[str], timeout: float,
                         env: dict | None = None) -> dict:
  """The last JSON line `cmd` prints, or {'error': its output's tail}."""
  result = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    return {'error': (result.stderr or result.stdout)[-1500:]}
  return json.loads(lines[-1])


def probe_main(args: argparse.Namespace) -> None:
  """One measurement in a fresh process; prints one JSON line."""
  kind = args.probe
  if kind == 'pipeline':
    sys.path.insert(0, _HERE)
    import input_pipeline  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    case = args.pipeline_case
    input_pipeline.data.prepare.prepare(input_pipeline.CASES[case]['dataset'],
                                args.data_dir)
    results = [input_pipeline.measure(case, args.data_dir, workers,
                                      args.pipeline_batches, 2, 2)
               for workers in args.pipeline_workers]
    print(json.dumps({'results': results}))
    return
  case = CASES[args.net]
  baseline = max_rss_mb()
  if kind == 'torch':
    import torch_side  # pylint: disable=g-import-not-at-top
    contestant = torch_side.TorchContestant(case)
    start = time.perf_counter()
    contestant.train(1)
    first = time.perf_counter() - start
    contestant.train(args.probe_steps)
    print(json.dumps({'first_step_s': round(first, 2),
                      'rss_at_start_mb': round(baseline),
                      'peak_rss_mb': round(max_rss_mb())}))
    return
  import jax  # pylint: disable=g-import-not-at-top
  import jax_side  # pylint: disable=g-import-not-at-top
  jax_side.enable_cache(args.cache_dir)
  contestant = jax_side.JaxContestant(case, jax_side.VARIANTS[args.variant])
  jax.block_until_ready(contestant.state)
  before_compile = max_rss_mb()
  times = contestant.compile()
  start = time.perf_counter()
  contestant.train(1)
  times['first_train_step_s'] = round(time.perf_counter() - start, 2)
  contestant.train(args.probe_steps)
  contestant.eval(1)
  print(json.dumps(dict(times, rss_at_start_mb=round(baseline),
                        rss_before_compile_mb=round(before_compile),
                        peak_rss_mb=round(max_rss_mb()))))


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
          'flax': flax.__version__, 'optax': optax.__version__,
          'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'jax_devices': [str(d) for d in jax.devices()]}


def bench_net(args: argparse.Namespace, name: str) -> dict:
  """Compile probes, memory probes, then the alternating timing."""
  case = CASES[name]
  variants = args.variants
  started = time.time()
  out: dict[str, Any] = {'case': dataclasses.asdict(case)}
  log = functools.partial(print, f'[{name}]', file=sys.stderr, flush=True)

  if not args.skip_probes:
    probe_variant = variants[-1]
    with tempfile.TemporaryDirectory() as probe_cache:
      common = ['--net', name, '--variant', probe_variant, '--cache_dir',
                probe_cache, '--probe_steps', str(args.probe_steps)]
      log(f'cold compile ({probe_variant}, empty cache)')
      cold = run_probe(args, ['jax', *common])
      log('warm compile (filled cache)')
      warm = run_probe(args, ['jax', *common])
    log('torch memory')
    torch_probe = run_probe(args, ['torch', '--net', name, '--probe_steps',
                                   str(args.probe_steps)])
    out['compile'] = {'variant': probe_variant, 'cold': cold, 'warm': warm}
    out['memory_mb'] = {f'jax_{probe_variant}': warm.get('peak_rss_mb'),
                        f'jax_{probe_variant}_cold_compile':
                            cold.get('peak_rss_mb'),
                        'torch': torch_probe.get('peak_rss_mb'),
                        'torch_first_step_s': torch_probe.get('first_step_s')}

  import jax_side  # pylint: disable=g-import-not-at-top
  import torch_side  # pylint: disable=g-import-not-at-top
  log('building contestants')
  jax_contestants = {v: jax_side.JaxContestant(case, jax_side.VARIANTS[v])
                     for v in variants}
  out['main_process_compile'] = {}
  for v, c in jax_contestants.items():
    log(f'compiling {v}')
    out['main_process_compile'][v] = c.compile()
  torch_contestant = torch_side.TorchContestant(case)
  # Warm-up: compile, and grow the process's heap to the high-water mark
  # that a step needs (with flax_resnet's malloc settings it stays there;
  # resnet50 gets there in its second step).
  for c in (*jax_contestants.values(), torch_contestant):
    c.train(WARMUP_TRAIN_STEPS)
    c.eval(1)
  for phase, steps in (('train', case.steps_per_round),
                       ('eval', case.eval_steps_per_round)):
    contestants = {f'jax_{v}': getattr(c, phase)
                   for v, c in jax_contestants.items()}
    contestants['torch'] = getattr(torch_contestant, phase)
    log(f'{phase}: {args.rounds} rounds x {steps} steps')
    out[phase] = alternate(contestants, steps, args.rounds, case.batch_size)
    add_ratios(out[phase], 'torch')
  del jax_contestants, torch_contestant
  out['wall_s'] = round(time.time() - started, 1)
  return out


def pipeline(args: argparse.Namespace, nets: list[str],
             results: dict) -> dict:
  """Input-pipeline images/s next to the best train rate of each net."""
  out = {}
  data_dir = args.data_dir or tempfile.mkdtemp(prefix='bench_data_')
  for name in nets:
    case = CASES[name]
    pipeline_case = PIPELINE_CASE.get(case.image_size)
    if pipeline_case is None or pipeline_case in out:
      continue
    print(f'[pipeline] {pipeline_case}', file=sys.stderr, flush=True)
    probe = run_probe(args, [
        'pipeline', '--pipeline_case', pipeline_case, '--data_dir', data_dir,
        '--pipeline_batches', str(args.pipeline_batches),
        '--pipeline_workers', *map(str, args.pipeline_workers)], timeout=1800)
    out[pipeline_case] = probe
  for name in nets:
    pipeline_case = PIPELINE_CASE.get(CASES[name].image_size)
    probe = out.get(pipeline_case, {})
    if 'results' not in probe:
      continue
    best_pipe = max(r['images_per_s'] for r in probe['results'])
    train = results[name]['train']
    best_jax = max(v['images_per_s'] for k, v in train.items()
                   if k.startswith('jax'))
    # Both share the same cores: the rate of the two in turn is the harmonic
    # combination; the pipeline is the bottleneck if it is the slower one.
    results[name]['input_pipeline'] = {
        'case': pipeline_case, 'best_images_per_s': best_pipe,
        'train_images_per_s': best_jax,
        'pipeline_over_train': round(best_pipe / best_jax, 2),
        'bottleneck': best_pipe < best_jax,
        'combined_if_serialised_images_per_s': round(
            1 / (1 / best_pipe + 1 / best_jax), 1),
    }
  return out


def print_table(results: dict) -> None:
  print(f"CPU: {cpu_label(results['machine']['cpu'])}, "
        f"{results['machine']['cpu_count']} cores; flax_resnet's malloc "
        f"settings: {results.get('malloc')}")
  rows = [('net', 'phase', 'contestant', 'img/s', 'ratio', 'round ratio',
           'cpu ms/img', 'sys ms/img', 'faults/step')]
  for name, res in results['nets'].items():
    for phase in ('train', 'eval'):
      for contestant, r in res[phase].items():
        rows.append((name, phase, contestant, f"{r['images_per_s']:.1f}",
                     str(r.get('ratio', '-')), str(r.get('round_ratio', '-')),
                     f"{r['cpu_ms_per_image']:.2f}",
                     f"{r['sys_ms_per_image']:.2f}",
                     str(r['minor_faults_per_step'])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for i, row in enumerate(rows):
    print('  '.join(c.ljust(w) for c, w in zip(row, widths)))
    if i == 0:
      print('  '.join('-' * w for w in widths))
  print()
  for name, res in results['nets'].items():
    comp = res.get('compile', {})
    cold, warm = comp.get('cold', {}), comp.get('warm', {})
    mem = res.get('memory_mb', {})
    if comp:
      variant = comp['variant']
      print(f"{name}: compile ({variant}) train cold "
            f"{cold.get('train_compile_s')} s / warm "
            f"{warm.get('train_compile_s')} s (+ lower "
            f"{cold.get('train_lower_s')} s); eval cold "
            f"{cold.get('eval_compile_s')} s / warm "
            f"{warm.get('eval_compile_s')} s; peak RSS jax "
            f"{mem.get('jax_' + variant)} MB (cold compile "
            f"{mem.get('jax_' + variant + '_cold_compile')} MB), torch "
            f"{mem.get('torch')} MB")
    pipe = res.get('input_pipeline')
    if pipe:
      print(f"{name}: input pipeline {pipe['case']} {pipe['best_images_per_s']}"
            f" img/s vs train {pipe['train_images_per_s']} img/s -> "
            f"{'BOTTLENECK' if pipe['bottleneck'] else 'not the bottleneck'}")
  print(f"load average before {results['load_average_before']} after "
        f"{results['load_average_after']}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nets', default='resnet20,resnet20_B,resnet50',
                      help=f'comma-separated, of {", ".join(CASES)}')
  parser.add_argument('--variants', default='user_jit_xla,tuned,user_jit',
                      help=f"JAX variants, of {', '.join(VARIANT_NAMES)} "
                      '(see jax_side.py)')
  parser.add_argument('--out', default=None, help='JSON result path')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--probe_steps', type=int, default=2)
  parser.add_argument('--skip_probes', action='store_true',
                      help='no compile / memory subprocesses')
  parser.add_argument('--skip_pipeline', action='store_true')
  parser.add_argument('--data_dir', default=None,
                      help='reuse generated pipeline datasets (default: tmp)')
  parser.add_argument('--pipeline_batches', type=int, default=8)
  parser.add_argument('--pipeline_workers', type=int, nargs='+',
                      default=[0, 2])
  parser.add_argument('--cache_dir', default=None,
                      help='persistent compilation cache of the main process '
                      '(default: a fresh temporary folder)')
  parser.add_argument('--cpu_threads', type=int, default=0,
                      help='torch.set_num_threads; 0 keeps the default')
  # Internal: one measurement in a subprocess.
  parser.add_argument('--probe', choices=['jax', 'torch', 'pipeline'],
                      help=argparse.SUPPRESS)
  parser.add_argument('--net', help=argparse.SUPPRESS)
  parser.add_argument('--variant', default='tuned', help=argparse.SUPPRESS)
  parser.add_argument('--pipeline_case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.nets = [n for n in args.nets.split(',') if n]
  args.variants = [v for v in args.variants.split(',') if v]
  for field, values, valid in (('--nets', args.nets, CASES),
                               ('--variants', args.variants, VARIANT_NAMES)):
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
      parser.error(f'{field}: {unknown or "empty"} not among '
                   f'{", ".join(valid)}')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.cpu_threads and args.probe != 'jax':
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.cpu_threads)
  if args.probe:
    probe_main(args)
    return
  import jax_side  # pylint: disable=g-import-not-at-top
  started = time.time()
  results: dict[str, Any] = {
      'benchmark': 'train_step_vs_pytorch',
      'command': ' '.join([os.path.relpath(sys.argv[0], _REPO)] + sys.argv[1:]),
      'machine': machine_info(),
      'malloc': host_allocator.status(),
      'load_average_before': load_average(),
      'variants': {v: dataclasses.asdict(jax_side.VARIANTS[v])
                   for v in args.variants},
      'nets': {},
  }
  with tempfile.TemporaryDirectory() as tmp_cache:
    jax_side.enable_cache(args.cache_dir or tmp_cache)
    results['versions'] = versions()
    for name in args.nets:
      results['nets'][name] = bench_net(args, name)
  if not args.skip_pipeline:
    pipeline_started = time.time()
    results['input_pipeline'] = pipeline(args, args.nets, results['nets'])
    results['input_pipeline_wall_s'] = round(time.time() - pipeline_started, 1)
  results['load_average_after'] = load_average()
  results['wall_s'] = round(time.time() - started, 1)
  print_table(results)
  if args.out:
    write_json(args.out, results)


def write_json(path: str, results: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()

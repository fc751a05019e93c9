"""Page faults, kernel time and peak memory of a train step, per malloc setting.

  python benchmarks/step_faults.py --nets resnet20,resnet50 --steps 30

For each net, two fresh processes run the user's own jitted train step
(`jax_side`'s `user_jit`, as `run.py` times it) for --steps steps after two
warm-up steps: one with flax_resnet's malloc settings (host_allocator.py), one
with FLAX_RESNET_MALLOC=0. Each reports, as the median of its steps: wall ms,
minor page faults, and the kernel's (sys) CPU ms of the whole process; the
largest per-step figures (heap growth: the first steps, or now and then once
a small allocation splits a freed block); and the process's peak resident
memory (VmHWM). PyTorch is not involved: this is the one-command check that the
settings apply on a CPU model (the faults are the kernel's count, not a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_HERE), _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
# First: the malloc settings must precede JAX's backend.
from flax_resnet import host_allocator
from machine import cpu_label
from machine import load_average
from machine import machine_info
import run
# pylint: enable=g-import-not-at-top,wrong-import-position

WARMUP_STEPS = 2


def measure(net: str, steps: int) -> dict:
  """In this process: the per-step figures of `net`'s user_jit train step."""
  import jax_side  # pylint: disable=g-import-not-at-top
  contestant = jax_side.JaxContestant(run.CASES[net],
                                      jax_side.VARIANTS['user_jit'])
  contestant.compile()
  contestant.train(WARMUP_STEPS)
  wall, faults, system = [], [], []
  for _ in range(steps):
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    contestant.train(1)
    wall.append(1e3 * (time.perf_counter() - start))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(usage.ru_minflt - usage0.ru_minflt)
    system.append(1e3 * (usage.ru_stime - usage0.ru_stime))
  return {
      'malloc': host_allocator.status(),
      'batch_size': run.CASES[net].batch_size,
      'ms_per_step': round(statistics.median(wall), 1),
      'minor_faults_per_step': round(statistics.median(faults)),
      'sys_ms_per_step': round(statistics.median(system), 1),
      'max_minor_faults_in_a_step': max(faults),
      'steps_with_faults': sum(f >= 100 for f in faults),
      'peak_rss_mb': round(run.max_rss_mb()),
  }


def in_subprocess(net: str, steps: int, malloc_on: bool) -> dict:
  env = dict(os.environ)
  env.pop(host_allocator.SWITCH, None)
  if not malloc_on:
    env[host_allocator.SWITCH] = '0'
  return run.json_from_subprocess(
      [sys.executable, os.path.abspath(__file__), '--measure', net,
       '--steps', str(steps)], timeout=1800, env=env)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nets', default='resnet20,resnet50')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--out', default=None, help='JSON result path')
  parser.add_argument('--measure', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args.measure, args.steps)))
    return
  results = {'benchmark': 'step_faults', 'command': ' '.join(
      [os.path.relpath(sys.argv[0], os.path.dirname(_HERE))] + sys.argv[1:]),
             'machine': machine_info(),
             'load_average_before': load_average(), 'nets': {}}
  for net in [n for n in args.nets.split(',') if n]:
    results['nets'][net] = {
        setting: in_subprocess(net, args.steps, setting == 'on')
        for setting in ('on', 'off')}
  results['load_average_after'] = load_average()
  print(f"CPU: {cpu_label(results['machine']['cpu'])}")
  columns = ('ms_per_step', 'minor_faults_per_step', 'sys_ms_per_step',
             'max_minor_faults_in_a_step', 'steps_with_faults', 'peak_rss_mb')
  print('net       malloc  ' + '  '.join(columns))
  for net, by_setting in results['nets'].items():
    for setting, r in by_setting.items():
      if 'error' in r:
        print(f'{net:9} {setting:6}  error: {r["error"]}')
        continue
      print(f'{net:9} {setting:6}  ' + '  '.join(
          str(r[c]).rjust(len(c)) for c in columns))
  if args.out:
    run.write_json(args.out, results)


if __name__ == '__main__':
  main()

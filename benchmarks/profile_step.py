"""Where one jitted train step spends its time on XLA:CPU, by kind of op.

  python benchmarks/profile_step.py --net resnet20 --variant tuned

Records two steps with `jax.profiler` and sums the durations of the executed
XLA thunks per kind (`transpose_copy_fusion`, `ynn_fusion`, ...) and for the
ten most expensive single thunks. Eigen convolutions hand their work to the
intra-op thread pool without a trace event of their own, so their time shows
up as the part of the step no thunk accounts for (`unattributed`), next to the
wall time of the step. Writes the raw trace under --trace_dir for Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_HERE), _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

import jax_side
import run

_NOT_THUNKS = ('ThunkExecutor', 'PjitFunction', '$', 'end: ')


def thunk_times(trace_file: str) -> collections.Counter:
  """Microseconds per executed thunk name, from a perfetto JSON trace."""
  with gzip.open(trace_file) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  times = collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') == 'X' and not name.startswith(_NOT_THUNKS):
      times[name] += event['dur']
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--net', default='resnet20', choices=list(run.CASES))
  parser.add_argument('--variant', default='tuned',
                      choices=list(jax_side.VARIANTS))
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--trace_dir', default=None)
  parser.add_argument('--top', type=int, default=10)
  args = parser.parse_args(argv)

  contestant = jax_side.JaxContestant(run.CASES[args.net],
                                      jax_side.VARIANTS[args.variant])
  contestant.compile()
  contestant.train(2)
  start = time.perf_counter()
  contestant.train(args.steps)
  wall_ms = 1e3 * (time.perf_counter() - start) / args.steps

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='profile_step_')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    contestant.train(args.steps)
  trace_file, = glob.glob(
      os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  per_thunk = thunk_times(trace_file)
  per_kind = collections.Counter()
  for name, micros in per_thunk.items():
    per_kind[re.sub(r'\.\d+', '', name)] += micros

  def ms(micros):
    return round(micros / 1e3 / args.steps, 1)

  attributed = ms(sum(per_kind.values()))
  result = {
      'net': args.net, 'variant': args.variant,
      'step_wall_ms': round(wall_ms, 1),
      'thunk_ms': attributed,
      # Eigen convolutions and idle time: see the module docstring.
      'unattributed_ms': round(wall_ms - attributed, 1),
      'by_kind_ms': {k: ms(v) for k, v in per_kind.most_common() if ms(v)},
      'top_thunks_ms': {k: ms(v) for k, v in per_thunk.most_common(args.top)},
      'trace': trace_file,
  }
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()

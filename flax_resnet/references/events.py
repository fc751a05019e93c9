"""Probe events -> reference table rows: one rule for every library.

Every library's probe reports a list of events in call order: 'start'/'end'
of a residual block (with its shapes and trainable parameter count) and
'leaf' for a layer (kind, kernel, stride, bias, shapes, and inside a block
whether it sits on the main path or the shortcut). `entry_from_events` turns
that into a reference entry, the schema `layout_compare.compare` reads.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile
from typing import Any, Optional

Probe = dict[str, Any]  # {'reference_model', 'input_size', 'events', ...}


def square(value, what: str) -> int:
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(set(values)) != 1:
    raise ValueError(f'{what} {values} is not square')
  return int(values[0])


def run_child(command: list[str], env: dict[str, str], what: str):
  """Runs a probe in another interpreter; returns the JSON it wrote."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'probe.json'
    result = subprocess.run(command + [f'--out={out}'], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode or not out.exists():
      raise RuntimeError(f'{what} probe failed (`{" ".join(command)}`):\n'
                         f'{result.stderr[-3000:]}')
    return json.loads(out.read_text())


def _op_text(op: dict[str, Any]) -> str:
  if op['kind'] == 'conv':
    groups = f' g{op["groups"]}' if op.get('groups', 1) > 1 else ''
    bias = ' +bias' if op['bias'] else ''
    return f'conv{op["kernel"]}x{op["kernel"]}/{op["stride"]}{groups}{bias}'
  if op['kind'] == 'bn':
    return 'BN' if op['params'] else 'BN (no scale, no shift)'
  if op['kind'] in ('maxpool', 'avgpool'):
    return f'{op["kind"]}{op["kernel"]}x{op["kernel"]}/{op["stride"]}'
  return op.get('type', op['kind'])


def _block_row(start: dict[str, Any], ops: list[dict[str, Any]],
               end: dict[str, Any]) -> dict[str, Any]:
  """One reference row from the layers a block was observed to call."""
  in_channels, *in_size = start['in_shape']
  out_channels, *out_size = end['out_shape']
  main = [op for op in ops if op['role'] == 'main']
  skip = [op for op in ops if op['role'] == 'shortcut']
  strided = [op for op in main if op['kind'] == 'conv' and op['stride'] != 1]
  convs = [op for op in skip if op['kind'] == 'conv']
  pools = [op for op in skip if op['kind'] == 'avgpool' and op['stride'] > 1]
  if not skip:
    shortcut, shortcut_stride = 'identity', 1
  elif convs:
    shortcut = 'avgpool+projection' if pools else 'projection'
    shortcut_stride = pools[0]['stride'] if pools else convs[0]['stride']
  else:
    # Parameter-free: zero channels are appended if the width grows (paper
    # option A), otherwise the skip path only subsamples (Keras V2 max-pool).
    shortcut = 'zero-pad' if out_channels > in_channels else 'subsample'
    shortcut_stride = skip[0]['in_shape'][1] // skip[-1]['out_shape'][1]
  return {
      'stage': start['stage'], 'index': start['index'],
      'in_channels': in_channels, 'out_channels': out_channels,
      'in_size': in_size, 'out_size': out_size,
      'stride_at': (f'{strided[0]["kernel"]}x{strided[0]["kernel"]}'
                    if strided else 'none'),
      'shortcut': shortcut,
      'shortcut_stride': shortcut_stride,
      'shortcut_norm': any(op['kind'] == 'bn' for op in skip),
      'params': start['params'],
      'library_block': start['path'],
      'library_stride_layer': strided[0]['path'] if strided else None,
  }


def entry_from_events(probe: Probe,
                      counts_note: Optional[str] = None) -> dict[str, Any]:
  """A reference entry (the schema `layout_compare.compare` reads) from a probe.

  Every count is the library's own: per block and in the stem the trainable
  parameters (conv weights and biases, BN gamma and beta), `total_params`
  the library's trainable total, and `library_total_params` everything it
  stores (BN running statistics too; Keras' count_params()).

  Args:
    probe: the events one library reported for one model.
    counts_note: set for a preset that matches the library's layout but not
      its weights (e.g. resnet50_v1 has no conv biases): the entry then says
      why its counts are not compared.
  """
  events = probe['events']
  first = next(i for i, e in enumerate(events) if e['event'] == 'start')
  stem_ops = [e for e in events[:first] if e['event'] == 'leaf']
  stem_params = sum({e['path']: e['params'] for e in stem_ops}.values())
  stem_out = events[first]['in_shape']
  blocks, start, ops = [], None, []
  for event in events:
    if event['event'] == 'start':
      if start is not None:
        raise ValueError(f'block {event["path"]} starts inside {start["path"]}')
      start, ops = event, []
    elif event['event'] == 'end':
      blocks.append(_block_row(start, ops, event))
      start = None
    elif start is not None:
      ops.append(event)
  entry = {
      'reference_model': probe['reference_model'],
      'input_size': probe['input_size'],
      'stem': {'out_channels': stem_out[0], 'out_size': stem_out[1:],
               'params': stem_params,
               'layers': [_op_text(e) for e in stem_ops]},
      'blocks': blocks,
      'total_params': probe['total_params'],
  }
  if 'total_variables' in probe:
    entry['total_variables'] = probe['total_variables']
  if 'library_total_params' in probe:
    entry['library_total_params'] = probe['library_total_params']
  if counts_note:
    entry['counts_compared'] = False
    entry['counts_note'] = counts_note
  return entry

"""Extracts reference layout tables from the reference implementations.

    python -m flax_resnet.references.extract torchvision [--out DIR] [--check]
    python -m flax_resnet.references.extract all --check
    python -m flax_resnet.references.extract keras --models resnet50_v1

Each reference library builds its OWN model with random weights (never a
download), runs one forward pass with hooks on every residual block and every
layer, and the calls it observed become the rows of `<name>.json`: strides,
shortcuts, shapes and parameter counts all come from the running library, none
is typed here. `--check` re-extracts and compares with the stored table
instead of writing it (exit status 1 on any difference).

Every library reports the same intermediate form, a list of events in call
order: 'start'/'end' of a residual block (with its shapes and trainable
parameter count) and 'leaf' for a layer (kind, kernel, stride, bias, shapes,
and inside a block whether it sits on the main path or the shortcut).
`entry_from_events` turns that into a reference entry, one rule for all.

Where the libraries run:
  torchvision  in process, torchvision's real models/resnet.py from the wheel
               (see torchvision_source.py).
  paper        in process, a small PyTorch transcription of He et al. 2015
               section 4.2 (there is no runnable original); see probe_paper.
  timm         in a child process (`--probe timm`), because timm needs a
               stand-in for torchvision here (see probe_timm).
  keras(_v2)   in a child process with KERAS_BACKEND=jax, so that a Keras
               already imported with another backend cannot interfere.
  gluon_v1/v2  in MXNet's own virtualenv ($FLAX_RESNET_MXNET_PYTHON)
               running _gluon_probe.py (probe_gluon.py).

One module per library: probe_torchvision, probe_paper, probe_timm,
probe_keras and probe_gluon; events.py turns what they observe into rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

from flax_resnet import references
from flax_resnet.references import events
from flax_resnet.references import probe_gluon
from flax_resnet.references import probe_keras
from flax_resnet.references import probe_paper
from flax_resnet.references import probe_timm
from flax_resnet.references import probe_torchvision


DIRECTORY = references.DIRECTORY
Probe = events.Probe
entry_from_events = events.entry_from_events


def _probe_in_child(library: str, models: Sequence[str], input_size: int,
                    **env):
  """Runs _PROBES_IN_CHILD[library] in a fresh interpreter."""
  payload = events.run_child(
      [sys.executable, '-m', 'flax_resnet.references.extract', '--probe',
       library, f'--size={input_size}', *models],
      {**os.environ, **env}, library)
  return payload['source'], payload['probes']


_PROBES_IN_CHILD = {'timm': probe_timm.probe_in_process,
                    'keras': probe_keras.probe_in_process}

# One entry per library: references that share a library (keras and
# keras_v2, gluon_v1 and gluon_v2) are probed in one run of it.
PROBES: dict[str, Callable[[Sequence[str], int], tuple[str, list[Probe]]]] = {
    'torchvision': probe_torchvision.probe,
    'paper': probe_paper.probe,
    'timm': lambda models, size: _probe_in_child('timm', models, size),
    'keras': lambda models, size: _probe_in_child('keras', models, size,
                                                  KERAS_BACKEND='jax'),
    'gluon': probe_gluon.probe,
}


# ----------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Reference:
  """How to build one reference table.

  Attributes:
    name: file stem of the table, a key of references.NAMES.
    models: our preset name -> the library's own model name.
    input_size: image height and width of the forward pass.
    probe: the key in PROBES of the library that builds the models.
    notes: conventions that differ from this project, in words.
    layout_only: presets that match the library's layout but not its weights
      -> why their parameter counts are not compared.
    requires: a module that must be importable (None: always available).
  """
  name: str
  models: dict[str, str]
  input_size: int
  probe: str
  notes: str
  layout_only: dict[str, str] = dataclasses.field(default_factory=dict)
  requires: Optional[str] = None


_COUNTS = (
    'Counts are the library\'s own: per block, in the stem and in '
    'total_params the trainable parameters (conv weights and biases, BN gamma '
    'and beta), compared with our params collection; library_total_params '
    'is everything the library stores, BN running statistics included. ')
_TORCH_NOTES = (
    'Per-block params count trainable parameters (conv weights, BN gamma and '
    'beta), not BN running statistics, as in this project. ')

_GLUON_V1_BIAS = (
    'Gluon BottleneckV1 gives its two 1x1 convs (body.0, body.6) a bias; '
    'this preset has none. Use gluon_resnet{d}_v1 for the exact network.')
_GLUON_V2_STEM = (
    'Gluon V2 normalises the raw input with a parameter-free BatchNorm('
    'scale=False, center=False) and follows conv0 with BN+ReLU before the '
    'max-pool; this preset\'s stem is conv + max-pool only. Use '
    'gluon_resnet{d}_v2 for the exact network.')
_KERAS_V1_BIAS = (
    'Keras gives every conv a bias and uses BN epsilon 1.001e-5; this preset '
    'has no biases. Use keras_resnet{d} for the exact network.')

_GLUON_DEPTHS = (18, 34, 50, 101, 152)
_KERAS_DEPTHS = (50, 101, 152)
_KERAS_NAMES = {50: 'ResNet50', 101: 'ResNet101', 152: 'ResNet152'}

REFERENCES: dict[str, Reference] = {
    'torchvision': Reference(
        'torchvision',
        {n: n for n in ('resnet18', 'resnet34', 'resnet50', 'resnet101',
                        'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
                        'resnext101_64x4d', 'wide_resnet50_2',
                        'wide_resnet101_2')},
        224, 'torchvision',
        _TORCH_NOTES + 'torchvision is "v1.5": a bottleneck strides on its '
        '3x3 (conv2). A projection (downsample: 1x1 conv + BN) is built when '
        'stride != 1 or inplanes != planes * expansion, so bottleneck stage 1 '
        'has a stride-1 projection and basic-block stage 1 has none.',
        requires='torch'),
    'timm': Reference(
        'timm', {n: n for n in ('resnet50d', 'resnet101d', 'resnet200')},
        224, 'timm',
        _TORCH_NOTES + 'resnet50d/resnet101d are ResNet-D: deep stem '
        '(3x3 convs 32, 32, 64) and avg_down shortcuts (2x2 avg-pool with the '
        'stride, then 1x1 conv stride 1 + BN); where the stride is 1 timm '
        'replaces the pool with Identity, so the row is a plain stride-1 '
        'projection. resnet200 is the plain v1.5 layout with depths '
        '(3, 24, 36, 3).',
        requires='timm'),
    'gluon_v1': Reference(
        'gluon_v1',
        {**{f'gluon_resnet{d}_v1': f'resnet{d}_v1' for d in _GLUON_DEPTHS},
         **{f'resnet{d}_v1': f'resnet{d}_v1' for d in _GLUON_DEPTHS}},
        224, 'gluon',
        _COUNTS + 'Gluon BottleneckV1 is true v1: its first 1x1 (body.0) '
        'carries the stride, and its body.0 and body.6 1x1 convs are built '
        'with Gluon\'s default use_bias=True (gluon_resnet{50,101,152}_v1 '
        'have conv_bias=(conv1, conv3)). Basic blocks have no conv biases. A '
        'projection (downsample: 1x1 conv + BN) is built when channels != '
        'in_channels. resnet{d}_v1 share the layout but not the biases.',
        layout_only={f'resnet{d}_v1': _GLUON_V1_BIAS.format(d=d)
                     for d in (50, 101, 152)}),
    'gluon_v2': Reference(
        'gluon_v2',
        {**{f'gluon_resnet{d}_v2': f'resnet{d}_v2' for d in _GLUON_DEPTHS},
         **{f'resnet{d}_v2': f'resnet{d}_v2' for d in _GLUON_DEPTHS}},
        224, 'gluon',
        _COUNTS + 'Pre-activation (He et al. 2016). The stride sits on the '
        '3x3 (conv2 of BottleneckV2, conv1 of BasicBlockV2). The projection '
        '(downsample, built when channels != in_channels) is a 1x1 conv '
        'WITHOUT BN fed relu(bn1(x)). The stem starts with a "data" '
        'BatchNorm(scale=False, center=False): its gamma and beta are held at '
        '1 and 0 (not trainable, so not in the trainable counts; our '
        'input_bn stores only its running statistics), then conv0 -> BN -> '
        'ReLU -> max-pool. resnet{d}_v2 share the block layout but not the '
        'stem.',
        layout_only={f'resnet{d}_v2': _GLUON_V2_STEM.format(d=d)
                     for d in _GLUON_DEPTHS}),
    'keras': Reference(
        'keras',
        {**{f'keras_resnet{d}': _KERAS_NAMES[d] for d in _KERAS_DEPTHS},
         **{f'resnet{d}_v1': _KERAS_NAMES[d] for d in _KERAS_DEPTHS}},
        224, 'keras',
        _COUNTS + 'Keras applications ResNet (true v1): the first 1x1 '
        '(_1_conv) carries the stride, and every stack\'s first block has a '
        'projection (_0_conv + _0_bn). Every conv carries a bias and BN '
        'epsilon is 1.001e-5. total_variables is count_params(), which '
        'counts BN moving statistics: compared with our params + '
        'batch_stats. resnet{50,101,152}_v1 share the layout but not the '
        'biases.',
        layout_only={f'resnet{d}_v1': _KERAS_V1_BIAS.format(d=d)
                     for d in _KERAS_DEPTHS},
        requires='keras'),
    'keras_v2': Reference(
        'keras_v2',
        {f'keras_resnet{d}_v2': _KERAS_NAMES[d] + 'V2' for d in _KERAS_DEPTHS},
        224, 'keras',
        _COUNTS + 'Keras ResNetV2 is pre-activation but NOT He et al. 2016\'s '
        'layout: each stack\'s first block has a stride-1 projection '
        '(_0_conv, with bias, no BN, fed the pre-activation); the stride sits '
        'on the 3x3 of the LAST block of stacks 2-4 (conv2..conv4), whose '
        'shortcut is a parameter-free 1x1 max-pool with stride 2 (shortcut '
        '"subsample": no zero channels); stack 5 has no stride. Stage outputs '
        'are 28/14/7/7 at 224. The stem is a conv with bias, then a '
        'zero-padded max-pool, with no BN or ReLU between. Biases sit on the '
        'stem, _0_conv and _3_conv. total_variables is count_params() (BN '
        'moving statistics included). The resnet{d}_v2 presets (He et al. '
        'layout) do not match this table.',
        requires='keras'),
    'paper': Reference(
        'paper', {f'resnet{d}': f'resnet{d}' for d in probe_paper.PAPER_DEPTHS},
        32, 'paper',
        _TORCH_NOTES + 'CIFAR-10 nets of He et al. 2015 section 4.2: option A '
        'shortcuts are parameter-free (subsample + zero channels) and are used '
        'only where the shape changes (first block of stages 2 and 3); the '
        'stem is one 3x3 conv (16) + BN + ReLU without max-pool.',
        requires='torch'),
}


# ------------------------------------------------------------------- public


def unavailable(name: str) -> Optional[str]:
  """Why reference `name` cannot be extracted here, or None if it can."""
  reference = REFERENCES[name]
  if reference.probe == 'gluon':
    return probe_gluon.unavailable()
  needs = reference.requires
  if needs and importlib.util.find_spec(needs) is None:
    return f'{needs} is not installed'
  return None


def extract_tables(requests: dict[str, Optional[Sequence[str]]]
                   ) -> dict[str, dict[str, Any]]:
  """Builds several tables: reference name -> our presets (None: all).

  References of one library are probed in a single run, so e.g. keras and
  keras_v2 pay for one Keras start-up.
  """
  wanted: dict[str, list[str]] = {}
  for name, models in requests.items():
    if name not in REFERENCES:
      raise ValueError(f'reference {name!r} is unknown; choose one of '
                       f'{", ".join(REFERENCES)}.')
    reference = REFERENCES[name]
    presets = list(models) if models else list(reference.models)
    unknown = [m for m in presets if m not in reference.models]
    if unknown:
      raise ValueError(f'models {", ".join(unknown)} are not in reference '
                       f'{name!r}; it covers {", ".join(reference.models)}.')
    wanted[name] = presets
  by_library: dict[tuple[str, int], list[str]] = {}
  for name in wanted:
    reference = REFERENCES[name]
    by_library.setdefault((reference.probe, reference.input_size),
                          []).append(name)
  tables = {}
  for (library, input_size), names in by_library.items():
    library_models = list(dict.fromkeys(
        REFERENCES[n].models[m] for n in names for m in wanted[n]))
    source, probes = PROBES[library](library_models, input_size)
    probe_of = dict(zip(library_models, probes))
    for name in names:
      reference = REFERENCES[name]
      tables[name] = {
          'reference': name,
          'source': source,
          'extracted_by': f'python -m flax_resnet.references.extract {name}',
          'notes': reference.notes,
          'models': {m: entry_from_events(probe_of[reference.models[m]],
                                          reference.layout_only.get(m))
                     for m in wanted[name]},
      }
  return {name: tables[name] for name in requests}


def extract(name: str, models: Optional[Sequence[str]] = None
            ) -> dict[str, Any]:
  """Builds reference `name`'s table (only `models`, our preset names)."""
  return extract_tables({name: models})[name]


def dumps(table: dict[str, Any]) -> str:
  """JSON with the stem and each block row on one line, for row-wise diffs."""
  rows = {}

  def compact(value):
    if isinstance(value, dict):
      return {k: ([token(r) for r in v] if k == 'blocks' else
                  token(v) if k == 'stem' else compact(v))
              for k, v in value.items()}
    return value

  def token(row):
    key = f'@@row{len(rows)}@@'
    rows[key] = json.dumps(row)
    return key

  text = json.dumps(compact(table), indent=1)
  for key, row in rows.items():
    text = text.replace(f'"{key}"', row)
  return text + '\n'


def differences(fresh: dict[str, Any], stored: dict[str, Any]) -> list[str]:
  """Where a fresh extraction disagrees with the stored table, in words."""
  problems = []
  for preset, entry in fresh['models'].items():
    old = stored['models'].get(preset)
    if old is None:
      problems.append(f'{preset}: missing from the stored table')
      continue
    for key in sorted(set(entry) | set(old)):
      if key == 'blocks':
        continue
      if entry.get(key) != old.get(key):
        problems.append(f'{preset}: {key} is {old.get(key)!r} stored but '
                        f'{entry.get(key)!r} extracted')
    rows = {(r['stage'], r['index']): r for r in entry['blocks']}
    old_rows = {(r['stage'], r['index']): r for r in old['blocks']}
    for key in sorted(set(rows) | set(old_rows)):
      if rows.get(key) != old_rows.get(key):
        problems.append(f'{preset} stage {key[0]} block {key[1]}: stored '
                        f'{old_rows.get(key)} but extracted {rows.get(key)}')
  return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m flax_resnet.references.extract',
      description='Build reference layout tables from the reference '
      'libraries\' own models (random weights, nothing downloaded).')
  parser.add_argument('names', nargs='+',
                      help=f'{", ".join(REFERENCES)}, or all (with --probe: '
                      'the library, then its model names)')
  parser.add_argument('--out', type=pathlib.Path, default=DIRECTORY,
                      help='folder of the JSON tables (default: the package)')
  parser.add_argument('--check', action='store_true',
                      help='compare with the stored tables instead of writing')
  parser.add_argument('--models', default=None,
                      help='comma-separated presets to extract (default all); '
                      'only with --check, so a stored table stays complete')
  parser.add_argument('--probe', choices=sorted(_PROBES_IN_CHILD),
                      help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, default=224, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.probe:  # the child side of _probe_in_child
    source, probes = _PROBES_IN_CHILD[args.probe](args.names, args.size)
    args.out.write_text(json.dumps({'source': source,
                                             'probes': probes}))
    return 0
  if rest:
    parser.error(f'unrecognised arguments: {" ".join(rest)}')
  names = list(REFERENCES) if args.names == ['all'] else args.names
  for name in names:
    if name not in REFERENCES:
      parser.error(f'reference {name!r} is unknown; choose one of '
                   f'{", ".join(REFERENCES)} or all')
  if args.models and not args.check:
    parser.error('--models writes an incomplete table; use it with --check')
  models = args.models.split(',') if args.models else None
  if models:
    covered = {m for name in names for m in REFERENCES[name].models}
    unknown = [m for m in models if m not in covered]
    if unknown:
      parser.error(f'--models {",".join(unknown)}: not in {", ".join(names)}')
  status, requests = 0, {}
  for name in names:
    reason = unavailable(name)
    if reason:
      print(f'{name}: cannot extract: {reason}', file=sys.stderr)
      status = 1
      continue
    wanted = models and [m for m in models if m in REFERENCES[name].models]
    if not models or wanted:
      requests[name] = wanted or None
  for name, table in extract_tables(requests).items():
    path = args.out / f'{name}.json'
    if not args.check:
      args.out.mkdir(parents=True, exist_ok=True)
      path.write_text(dumps(table))
      print(f'{name}: wrote {path} ({", ".join(table["models"])})')
      continue
    if not path.exists():
      print(f'{name}: {path} does not exist')
      status = 1
      continue
    problems = differences(table, json.loads(path.read_text()))
    if problems:
      status = 1
      print(f'{name}: {len(problems)} difference(s) from {path}:')
      for problem in problems:
        print(f'  - {problem}')
    else:
      print(f'{name}: {path} agrees ({", ".join(table["models"])} '
            're-extracted)')
  return status


if __name__ == '__main__':
  sys.exit(main())

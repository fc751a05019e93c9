"""python -m flax_resnet.convert MODEL SOURCE OUT_DIR [k=v ...]

Reads weights of any supported format (see load_weights) and writes an orbax
StandardCheckpointer checkpoint of the Flax variables.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Optional, Sequence

import numpy as np


def _output_problem(out_dir: pathlib.Path, force: bool) -> Optional[str]:
  """Why out_dir cannot be written, checked before anything is loaded."""
  if out_dir.exists() and not force:
    return f'{out_dir} already exists; pass --force to overwrite it.'
  if out_dir.exists() and not out_dir.is_dir():
    return f'{out_dir} is a file; the checkpoint is a directory.'
  for parent in out_dir.parents:
    if parent.exists():
      if not parent.is_dir():
        return (f'{out_dir} cannot be created: {parent} is a file, not a '
                'directory. Choose an output folder elsewhere.')
      break
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  from flax_resnet.spec import parse_override  # pylint: disable=g-import-not-at-top
  from flax_resnet.convert import huggingface, keymap, weights
  parser = argparse.ArgumentParser(
      prog='python -m flax_resnet.convert',
      description='Convert ResNet weights (torchvision/timm .pth or '
      '.safetensors, Hugging Face, MXNet Gluon .params, Keras .weights.h5 / '
      '.h5) into an orbax checkpoint of Flax variables. The format is told '
      'from the file\'s content.')
  parser.add_argument('model', help='preset name, e.g. resnet50, '
                      'gluon_resnet50_v1, keras_resnet50_v2')
  parser.add_argument('source', help='weights file')
  parser.add_argument('out_dir', help='checkpoint directory to create')
  parser.add_argument('overrides', nargs='*', type=parse_override,
                      help='spec overrides such as num_classes=10')
  parser.add_argument('--skip-head', action='store_true',
                      help='do not load the classifier; keep a fresh one')
  parser.add_argument('--hf', action='store_true',
                      help='the file uses Hugging Face transformers names '
                      '(also recognised without this flag)')
  parser.add_argument('--force', action='store_true',
                      help='overwrite out_dir if it exists')
  args = parser.parse_args(argv)
  out_dir = pathlib.Path(args.out_dir).absolute()
  problem = _output_problem(out_dir, args.force)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    return 2
  try:
    overrides = dict(args.overrides)
    source = args.source
    if args.hf:
      source = huggingface.hf_to_torchvision_keys(source)
    variables = weights.load_weights(source, args.model,
                                     skip_head=args.skip_head, **overrides)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir, variables, force=args.force)
    checkpointer.wait_until_finished()
  count = sum(int(np.prod(e.shape)) for e in keymap.key_map(
      args.model, **overrides) if e.collection == 'params')
  print(f'wrote {out_dir} ({count:,} parameters). Restore with '
        'orbax.checkpoint.StandardCheckpointer().restore(path).')
  return 0

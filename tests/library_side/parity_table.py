"""Prints, per exact preset and file format: our parameter count against the
library's own, and the max relative logits error (at 224 and 97).

    FLAX_RESNET_MXNET_PYTHON=... python tests/library_side/parity_table.py \
        [preset ...]

Runs each library in its own interpreter, like tests/test_convert_parity.py.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

from flax_resnet import convert, layout, zoo

HERE = pathlib.Path(__file__).parent
SIZES = (224, 97)
KERAS = {50: 'ResNet50', 101: 'ResNet101', 152: 'ResNet152'}


def library_run(preset, out):
  if preset.startswith('gluon_'):
    python = os.environ['FLAX_RESNET_MXNET_PYTHON']
    command = [python, str(HERE / 'gluon_net.py'), preset[len('gluon_'):]]
    files, npz, nchw = ('structural.params', 'prefixed.params'), 'gluon', True
  elif preset.startswith('keras_'):
    depth = int(preset.split('resnet')[1].split('_')[0])
    name = KERAS[depth] + ('V2' if preset.endswith('_v2') else '')
    command = [sys.executable, str(HERE / 'keras_net.py'), name]
    files, npz, nchw = ('model.weights.h5', 'legacy.h5'), 'keras', False
  else:
    command = [sys.executable, str(HERE / 'timm_net.py'), preset]
    files, npz, nchw = ('timm.pth', 'timm.safetensors'), 'timm', True
  subprocess.run(command + [str(out)] + [str(s) for s in SIZES], check=True,
                 capture_output=True, env={**os.environ,
                                           'KERAS_BACKEND': 'jax'})
  return files, np.load(out / f'{npz}.npz'), nchw


def main(presets):
  print('| preset | file | params ours / library (trainable) | all variables '
        'ours / library | max rel. logits error (224, 97) |')
  print('|---|---|---|---|---|')
  for preset in presets:
    model = zoo.create_model(preset)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    derived = layout.layout_of(preset)
    with tempfile.TemporaryDirectory() as tmp:
      files, results, nchw = library_run(preset, pathlib.Path(tmp))
      for file in files:
        variables = convert.load_weights(pathlib.Path(tmp) / file, preset)
        errors = []
        for size in SIZES:
          images = results[f'images_{size}']
          if nchw:
            images = images.transpose(0, 2, 3, 1)
          ours = np.asarray(apply(variables, images))
          theirs = results[f'logits_{size}']
          errors.append(np.abs(ours - theirs).max() / np.abs(theirs).max())
        library_all = (f'{int(results["library_params"]):,}'
                       if 'library_params' in results else '-')
        print(f'| {preset} | {file} | {derived.total_params:,} / '
              f'{int(results["library_trainable"]):,} | '
              f'{derived.total_variables:,} / {library_all} | '
              f'{max(errors):.1e} |', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:] or [
      *[f'gluon_resnet{d}_v{v}' for v in (1, 2) for d in (18, 34, 50, 101,
                                                         152)],
      *[f'keras_resnet{d}{s}' for s in ('', '_v2') for d in (50, 101, 152)],
      'resnet50d'])

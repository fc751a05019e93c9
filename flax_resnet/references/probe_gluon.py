"""MXNet Gluon model-zoo ResNets, probed in MXNet's own virtualenv.

MXNet 1.9.1 needs numpy<1.24, so it cannot share this interpreter:
`$FLAX_RESNET_MXNET_PYTHON` names the python of a virtualenv that has it
(.ci/run creates one), and `_gluon_probe.py` runs there.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional, Sequence

from flax_resnet.references.events import run_child

GLUON_PROBE = pathlib.Path(__file__).with_name('_gluon_probe.py')
ENV_VAR = 'FLAX_RESNET_MXNET_PYTHON'
HOW_TO_INSTALL = (
    'create a virtualenv with MXNet and point FLAX_RESNET_MXNET_PYTHON at its '
    "python: python3.11 -m venv /tmp/mxnet-venv && /tmp/mxnet-venv/bin/pip "
    "install mxnet==1.9.1 'numpy<1.24' && export FLAX_RESNET_MXNET_PYTHON="
    '/tmp/mxnet-venv/bin/python (.ci/run does this)')


def mxnet_python() -> Optional[pathlib.Path]:
  """The interpreter of MXNet's virtualenv, or None if none is configured."""
  explicit = os.environ.get(ENV_VAR)
  return pathlib.Path(explicit) if explicit else None


def unavailable() -> Optional[str]:
  """Why MXNet cannot be run here, or None if it can."""
  python = mxnet_python()
  if python is None:
    return f'{ENV_VAR} is not set; {HOW_TO_INSTALL}'
  if not python.exists():
    return f'{ENV_VAR}={python} does not exist; {HOW_TO_INSTALL}'
  return None


def probe(models: Sequence[str], input_size: int):
  reason = unavailable()
  if reason:
    raise RuntimeError(f'MXNet is not available: {reason}')
  payload = run_child([str(mxnet_python()), str(GLUON_PROBE),
                       f'--size={input_size}', *models], dict(os.environ),
                      'gluon')
  source = (f'{payload["library"]} gluon.model_zoo.vision.<name>('
            'pretrained=False), initialised randomly, run once on a '
            f'1x3x{input_size}x{input_size} zero image with hooks on every '
            'block and layer (flax_resnet/references/_gluon_probe.py, in '
            'MXNet\'s own virtualenv)')
  return source, payload['models']

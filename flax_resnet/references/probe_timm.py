"""timm's models/resnet.py, probed in a child process (see extract.py)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from typing import Optional, Sequence

from flax_resnet.references.torch_hooks import torch_probe

# timm imports torchvision at import time (timm.layers needs
# torchvision.ops.misc.FrozenBatchNorm2d; timm.data imports datasets and
# transforms). torchvision cannot be imported beside the CPU torch here.
# Nothing of that touches the ResNet architecture, so when torchvision fails
# to import, the child process that probes timm:
#   * serves `torchvision.ops.misc` with a FrozenBatchNorm2d stand-in that
#     raises if anything ever instantiates it (only timm's freeze_batch_norm
#     utilities would), and
#   * registers the packages `timm`, `timm.data` and `timm.models` as empty
#     namespaces over timm's own folders, so that their __init__ files (which
#     import every model and the torchvision-based data pipeline) are skipped
#     while timm/models/resnet.py, timm/layers and the model builder are
#     imported from the installed timm unchanged. `timm.data` gets only the
#     constants that resnet.py imports, from timm/data/constants.py.


def import_timm_resnet():
  """timm.models.resnet, with stand-ins only if torchvision is unusable."""
  try:
    import torchvision
    import timm
    from timm.models import resnet
    return resnet, 'imported normally'
  except ImportError:
    pass
  import types
  import torch
  for name in [n for n in sys.modules
               if n.split('.')[0] in ('torchvision', 'timm')]:
    del sys.modules[name]

  class FrozenBatchNorm2d(torch.nn.Module):
    """Stand-in: timm imports this name; no ResNet here builds one."""

    def __init__(self, *args, **kwargs):
      del args, kwargs
      raise RuntimeError('FrozenBatchNorm2d stand-in: torchvision is not '
                         'importable here')

  def package(name: str, path: Optional[pathlib.Path]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path else []
    sys.modules[name] = module
    return module

  package('torchvision', None)
  package('torchvision.ops', None)
  package('torchvision.ops.misc', None).FrozenBatchNorm2d = FrozenBatchNorm2d
  root = pathlib.Path(importlib.util.find_spec('timm').origin).parent
  timm = package('timm', root)
  data = package('timm.data', root / 'data')
  package('timm.models', root / 'models')
  from timm import version
  timm.__version__ = version.__version__
  from timm.data import constants
  data.__dict__.update({k: v for k, v in vars(constants).items()
                        if k.isupper()})
  from timm.models import resnet
  return resnet, ('imported with a stand-in for torchvision.ops.misc.'
                  'FrozenBatchNorm2d and without the package __init__ files '
                  'of timm, timm.data and timm.models (they import '
                  'torchvision); timm/models/resnet.py and timm/layers run '
                  'unchanged')


def probe_in_process(models: Sequence[str], input_size: int):
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import torch
  resnet, how = import_timm_resnet()
  from timm import version
  torch.manual_seed(0)
  probes = []
  for name in models:
    model = getattr(resnet, name)(pretrained=False)
    probes.append(torch_probe(model, ['layer1', 'layer2', 'layer3', 'layer4'],
                              input_size, name))
  source = (f'timm {version.__version__} timm/models/resnet.py on torch '
            f'{torch.__version__}: timm.models.resnet.<name>(pretrained=False)'
            f' (no weights, hub offline), {how}; one forward pass of a '
            f'1x3x{input_size}x{input_size} zero image with hooks')
  return source, probes


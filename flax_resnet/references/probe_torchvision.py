"""torchvision's own models/resnet.py, run in process (torchvision_source)."""

from __future__ import annotations

from typing import Sequence

from flax_resnet.references.torch_hooks import torch_probe

def probe(models: Sequence[str], input_size: int):
  import torch
  from flax_resnet.references import torchvision_source
  torch.manual_seed(0)
  probes = [torch_probe(torchvision_source.build(name),
                        ['layer1', 'layer2', 'layer3', 'layer4'], input_size,
                        name) for name in models]
  source = (f'torchvision {torchvision_source.TORCHVISION_VERSION} '
            'models/resnet.py, read from the published wheel and executed '
            f'unchanged on torch {torch.__version__}: torchvision.models.'
            f'<name>(weights=None), one forward pass of a 1x3x{input_size}x'
            f'{input_size} zero image with hooks on every block and layer')
  return source, probes

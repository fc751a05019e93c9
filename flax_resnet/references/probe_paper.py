"""He et al. 2015 CIFAR nets: a PyTorch transcription, run in process."""

from __future__ import annotations

import re
from typing import Sequence

from flax_resnet.references.torch_hooks import torch_probe

# section 4.2 / Table 6. No runnable original exists, so this is a direct
# transcription in the style of akamaster/pytorch_resnet_cifar10.

PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _paper_resnet(depth: int):
  """The CIFAR-10 ResNet of He et al. 2015 (section 4.2), option A.

  A 3x3 conv with 16 filters, then 3 stages of n = (depth - 2) / 6 basic
  blocks with 16, 32, 64 filters on 32x32, 16x16, 8x8 maps; the first conv of
  stages 2 and 3 has stride 2. Option A shortcuts: where the shape changes,
  the identity is subsampled x[:, :, ::2, ::2] and zero-padded with
  planes // 4 channels on each side (parameter-free). Global average pooling
  and a 10-way fully-connected layer end the net.
  """
  import torch
  from torch import nn
  from torch.nn import functional as F

  if (depth - 2) % 6:
    raise ValueError(f'depth={depth} is not 6n+2')

  class OptionA(nn.Module):
    """Parameter-free shortcut: subsample, then pad zero channels."""

    def __init__(self, planes: int):
      super().__init__()
      self.pad = planes // 4

    def forward(self, x):
      return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad),
                   'constant', 0.0)

  class BasicBlock(nn.Module):

    def __init__(self, in_planes: int, planes: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        self.shortcut = OptionA(planes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))

  class CifarResNet(nn.Module):

    def __init__(self, n: int, num_classes: int = 10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      in_planes = 16
      for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)),
                                               start=1):
        blocks = []
        for index in range(n):
          blocks.append(BasicBlock(in_planes, planes,
                                   stride if index == 0 else 1))
          in_planes = planes
        setattr(self, f'layer{stage}', nn.Sequential(*blocks))
      self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.layer3(self.layer2(self.layer1(out)))
      out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
      return self.linear(out)

  return CifarResNet((depth - 2) // 6)


def probe(models: Sequence[str], input_size: int):
  import torch
  torch.manual_seed(0)
  probes = []
  for name in models:
    depth = int(re.fullmatch(r'resnet(\d+)', name).group(1))
    probes.append(torch_probe(_paper_resnet(depth),
                              ['layer1', 'layer2', 'layer3'], input_size,
                              f'ResNet-{depth}', shortcut_names=('shortcut',)))
  source = ('He et al. 2015, "Deep Residual Learning for Image Recognition", '
            'section 4.2 and Table 6 (CIFAR-10, 6n+2 layers, option A). No '
            'runnable original exists: extract.py holds a PyTorch '
            'transcription of the paper\'s description (akamaster-style '
            'option A: x[:, :, ::2, ::2] plus planes//4 zero channels on each '
            f'side), run on torch {torch.__version__} with a 1x3x{input_size}'
            f'x{input_size} zero image and the same hooks as torchvision')
  return source, probes


"""The PyTorch side of benchmarks/run.py: same nets, batch and optimizer.

Imported only where PyTorch is measured, so a JAX measurement never pays for
importing torch (and the other way round).
"""

import torch
from torch import nn
import torch.nn.functional as F

from flax_resnet.references import torchvision_source


def _torch_cifar_resnet(depth: int, option: str, num_classes: int):
  """He et al. 2015 CIFAR ResNet (akamaster's layout), option A or B."""
  class LambdaLayer(nn.Module):

    def __init__(self, fn):
      super().__init__()
      self.fn = fn

    def forward(self, x):
      return self.fn(x)

  class BasicBlock(nn.Module):

    def __init__(self, in_planes, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        if option == 'A':
          extra = planes - in_planes
          self.shortcut = LambdaLayer(lambda x: F.pad(
              x[:, :, ::stride, ::stride],
              (0, 0, 0, 0, extra // 2, extra - extra // 2)))
        else:
          self.shortcut = nn.Sequential(
              nn.Conv2d(in_planes, planes, 1, stride, bias=False),
              nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))

  class CifarResNet(nn.Module):

    def __init__(self):
      super().__init__()
      n = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      blocks, in_planes = [], 16
      for stage, planes in enumerate((16, 32, 64)):
        for index in range(n):
          stride = 2 if stage and not index else 1
          blocks.append(BasicBlock(in_planes, planes, stride))
          in_planes = planes
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, num_classes)
      for m in self.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
          nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
      x = F.relu(self.bn1(self.conv1(x)))
      x = self.blocks(x)
      return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

  return CifarResNet()


class TorchContestant:
  """PyTorch train and eval steps on one fixed synthetic batch."""

  def __init__(self, case, seed: int = 0):
    """case: a run.Case."""
    torch.manual_seed(seed)
    kind, *rest = case.torch_model.split(':')
    if kind == 'torchvision':
      model = torchvision_source.build(rest[0], num_classes=case.num_classes)
    else:
      model = _torch_cifar_resnet(int(rest[0]), rest[1], case.num_classes)
    self.model = model.to(memory_format=torch.channels_last)
    # Same decay mask as optim.decay_mask('kernels'): conv/linear weights only.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    self.optimizer = torch.optim.SGD(
        [{'params': decay, 'weight_decay': 1e-4},
         {'params': no_decay, 'weight_decay': 0.0}],
        lr=0.1, momentum=0.9, nesterov=False)
    generator = torch.Generator().manual_seed(seed)
    self.images = torch.randn(
        case.batch_size, 3, case.image_size, case.image_size,
        generator=generator).contiguous(memory_format=torch.channels_last)
    self.labels = torch.randint(0, case.num_classes, (case.batch_size,),
                                generator=generator)

  def train(self, steps: int) -> None:
    self.model.train()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(self.model(self.images), self.labels)
      loss.backward()
      self.optimizer.step()

  def eval(self, steps: int) -> None:
    self.model.eval()
    with torch.inference_mode():
      for _ in range(steps):
        F.cross_entropy(self.model(self.images), self.labels).item()

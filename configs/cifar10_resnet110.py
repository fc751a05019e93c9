"""CIFAR-10 ResNet-110 (He et al. 2015): lr 0.01 for the first 400 iterations
(until training error is under 80%), then the usual 0.1 schedule."""

from configs import cifar_paper


def get_config():
  c = cifar_paper.get_config('resnet110')
  c.warmup_mode = 'constant'
  c.warmup_init_lr = 0.01
  c.warmup_steps = 400
  return c

"""CIFAR-10 ResNet-56, option A, paper recipe (He et al. 2015, Table 6)."""

from configs import cifar_paper


def get_config():
  return cifar_paper.get_config('resnet56')

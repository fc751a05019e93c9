"""CIFAR-100 ResNet-56: the CIFAR-10 paper recipe with 100 classes."""

from configs import cifar_paper


def get_config():
  c = cifar_paper.get_config('resnet56')
  c.dataset = 'cifar100'
  c.num_classes = 100
  c.mean_rgb = (129.3, 124.1, 112.4)
  c.std_rgb = (68.2, 65.4, 70.4)
  return c

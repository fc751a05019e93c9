"""ImageNet ResNet-50 (torchvision v1.5, option B), checked against torchvision."""

from configs import imagenet


def get_config():
  return imagenet.get_config('resnet50')

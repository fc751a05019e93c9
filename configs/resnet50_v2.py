"""ImageNet pre-activation ResNet-50 (He et al. 2016), checked against Gluon V2."""

from configs import imagenet


def get_config():
  return imagenet.get_config('resnet50_v2')

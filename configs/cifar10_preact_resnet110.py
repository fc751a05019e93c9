"""Pre-activation ResNet-110 on CIFAR-10 (He et al. 2016: 6.37% error)."""

from configs import cifar_paper


def get_config():
  c = cifar_paper.get_config('preact_resnet110')
  c.reference = None  # no reference implementation table for this preset
  c.warmup_mode = 'constant'
  c.warmup_init_lr = 0.01
  c.warmup_steps = 400
  return c

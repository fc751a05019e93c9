"""He et al. 2015, section 4.2: the CIFAR-10 recipe shared by resnet20..110.

SGD momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k
and 48k iterations, stop at 64k; 4-pixel pad, random 32x32 crop, flip.
"""

from configs import base


def get_config(model: str = 'resnet20'):
  c = base.get_config()
  c.model = model
  c.reference = 'paper'
  c.dataset = 'cifar10'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.num_classes = 10
  c.image_size = 32
  c.augment = 'cifar'
  c.mean_rgb = (125.3, 123.0, 113.9)
  c.std_rgb = (63.0, 62.1, 66.7)
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_train_steps = 64_000
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = False
  c.learning_rate = 0.1
  c.lr_scaling = 'none'
  c.schedule = 'piecewise'
  c.boundaries_steps = (32_000, 48_000)
  c.decay_factor = 0.1
  c.warmup_steps = 0
  c.weight_decay = 1e-4
  c.weight_decay_mask = 'all'  # the paper decays every weight
  c.checkpoint_every_steps = 2_000
  c.eval_every_steps = 2_000
  c.log_every_steps = 200
  return c

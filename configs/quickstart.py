"""Offline default: a CIFAR-style ResNet on real handwritten digits.

scikit-learn ships 1,797 real 8x8 scans of handwritten digits (UCI
optdigits). They are registered as the TFDS dataset `sklearn_digits` (fixed
1,437 / 360 stratified split), built locally on first use with no network, read
through the same tfds.data_source + grain pipeline as CIFAR and ImageNet, and
upsampled to 16x16. resnet20 (option A, layout checked against the paper)
reaches >= 95% held-out accuracy in a few minutes on 2 CPU cores.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model = 'resnet20'
  c.reference = 'paper'
  c.dataset = 'sklearn_digits'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.num_classes = 10
  c.image_size = 16
  c.augment = 'none'
  c.mean_rgb = (85.0, 85.0, 85.0)
  c.std_rgb = (110.0, 110.0, 110.0)
  c.worker_count = 0
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 15.0
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1
  c.lr_scaling = 'none'
  c.schedule = 'cosine'
  c.warmup_epochs = 1.0
  c.weight_decay = 5e-4
  c.checkpoint_every_steps = 100
  c.eval_every_steps = -1
  c.log_every_steps = 20
  c.precision = 'float32'
  return c

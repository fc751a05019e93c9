"""ImageNet recipe (Flax example / NVIDIA DLE): SGD Nesterov 0.9, lr 0.1 x B/256,
5 warmup epochs + cosine, weight decay 1e-4 on kernels only, 90 epochs."""

from configs import base


def get_config(model: str = 'resnet50'):
  c = base.get_config()
  c.model = model
  c.reference = 'default'
  c.dataset = 'imagenet2012'
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.num_classes = 1000
  c.image_size = 224
  c.augment = 'imagenet'
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_epochs = 90.0
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.1
  c.lr_scaling = 'linear'
  c.base_batch_size = 256
  c.schedule = 'cosine'
  c.warmup_epochs = 5.0
  c.weight_decay = 1e-4
  c.weight_decay_mask = 'kernels'
  c.label_smoothing = 0.0  # 0.1 is the common "bag of tricks" choice
  c.precision = 'bfloat16'
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  return c

"""Library side of the Gluon parity test; runs in MXNet's own virtualenv.

    $FLAX_RESNET_MXNET_PYTHON gluon_net.py NAME OUT_DIR SIZE [SIZE ...]

Builds mxnet.gluon.model_zoo.vision.NAME with random weights and random,
non-trivial BatchNorm statistics, saves it twice (save_parameters: structural
names; collect_params().save: prefixed names), and writes the logits MXNet
computes for random images of each SIZE. If OUT_DIR/flax.params exists (written
by flax_resnet), it is loaded instead of drawing weights, to check the
Flax -> Gluon direction. Imports only mxnet and numpy.
"""

import os
import sys

import mxnet as mx
import numpy as np
from mxnet.gluon.model_zoo import vision


def randomize(net, rng):
  for name, param in net.collect_params().items():
    shape = param.shape
    if name.endswith('_weight') and len(shape) == 4:
      fan_in = shape[1] * shape[2] * shape[3]
      value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
    elif name.endswith('_weight'):
      value = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    elif name.endswith('_gamma'):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith('_running_var'):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith('_beta') and param.grad_req == 'null':
      value = np.zeros(shape)  # the V2 data BN's beta stays 0 in Gluon
    else:  # biases, betas, running means
      value = rng.normal(0, 0.2, shape)
    param.set_data(mx.nd.array(value.astype(np.float32)))


def main(name, out, sizes):
  rng = np.random.default_rng(0)
  net = getattr(vision, name)(pretrained=False)
  net.initialize(mx.init.Xavier(), ctx=mx.cpu())
  net(mx.nd.zeros((1, 3, 64, 64)))  # infer the shapes
  given = os.path.join(out, 'flax.params')
  if os.path.exists(given):
    net.load_parameters(given, ctx=mx.cpu())
  else:
    randomize(net, rng)
    net.save_parameters(os.path.join(out, 'structural.params'))
    net.collect_params().save(os.path.join(out, 'prefixed.params'))
  results = {}
  for size in sizes:
    images = rng.normal(0, 1, (2, 3, size, size)).astype(np.float32)
    results[f'images_{size}'] = images
    results[f'logits_{size}'] = net(mx.nd.array(images)).asnumpy()
  results['library_params'] = np.array(sum(
      p.data().size for p in net.collect_params().values()))
  results['library_trainable'] = np.array(sum(
      p.data().size for p in net.collect_params().values()
      if p.grad_req != 'null'))
  np.savez(os.path.join(out, 'gluon.npz'), **results)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]])

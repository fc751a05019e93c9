"""Reads the layout of MXNet Gluon model-zoo ResNets; prints it as JSON.

Runs under its own interpreter (MXNet 1.9.1 needs numpy<1.24, so it lives in a
separate virtualenv), hence this file imports nothing but mxnet, numpy and the
standard library. `extract.py` starts it as a subprocess:

    $FLAX_RESNET_MXNET_PYTHON _gluon_probe.py [--size=224] [--out=FILE] \
        resnet50_v1 [resnet50_v2 ...]

For each model it builds `mxnet.gluon.model_zoo.vision.<name>()` with random
initialisation (pretrained=False, nothing is downloaded), runs one forward pass
with hooks on every residual block and every layer, and writes the observed
calls as JSON events ('start'/'end' of a block, 'leaf' for a layer, with
shapes, strides, biases and trainable parameter counts) that `extract.py`
turns into reference rows. A layer inside a block gets role 'shortcut' when
it sits under the block's `downsample` attribute, else 'main'.
"""

import json
import re
import sys

import mxnet as mx
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

_SKIPPED = (nn.Activation, nn.Flatten)


def _shape(value):
  if isinstance(value, (list, tuple)):
    value = value[0]
  return [int(d) for d in value.shape[1:]]  # NCHW without the batch axis


def _square(values, what):
  values = tuple(int(v) for v in values)
  if len(set(values)) != 1:
    raise ValueError(f'{what} {values} is not square')
  return values[0]


def _trainable(params):
  """Elements of the trainable parameters in `params` (BN stats excluded)."""
  return sum(int(p.data().size) for p in params.values()
             if p.grad_req != 'null')


def _describe(block):
  if isinstance(block, nn.Conv2D):
    kwargs = block._kwargs
    return {'kind': 'conv', 'kernel': _square(kwargs['kernel'], 'kernel'),
            'stride': _square(kwargs['stride'], 'stride'),
            'groups': int(kwargs['num_group']),
            'bias': block.bias is not None}
  if isinstance(block, nn.BatchNorm):
    return {'kind': 'bn'}
  if isinstance(block, (nn.MaxPool2D, nn.AvgPool2D)):
    kwargs = block._kwargs
    kind = 'maxpool' if kwargs['pool_type'] == 'max' else 'avgpool'
    if kwargs.get('global_pool'):
      return {'kind': 'global_' + kind}
    return {'kind': kind, 'kernel': _square(kwargs['kernel'], 'kernel'),
            'stride': _square(kwargs['stride'], 'stride')}
  if isinstance(block, nn.Dense):
    return {'kind': 'dense'}
  return {'kind': 'other', 'type': type(block).__name__}


def _walk(block, path=''):
  """(path, block) for every block, depth first, in registration order."""
  yield path, block
  for name, child in block._children.items():
    yield from _walk(child, f'{path}.{name}' if path else name)


def probe(name, input_size):
  """Builds `name` with random weights, runs it once; returns its events."""
  net = getattr(vision, name)(pretrained=False)
  net.initialize(mx.init.Xavier(), ctx=mx.cpu())
  # A stage is a HybridSequential of residual blocks, prefixed 'stageN_'.
  stages = [(f'features.{key}', child)
            for key, child in net.features._children.items()
            if isinstance(child, nn.HybridSequential) and
            re.search(r'stage\d+_$', child.prefix)]
  block_ids = {}
  for stage_number, (stage_path, stage) in enumerate(stages, start=1):
    for index, key in enumerate(stage._children):
      block_ids[f'{stage_path}.{key}'] = (stage_number, index)

  events = []
  open_block = []
  for path, block in _walk(net):
    if path in block_ids:
      def pre_hook(block, inputs, path=path):
        stage_number, index = block_ids[path]
        open_block[:] = [path]
        events.append({'event': 'start', 'path': path, 'stage': stage_number,
                       'index': index, 'type': type(block).__name__,
                       'in_shape': _shape(inputs)})

      def post_hook(block, inputs, output, path=path):
        open_block[:] = []
        events.append({'event': 'end', 'path': path,
                       'out_shape': _shape(output)})
      block.register_forward_pre_hook(pre_hook)
      block.register_forward_hook(post_hook)
    elif path and not block._children and not isinstance(block, _SKIPPED):
      def leaf_hook(block, inputs, output, path=path):
        event = {'event': 'leaf', 'path': path, **_describe(block),
                 'in_shape': _shape(inputs), 'out_shape': _shape(output)}
        if open_block:
          relative = path[len(open_block[0]) + 1:]
          event['role'] = ('shortcut' if relative.split('.')[0] ==
                           'downsample' else 'main')
        events.append(event)
      block.register_forward_hook(leaf_hook)

  net(mx.nd.zeros((1, 3, input_size, input_size)))

  # Parameter counts need the shapes that the forward pass inferred.
  blocks = dict(_walk(net))
  for event in events:
    if event['event'] == 'start':
      event['params'] = _trainable(blocks[event['path']].collect_params())
    elif event['event'] == 'leaf':
      event['params'] = _trainable(blocks[event['path']]._reg_params)
  return {
      'reference_model': name,
      'input_size': input_size,
      'events': events,
      'total_params': _trainable(net.collect_params()),
      # Everything save_parameters writes: BN running statistics too.
      'library_total_params': sum(int(p.data().size) for p in
                                  net.collect_params().values()),
  }


def main(argv):
  input_size, out, names = 224, None, []
  for arg in argv:
    if arg.startswith('--size='):
      input_size = int(arg.split('=', 1)[1])
    elif arg.startswith('--out='):
      out = arg.split('=', 1)[1]
    else:
      names.append(arg)
  result = {'library': f'mxnet {mx.__version__}',
            'models': [probe(name, input_size) for name in names]}
  if out:
    with open(out, 'w') as f:
      json.dump(result, f)
  else:
    json.dump(result, sys.stdout)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))

"""Extracts reference layout tables from the reference implementations.

    python -m flax_resnet.references.extract torchvision [--out DIR] [--check]
    python -m flax_resnet.references.extract all --check
    python -m flax_resnet.references.extract keras --models resnet50_v1

Each reference library builds its OWN model with random weights (never a
download), runs one forward pass with hooks on every residual block and every
layer, and the calls it observed become the rows of `<name>.json`: strides,
shortcuts, shapes and parameter counts all come from the running library, none
is typed here. `--check` re-extracts and compares with the stored table
instead of writing it (exit status 1 on any difference).

Every library reports the same intermediate form, a list of events in call
order: 'start'/'end' of a residual block (with its shapes and trainable
parameter count) and 'leaf' for a layer (kind, kernel, stride, bias, shapes,
and inside a block whether it sits on the main path or the shortcut).
`entry_from_events` turns that into a reference entry, one rule for all.

Where the libraries run:
  torchvision  in process, torchvision's real models/resnet.py from the wheel
               (see torchvision_source.py).
  paper        in process, a small PyTorch transcription of He et al. 2015
               section 4.2 (there is no runnable original); see _paper_resnet.
  timm         in a child process (`--probe timm`), because timm needs a
               stand-in for torchvision here (see _import_timm_resnet).
  keras(_v2)   in a child process with KERAS_BACKEND=jax, so that a Keras
               already imported with another backend cannot interfere.
  gluon_v1/v2  in MXNet's own virtualenv ($FLAX_RESNET_MXNET_PYTHON, default
               /work/mxvenv/bin/python) running _gluon_probe.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

from flax_resnet import references

DIRECTORY = references.DIRECTORY
GLUON_PROBE = pathlib.Path(__file__).with_name('_gluon_probe.py')
DEFAULT_MXNET_PYTHON = pathlib.Path('/work/mxvenv/bin/python')

# Parameter-free layers that neither move data nor change shapes: not rows.
# (An empty Sequential is how the paper's code spells an identity shortcut.)
_TORCH_SKIPPED = ('ReLU', 'ReLU6', 'SiLU', 'GELU', 'Identity', 'Dropout',
                  'Flatten', 'Sequential')

Probe = dict[str, Any]  # {'reference_model', 'input_size', 'events', ...}


# ------------------------------------------------------- events -> table rows


def _op_text(op: dict[str, Any]) -> str:
  if op['kind'] == 'conv':
    groups = f' g{op["groups"]}' if op.get('groups', 1) > 1 else ''
    bias = ' +bias' if op['bias'] else ''
    return f'conv{op["kernel"]}x{op["kernel"]}/{op["stride"]}{groups}{bias}'
  if op['kind'] == 'bn':
    return 'BN' if op['params'] else 'BN (no scale, no shift)'
  if op['kind'] in ('maxpool', 'avgpool'):
    return f'{op["kind"]}{op["kernel"]}x{op["kernel"]}/{op["stride"]}'
  return op.get('type', op['kind'])


def _block_row(start: dict[str, Any], ops: list[dict[str, Any]],
               end: dict[str, Any]) -> dict[str, Any]:
  """One reference row from the layers a block was observed to call."""
  in_channels, *in_size = start['in_shape']
  out_channels, *out_size = end['out_shape']
  main = [op for op in ops if op['role'] == 'main']
  skip = [op for op in ops if op['role'] == 'shortcut']
  strided = [op for op in main if op['kind'] == 'conv' and op['stride'] != 1]
  convs = [op for op in skip if op['kind'] == 'conv']
  pools = [op for op in skip if op['kind'] == 'avgpool' and op['stride'] > 1]
  if not skip:
    shortcut, shortcut_stride = 'identity', 1
  elif convs:
    shortcut = 'avgpool+projection' if pools else 'projection'
    shortcut_stride = pools[0]['stride'] if pools else convs[0]['stride']
  else:
    # Parameter-free: zero channels are appended if the width grows (paper
    # option A), otherwise the skip path only subsamples (Keras V2 max-pool).
    shortcut = 'zero-pad' if out_channels > in_channels else 'subsample'
    shortcut_stride = skip[0]['in_shape'][1] // skip[-1]['out_shape'][1]
  conv_bias = any(op['kind'] == 'conv' and op['bias'] for op in ops)
  return {
      'stage': start['stage'], 'index': start['index'],
      'in_channels': in_channels, 'out_channels': out_channels,
      'in_size': in_size, 'out_size': out_size,
      'stride_at': (f'{strided[0]["kernel"]}x{strided[0]["kernel"]}'
                    if strided else 'none'),
      'shortcut': shortcut,
      'shortcut_stride': shortcut_stride,
      'shortcut_norm': any(op['kind'] == 'bn' for op in skip),
      # Conv biases are parameters no conv here has: the counts differ by
      # convention, not structure, so they are left uncompared.
      'params': None if conv_bias else start['params'],
      'library_block': start['path'],
      'library_stride_layer': strided[0]['path'] if strided else None,
  }


def entry_from_events(probe: Probe,
                      stem_difference: Optional[str] = None) -> dict[str, Any]:
  """A reference entry (the schema `layout.compare` reads) from a probe.

  Args:
    probe: the events one library reported for one model.
    stem_difference: set when the reference's stem holds layers that ours
      does not (Gluon V2); its parameter count is then not compared.
  """
  events = probe['events']
  first = next(i for i, e in enumerate(events) if e['event'] == 'start')
  stem_ops = [e for e in events[:first] if e['event'] == 'leaf']
  stem_params = sum({e['path']: e['params'] for e in stem_ops}.values())
  stem_bias = any(e['kind'] == 'conv' and e['bias'] for e in stem_ops)
  stem_out = events[first]['in_shape']
  blocks, start, ops = [], None, []
  for event in events:
    if event['event'] == 'start':
      if start is not None:
        raise ValueError(f'block {event["path"]} starts inside {start["path"]}')
      start, ops = event, []
    elif event['event'] == 'end':
      blocks.append(_block_row(start, ops, event))
      start = None
    elif start is not None:
      ops.append(event)
  stem_comparable = not stem_bias and stem_difference is None
  comparable = stem_comparable and all(b['params'] is not None for b in blocks)
  entry = {
      'reference_model': probe['reference_model'],
      'input_size': probe['input_size'],
      'stem': {'out_channels': stem_out[0], 'out_size': stem_out[1:],
               'params': stem_params if stem_comparable else None,
               'layers': [_op_text(e) for e in stem_ops]},
      'blocks': blocks,
      'total_params': probe['total_params'] if comparable else None,
  }
  if not comparable:
    entry['library_trainable_params'] = probe['total_params']
  if 'library_total_params' in probe:
    entry['library_total_params'] = probe['library_total_params']
  return entry


# ------------------------------------------------------------ PyTorch probes


def _torch_shape(value) -> list[int]:
  if isinstance(value, (tuple, list)):
    value = value[0]
  return [int(d) for d in value.shape[1:]]  # NCHW without the batch axis


def _square(value, what: str) -> int:
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(set(values)) != 1:
    raise ValueError(f'{what} {values} is not square')
  return int(values[0])


def _torch_describe(module) -> dict[str, Any]:
  import torch
  nn = torch.nn
  if isinstance(module, nn.Conv2d):
    return {'kind': 'conv', 'kernel': _square(module.kernel_size, 'kernel'),
            'stride': _square(module.stride, 'stride'),
            'groups': int(module.groups), 'bias': module.bias is not None}
  if isinstance(module, nn.BatchNorm2d):
    return {'kind': 'bn'}
  if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
    stride = module.stride if module.stride is not None else module.kernel_size
    return {'kind': 'maxpool' if isinstance(module, nn.MaxPool2d)
                    else 'avgpool',
            'kernel': _square(module.kernel_size, 'kernel'),
            'stride': _square(stride, 'stride')}
  if isinstance(module, nn.Linear):
    return {'kind': 'dense'}
  return {'kind': 'other', 'type': type(module).__name__}


def torch_probe(model, stage_paths: Sequence[str], input_size: int,
                reference_model: str,
                shortcut_names: Sequence[str] = ('downsample',)) -> Probe:
  """Runs a PyTorch ResNet once with hooks; returns its events.

  Args:
    model: the library's own torch.nn.Module.
    stage_paths: module paths of the stage containers ('layer1', ...), whose
      children are the residual blocks.
    input_size: height and width of the zero image fed through.
    reference_model: the library's name for the model.
    shortcut_names: attribute names under which a block keeps its skip path.
  """
  import torch
  modules = dict(model.named_modules())
  block_ids = {}
  for stage_number, stage_path in enumerate(stage_paths, start=1):
    for index, (key, _) in enumerate(modules[stage_path].named_children()):
      block_ids[f'{stage_path}.{key}'] = (stage_number, index)

  events, open_block, handles = [], [], []

  def trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)

  for path, module in modules.items():
    if path in block_ids:
      def pre_hook(module, args, path=path):
        stage_number, index = block_ids[path]
        open_block[:] = [path]
        events.append({'event': 'start', 'path': path, 'stage': stage_number,
                       'index': index, 'type': type(module).__name__,
                       'in_shape': _torch_shape(args),
                       'params': trainable(module.parameters())})

      def post_hook(module, args, output, path=path):
        del module, args
        open_block[:] = []
        events.append({'event': 'end', 'path': path,
                       'out_shape': _torch_shape(output)})
      handles.append(module.register_forward_pre_hook(pre_hook))
      handles.append(module.register_forward_hook(post_hook))
    elif (path and not list(module.children()) and
          type(module).__name__ not in _TORCH_SKIPPED):
      def leaf_hook(module, args, output, path=path):
        event = {'event': 'leaf', 'path': path, **_torch_describe(module),
                 'in_shape': _torch_shape(args),
                 'out_shape': _torch_shape(output),
                 'params': trainable(module.parameters(recurse=False))}
        if open_block:
          relative = path[len(open_block[0]) + 1:]
          event['role'] = ('shortcut' if relative.split('.')[0] in
                           shortcut_names else 'main')
        events.append(event)
      handles.append(module.register_forward_hook(leaf_hook))
  model.eval()
  try:
    with torch.no_grad():
      model(torch.zeros(1, 3, input_size, input_size))
  finally:
    for handle in handles:
      handle.remove()
  return {'reference_model': reference_model, 'input_size': input_size,
          'events': events, 'total_params': trainable(model.parameters())}


def _probe_torchvision(models: Sequence[str], input_size: int):
  import torch
  from flax_resnet.references import torchvision_source
  torch.manual_seed(0)
  probes = [torch_probe(torchvision_source.build(name),
                        ['layer1', 'layer2', 'layer3', 'layer4'], input_size,
                        name) for name in models]
  source = (f'torchvision {torchvision_source.TORCHVISION_VERSION} '
            'models/resnet.py, read from the published wheel and executed '
            f'unchanged on torch {torch.__version__}: torchvision.models.'
            f'<name>(weights=None), one forward pass of a 1x3x{input_size}x'
            f'{input_size} zero image with hooks on every block and layer')
  return source, probes


# The paper: He et al. 2015, "Deep Residual Learning for Image Recognition",
# section 4.2 / Table 6. No runnable original exists, so this is a direct
# transcription in the style of akamaster/pytorch_resnet_cifar10.

_PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _paper_resnet(depth: int):
  """The CIFAR-10 ResNet of He et al. 2015 (section 4.2), option A.

  A 3x3 conv with 16 filters, then 3 stages of n = (depth - 2) / 6 basic
  blocks with 16, 32, 64 filters on 32x32, 16x16, 8x8 maps; the first conv of
  stages 2 and 3 has stride 2. Option A shortcuts: where the shape changes,
  the identity is subsampled x[:, :, ::2, ::2] and zero-padded with
  planes // 4 channels on each side (parameter-free). Global average pooling
  and a 10-way fully-connected layer end the net.
  """
  import torch
  from torch import nn
  from torch.nn import functional as F

  if (depth - 2) % 6:
    raise ValueError(f'depth={depth} is not 6n+2')

  class OptionA(nn.Module):
    """Parameter-free shortcut: subsample, then pad zero channels."""

    def __init__(self, planes: int):
      super().__init__()
      self.pad = planes // 4

    def forward(self, x):
      return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad),
                   'constant', 0.0)

  class BasicBlock(nn.Module):

    def __init__(self, in_planes: int, planes: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        self.shortcut = OptionA(planes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return F.relu(out + self.shortcut(x))

  class CifarResNet(nn.Module):

    def __init__(self, n: int, num_classes: int = 10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      in_planes = 16
      for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)),
                                               start=1):
        blocks = []
        for index in range(n):
          blocks.append(BasicBlock(in_planes, planes,
                                   stride if index == 0 else 1))
          in_planes = planes
        setattr(self, f'layer{stage}', nn.Sequential(*blocks))
      self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.layer3(self.layer2(self.layer1(out)))
      out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
      return self.linear(out)

  return CifarResNet((depth - 2) // 6)


def _probe_paper(models: Sequence[str], input_size: int):
  import torch
  torch.manual_seed(0)
  probes = []
  for name in models:
    depth = int(re.fullmatch(r'resnet(\d+)', name).group(1))
    probes.append(torch_probe(_paper_resnet(depth),
                              ['layer1', 'layer2', 'layer3'], input_size,
                              f'ResNet-{depth}', shortcut_names=('shortcut',)))
  source = ('He et al. 2015, "Deep Residual Learning for Image Recognition", '
            'section 4.2 and Table 6 (CIFAR-10, 6n+2 layers, option A). No '
            'runnable original exists: extract.py holds a PyTorch '
            'transcription of the paper\'s description (akamaster-style '
            'option A: x[:, :, ::2, ::2] plus planes//4 zero channels on each '
            f'side), run on torch {torch.__version__} with a 1x3x{input_size}'
            f'x{input_size} zero image and the same hooks as torchvision')
  return source, probes


# timm imports torchvision at import time (timm.layers needs
# torchvision.ops.misc.FrozenBatchNorm2d; timm.data imports datasets and
# transforms). torchvision cannot be imported beside the CPU torch here.
# Nothing of that touches the ResNet architecture, so when torchvision fails
# to import, the child process that probes timm:
#   * serves `torchvision.ops.misc` with a FrozenBatchNorm2d stand-in that
#     raises if anything ever instantiates it (only timm's freeze_batch_norm
#     utilities would), and
#   * registers the packages `timm`, `timm.data` and `timm.models` as empty
#     namespaces over timm's own folders, so that their __init__ files (which
#     import every model and the torchvision-based data pipeline) are skipped
#     while timm/models/resnet.py, timm/layers and the model builder are
#     imported from the installed timm unchanged. `timm.data` gets only the
#     constants that resnet.py imports, from timm/data/constants.py.


def _import_timm_resnet():
  """timm.models.resnet, with stand-ins only if torchvision is unusable."""
  try:
    import torchvision
    import timm
    from timm.models import resnet
    return resnet, 'imported normally'
  except ImportError:
    pass
  import types
  import torch
  for name in [n for n in sys.modules
               if n.split('.')[0] in ('torchvision', 'timm')]:
    del sys.modules[name]

  class FrozenBatchNorm2d(torch.nn.Module):
    """Stand-in: timm imports this name; no ResNet here builds one."""

    def __init__(self, *args, **kwargs):
      del args, kwargs
      raise RuntimeError('FrozenBatchNorm2d stand-in: torchvision is not '
                         'importable here')

  def package(name: str, path: Optional[pathlib.Path]) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path else []
    sys.modules[name] = module
    return module

  package('torchvision', None)
  package('torchvision.ops', None)
  package('torchvision.ops.misc', None).FrozenBatchNorm2d = FrozenBatchNorm2d
  root = pathlib.Path(importlib.util.find_spec('timm').origin).parent
  timm = package('timm', root)
  data = package('timm.data', root / 'data')
  package('timm.models', root / 'models')
  from timm import version
  timm.__version__ = version.__version__
  from timm.data import constants
  data.__dict__.update({k: v for k, v in vars(constants).items()
                        if k.isupper()})
  from timm.models import resnet
  return resnet, ('imported with a stand-in for torchvision.ops.misc.'
                  'FrozenBatchNorm2d and without the package __init__ files '
                  'of timm, timm.data and timm.models (they import '
                  'torchvision); timm/models/resnet.py and timm/layers run '
                  'unchanged')


def _timm_probe_in_process(models: Sequence[str], input_size: int):
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import torch
  resnet, how = _import_timm_resnet()
  from timm import version
  torch.manual_seed(0)
  probes = []
  for name in models:
    model = getattr(resnet, name)(pretrained=False)
    probes.append(torch_probe(model, ['layer1', 'layer2', 'layer3', 'layer4'],
                              input_size, name))
  source = (f'timm {version.__version__} timm/models/resnet.py on torch '
            f'{torch.__version__}: timm.models.resnet.<name>(pretrained=False)'
            f' (no weights, hub offline), {how}; one forward pass of a '
            f'1x3x{input_size}x{input_size} zero image with hooks')
  return source, probes


# -------------------------------------------------------------- Keras probes


def _keras_probe_in_process(models: Sequence[str], input_size: int):
  """keras.applications.<name>(weights=None) walked as a functional graph.

  Blocks are the layers named conv{S}_block{B}_*; the block's Add layer
  joins the shortcut and the main path, and each input of the Add is traced
  back through the graph to the block's input. The branch holding the
  block's `_1_conv` is the main path; what only the other branch holds is
  the shortcut (Keras V2 feeds both from the pre-activation, which counts as
  main path, as bn1 does here). Shapes come from one forward pass of the
  whole model traced with jax.eval_shape.
  """
  import jax
  import keras
  import numpy as np
  if keras.backend.backend() != 'jax':
    raise RuntimeError(f'Keras runs on {keras.backend.backend()}, not jax; '
                       'set KERAS_BACKEND=jax before importing keras.')
  block_name = re.compile(r'^conv(\d+)_block(\d+)_')

  def describe(layer) -> Optional[dict[str, Any]]:
    if isinstance(layer, keras.layers.Conv2D):
      return {'kind': 'conv', 'kernel': _square(layer.kernel_size, 'kernel'),
              'stride': _square(layer.strides, 'stride'),
              'groups': int(layer.groups), 'bias': bool(layer.use_bias)}
    if isinstance(layer, keras.layers.BatchNormalization):
      return {'kind': 'bn'}
    if isinstance(layer, (keras.layers.MaxPooling2D,
                          keras.layers.AveragePooling2D)):
      return {'kind': 'maxpool' if isinstance(layer, keras.layers.MaxPooling2D)
                      else 'avgpool',
              'kernel': _square(layer.pool_size, 'kernel'),
              'stride': _square(layer.strides, 'stride')}
    if isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.Activation,
                          keras.layers.Add, keras.layers.InputLayer)):
      return None  # padding belongs to the next conv/pool; no data moves
    return {'kind': 'other', 'type': type(layer).__name__}

  def trainable(layers) -> int:
    return int(sum(np.prod(w.shape) for layer in layers
                   for w in layer.trainable_weights))

  probes = []
  for name in models:
    # Keras' own model, with its initialisers attached but not run: only the
    # variables' shapes matter, and materialising 25M random numbers costs
    # tens of seconds of XLA compiles on CPU.
    with keras.StatelessScope(initialize_variables=False):
      model = getattr(keras.applications, name)(
          weights=None, input_shape=(input_size, input_size, 3))
      layers = model.layers[1:]
      probe_model = keras.Model(model.inputs, [l.output for l in layers])
    # The forward pass: Keras' stateless_call of every layer, traced with
    # jax.eval_shape (shapes without arithmetic, as layout.py traces ours).
    def spec(variable):
      return jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype)

    values = jax.eval_shape(
        lambda trainable, frozen, x: probe_model.stateless_call(
            trainable, frozen, x, training=False)[0],
        [spec(v) for v in probe_model.trainable_variables],
        [spec(v) for v in probe_model.non_trainable_variables],
        jax.ShapeDtypeStruct((1, input_size, input_size, 3), 'float32'))
    # NHWC -> [C, H, W] like the other libraries.
    shape_of = {l.name: [int(v.shape[3]), int(v.shape[1]), int(v.shape[2])]
                if len(v.shape) == 4 else [int(d) for d in v.shape[1:]]
                for l, v in zip(layers, values)}
    shape_of[model.layers[0].name] = [3, input_size, input_size]

    def producer(tensor):
      return tensor._keras_history.operation

    def ancestry(tensor, stop) -> list[Any]:
      """Layers between tensor `stop` (excluded) and `tensor` (included)."""
      seen, stack = {}, [tensor]
      while stack:
        t = stack.pop()
        if t is stop:
          continue
        layer = producer(t)
        if layer.name in seen or isinstance(layer, keras.layers.InputLayer):
          continue
        seen[layer.name] = layer
        stack.extend(layer._inbound_nodes[0].input_tensors)
      return [l for l in model.layers if l.name in seen]

    def leaf(layer, role=None):
      op = describe(layer)
      if op is None:
        return None
      inputs = layer._inbound_nodes[0].input_tensors
      event = {'event': 'leaf', 'path': layer.name, **op,
               'in_shape': shape_of[producer(inputs[0]).name],
               'out_shape': shape_of[layer.name],
               'params': trainable([layer])}
      if role:
        event['role'] = role
      return event

    prefixes = list(dict.fromkeys(block_name.match(l.name).group(0)[:-1]
                                  for l in layers if block_name.match(l.name)))
    events = []
    for number, prefix in enumerate(prefixes):
      members = [l for l in layers if l.name.startswith(prefix + '_')]
      block_in = members[0].input
      if number == 0:
        events.extend(filter(None, (leaf(l) for l in ancestry(block_in,
                                                              None))))
      add = next(l for l in members if isinstance(l, keras.layers.Add))
      branches = [ancestry(t, block_in)
                  for t in add._inbound_nodes[0].input_tensors]
      main = next(b for b in branches
                  if any(l.name == f'{prefix}_1_conv' for l in b))
      main_names = {l.name for l in main}
      skip = [l for b in branches if b is not main for l in b
              if l.name not in main_names]
      output = model.get_layer(f'{prefix}_out')
      owned = main + skip + [add] + ([output] if output is not add else [])
      stray = {l.name for l in members} - {l.name for l in owned}
      if stray:
        raise ValueError(f'{prefix}: layers {sorted(stray)} are on neither '
                         'path of the block')
      stage, index = (int(g) for g in block_name.match(members[0].name)
                      .groups())
      events.append({'event': 'start', 'path': prefix, 'stage': stage - 1,
                     'index': index - 1, 'type': 'keras block',
                     'in_shape': shape_of[producer(block_in).name],
                     'params': trainable(owned)})
      roles = {l.name: 'main' for l in main}
      roles.update({l.name: 'shortcut' for l in skip})
      events.extend(filter(None, (leaf(l, roles[l.name])
                                  for l in model.layers if l.name in roles)))
      events.append({'event': 'end', 'path': prefix,
                     'out_shape': shape_of[output.name]})
    probes.append({'reference_model': name, 'input_size': input_size,
                   'events': events,
                   'total_params': trainable(model.layers),
                   'library_total_params': int(model.count_params())})
  source = (f'keras {keras.__version__} (backend jax, jax {jax.__version__}) '
            'keras.applications.<name>(weights=None), built in keras.'
            'StatelessScope(initialize_variables=False) so the random '
            'initialisers are attached but not run; layers read from the '
            'functional graph, shapes from one forward pass (stateless_call '
            f'returning every layer\'s output) of a 1x{input_size}x{input_size}'
            'x3 input traced with jax.eval_shape')
  return source, probes


# ----------------------------------------------------- out-of-process probes


def _run_child(command: list[str], env: dict[str, str], what: str):
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / 'probe.json'
    result = subprocess.run(command + [f'--out={out}'], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode or not out.exists():
      raise RuntimeError(f'{what} probe failed (`{" ".join(command)}`):\n'
                         f'{result.stderr[-3000:]}')
    return json.loads(out.read_text())


def _probe_in_child(library: str, models: Sequence[str], input_size: int,
                    **env):
  """Runs _PROBES_IN_CHILD[library] in a fresh interpreter."""
  payload = _run_child(
      [sys.executable, '-m', 'flax_resnet.references.extract', '--probe',
       library, f'--size={input_size}', *models],
      {**os.environ, **env}, library)
  return payload['source'], payload['probes']


def mxnet_python() -> Optional[pathlib.Path]:
  """The interpreter of MXNet's virtualenv, or None if there is none."""
  explicit = os.environ.get('FLAX_RESNET_MXNET_PYTHON')
  if explicit:
    return pathlib.Path(explicit)
  return DEFAULT_MXNET_PYTHON if DEFAULT_MXNET_PYTHON.exists() else None


def _probe_gluon(models: Sequence[str], input_size: int):
  python = mxnet_python()
  if python is None:
    raise RuntimeError(
        'MXNet is not installed; create its virtualenv with `python3 -m venv '
        "/work/mxvenv && /work/mxvenv/bin/pip install mxnet==1.9.1 'numpy<"
        "1.24'` or point FLAX_RESNET_MXNET_PYTHON at one.")
  payload = _run_child([str(python), str(GLUON_PROBE), f'--size={input_size}',
                        *models], dict(os.environ), 'gluon')
  source = (f'{payload["library"]} gluon.model_zoo.vision.<name>('
            'pretrained=False), initialised randomly, run once on a '
            f'1x3x{input_size}x{input_size} zero image with hooks on every '
            'block and layer (flax_resnet/references/_gluon_probe.py, in '
            'MXNet\'s own virtualenv)')
  return source, payload['models']


_PROBES_IN_CHILD = {'timm': _timm_probe_in_process,
                    'keras': _keras_probe_in_process}

# One entry per library: references that share a library (keras and
# keras_v2, gluon_v1 and gluon_v2) are probed in one run of it.
PROBES: dict[str, Callable[[Sequence[str], int], tuple[str, list[Probe]]]] = {
    'torchvision': _probe_torchvision,
    'paper': _probe_paper,
    'timm': lambda models, size: _probe_in_child('timm', models, size),
    'keras': lambda models, size: _probe_in_child('keras', models, size,
                                                  KERAS_BACKEND='jax'),
    'gluon': _probe_gluon,
}


# ----------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Reference:
  """How to build one reference table.

  Attributes:
    name: file stem of the table, a key of references.NAMES.
    models: our preset name -> the library's own model name.
    input_size: image height and width of the forward pass.
    probe: the key in PROBES of the library that builds the models.
    notes: conventions that differ from this project, in words.
    stem_difference: why the stem's parameter count is not comparable, when
      the reference's stem holds layers ours lacks.
    requires: a module that must be importable (None: always available).
  """
  name: str
  models: dict[str, str]
  input_size: int
  probe: str
  notes: str
  stem_difference: Optional[str] = None
  requires: Optional[str] = None


_TORCH_NOTES = (
    'Per-block params count trainable parameters (conv weights, BN gamma and '
    'beta), not BN running statistics, as in this project. ')

_GLUON_V2_STEM = (
    'Gluon V2 normalises the raw input with a parameter-free BatchNorm('
    'scale=False, center=False) and follows conv0 with BN+ReLU (128 trainable '
    'parameters) before the max-pool; a pre-activation stem here is conv + '
    "max-pool only (its first BN is the first block's bn1).")

REFERENCES: dict[str, Reference] = {
    'torchvision': Reference(
        'torchvision',
        {n: n for n in ('resnet18', 'resnet34', 'resnet50', 'resnet101',
                        'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
                        'resnext101_64x4d', 'wide_resnet50_2',
                        'wide_resnet101_2')},
        224, 'torchvision',
        _TORCH_NOTES + 'torchvision is "v1.5": a bottleneck strides on its '
        '3x3 (conv2). A projection (downsample: 1x1 conv + BN) is built when '
        'stride != 1 or inplanes != planes * expansion, so bottleneck stage 1 '
        'has a stride-1 projection and basic-block stage 1 has none.',
        requires='torch'),
    'timm': Reference(
        'timm', {n: n for n in ('resnet50d', 'resnet101d', 'resnet200')},
        224, 'timm',
        _TORCH_NOTES + 'resnet50d/resnet101d are ResNet-D: deep stem '
        '(3x3 convs 32, 32, 64) and avg_down shortcuts (2x2 avg-pool with the '
        'stride, then 1x1 conv stride 1 + BN); where the stride is 1 timm '
        'replaces the pool with Identity, so the row is a plain stride-1 '
        'projection. resnet200 is the plain v1.5 layout with depths '
        '(3, 24, 36, 3).',
        requires='timm'),
    'gluon_v1': Reference(
        'gluon_v1', {f'resnet{d}_v1': f'resnet{d}_v1'
                     for d in (18, 34, 50, 101, 152)},
        224, 'gluon',
        'Gluon BottleneckV1 is true v1: its first 1x1 (body.0) carries the '
        'stride. Its body.0 and body.6 1x1 convs are built with Gluon\'s '
        'default use_bias=True, so bottleneck block params and the total are '
        'null (not comparable: biases this project has no place for); '
        'library_trainable_params gives Gluon\'s own count. Basic blocks '
        '(resnet18/34_v1) have no conv biases and are compared. A projection '
        '(downsample: 1x1 conv + BN) is built when channels != in_channels.',
        requires=None),
    'gluon_v2': Reference(
        'gluon_v2', {f'resnet{d}_v2': f'resnet{d}_v2'
                     for d in (18, 34, 50, 101, 152)},
        224, 'gluon',
        'Pre-activation (He et al. 2016). The stride sits on the 3x3 (conv2 '
        'of BottleneckV2, conv1 of BasicBlockV2). The projection (downsample, '
        'built when channels != in_channels) is a 1x1 conv WITHOUT BN fed '
        'relu(bn1(x)). Stem params and the total are null: ' + _GLUON_V2_STEM
        + ' library_trainable_params gives Gluon\'s own count.',
        stem_difference=_GLUON_V2_STEM),
    'keras': Reference(
        'keras', {'resnet50_v1': 'ResNet50', 'resnet101_v1': 'ResNet101',
                  'resnet152_v1': 'ResNet152'},
        224, 'keras',
        'Keras applications ResNet (true v1): the first 1x1 (_1_conv) '
        'carries the stride, and every stack\'s first block has a projection '
        '(_0_conv + _0_bn). All Keras convs here carry biases, so stem, '
        'per-block params and the total are null (not comparable); '
        'library_trainable_params is Keras\' trainable count and '
        'library_total_params its count_params(), which also counts BN moving '
        'statistics.',
        requires='keras'),
    'keras_v2': Reference(
        'keras_v2', {'resnet50_v2': 'ResNet50V2', 'resnet101_v2': 'ResNet101V2',
                     'resnet152_v2': 'ResNet152V2'},
        224, 'keras',
        'Keras ResNetV2 is pre-activation but NOT He et al. 2016\'s layout: '
        'each stack\'s first block has a stride-1 projection (_0_conv, with '
        'bias, no BN, fed the pre-activation); the stride sits on the 3x3 of '
        'the LAST block of stacks 2-4 (conv2..conv4), whose shortcut is a '
        'parameter-free 1x1 max-pool with stride 2 (shortcut "subsample": '
        'no zero channels); stack 5 has no stride. Stage outputs are '
        '28/14/7/7 at 224, against 56/28/14/7 here, so this project\'s '
        'preact presets do NOT match this table: a true, documented '
        'difference. Keras convs carry biases (_0_conv, _3_conv, the stem), '
        'so params are null; library_total_params is count_params().',
        requires='keras'),
    'paper': Reference(
        'paper', {f'resnet{d}': f'resnet{d}' for d in _PAPER_DEPTHS},
        32, 'paper',
        _TORCH_NOTES + 'CIFAR-10 nets of He et al. 2015 section 4.2: option A '
        'shortcuts are parameter-free (subsample + zero channels) and are used '
        'only where the shape changes (first block of stages 2 and 3); the '
        'stem is one 3x3 conv (16) + BN + ReLU without max-pool.',
        requires='torch'),
}


# ------------------------------------------------------------------- public


def unavailable(name: str) -> Optional[str]:
  """Why reference `name` cannot be extracted here, or None if it can."""
  reference = REFERENCES[name]
  if reference.probe == 'gluon':
    python = mxnet_python()
    if python is None or not python.exists():
      return ('no MXNet interpreter (set FLAX_RESNET_MXNET_PYTHON or create '
              f'{DEFAULT_MXNET_PYTHON.parent.parent})')
    return None
  needs = reference.requires
  if needs and importlib.util.find_spec(needs) is None:
    return f'{needs} is not installed'
  return None


def extract_tables(requests: dict[str, Optional[Sequence[str]]]
                   ) -> dict[str, dict[str, Any]]:
  """Builds several tables: reference name -> our presets (None: all).

  References of one library are probed in a single run, so e.g. keras and
  keras_v2 pay for one Keras start-up.
  """
  wanted: dict[str, list[str]] = {}
  for name, models in requests.items():
    if name not in REFERENCES:
      raise ValueError(f'reference {name!r} is unknown; choose one of '
                       f'{", ".join(REFERENCES)}.')
    reference = REFERENCES[name]
    presets = list(models) if models else list(reference.models)
    unknown = [m for m in presets if m not in reference.models]
    if unknown:
      raise ValueError(f'models {", ".join(unknown)} are not in reference '
                       f'{name!r}; it covers {", ".join(reference.models)}.')
    wanted[name] = presets
  by_library: dict[tuple[str, int], list[str]] = {}
  for name in wanted:
    reference = REFERENCES[name]
    by_library.setdefault((reference.probe, reference.input_size),
                          []).append(name)
  tables = {}
  for (library, input_size), names in by_library.items():
    library_models = list(dict.fromkeys(
        REFERENCES[n].models[m] for n in names for m in wanted[n]))
    source, probes = PROBES[library](library_models, input_size)
    probe_of = dict(zip(library_models, probes))
    for name in names:
      reference = REFERENCES[name]
      tables[name] = {
          'reference': name,
          'source': source,
          'extracted_by': f'python -m flax_resnet.references.extract {name}',
          'notes': reference.notes,
          'models': {m: entry_from_events(probe_of[reference.models[m]],
                                          reference.stem_difference)
                     for m in wanted[name]},
      }
  return {name: tables[name] for name in requests}


def extract(name: str, models: Optional[Sequence[str]] = None
            ) -> dict[str, Any]:
  """Builds reference `name`'s table (only `models`, our preset names)."""
  return extract_tables({name: models})[name]


def dumps(table: dict[str, Any]) -> str:
  """JSON with the stem and each block row on one line, for row-wise diffs."""
  rows = {}

  def compact(value):
    if isinstance(value, dict):
      return {k: ([token(r) for r in v] if k == 'blocks' else
                  token(v) if k == 'stem' else compact(v))
              for k, v in value.items()}
    return value

  def token(row):
    key = f'@@row{len(rows)}@@'
    rows[key] = json.dumps(row)
    return key

  text = json.dumps(compact(table), indent=1)
  for key, row in rows.items():
    text = text.replace(f'"{key}"', row)
  return text + '\n'


def differences(fresh: dict[str, Any], stored: dict[str, Any]) -> list[str]:
  """Where a fresh extraction disagrees with the stored table, in words."""
  problems = []
  for preset, entry in fresh['models'].items():
    old = stored['models'].get(preset)
    if old is None:
      problems.append(f'{preset}: missing from the stored table')
      continue
    for key in sorted(set(entry) | set(old)):
      if key == 'blocks':
        continue
      if entry.get(key) != old.get(key):
        problems.append(f'{preset}: {key} is {old.get(key)!r} stored but '
                        f'{entry.get(key)!r} extracted')
    rows = {(r['stage'], r['index']): r for r in entry['blocks']}
    old_rows = {(r['stage'], r['index']): r for r in old['blocks']}
    for key in sorted(set(rows) | set(old_rows)):
      if rows.get(key) != old_rows.get(key):
        problems.append(f'{preset} stage {key[0]} block {key[1]}: stored '
                        f'{old_rows.get(key)} but extracted {rows.get(key)}')
  return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m flax_resnet.references.extract',
      description='Build reference layout tables from the reference '
      'libraries\' own models (random weights, nothing downloaded).')
  parser.add_argument('names', nargs='+',
                      help=f'{", ".join(REFERENCES)}, or all (with --probe: '
                      'the library, then its model names)')
  parser.add_argument('--out', type=pathlib.Path, default=DIRECTORY,
                      help='folder of the JSON tables (default: the package)')
  parser.add_argument('--check', action='store_true',
                      help='compare with the stored tables instead of writing')
  parser.add_argument('--models', default=None,
                      help='comma-separated presets to extract (default all); '
                      'only with --check, so a stored table stays complete')
  parser.add_argument('--probe', choices=sorted(_PROBES_IN_CHILD),
                      help=argparse.SUPPRESS)
  parser.add_argument('--size', type=int, default=224, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.probe:  # the child side of _probe_in_child
    source, probes = _PROBES_IN_CHILD[args.probe](args.names, args.size)
    args.out.write_text(json.dumps({'source': source,
                                             'probes': probes}))
    return 0
  if rest:
    parser.error(f'unrecognised arguments: {" ".join(rest)}')
  names = list(REFERENCES) if args.names == ['all'] else args.names
  for name in names:
    if name not in REFERENCES:
      parser.error(f'reference {name!r} is unknown; choose one of '
                   f'{", ".join(REFERENCES)} or all')
  if args.models and not args.check:
    parser.error('--models writes an incomplete table; use it with --check')
  models = args.models.split(',') if args.models else None
  if models:
    covered = {m for name in names for m in REFERENCES[name].models}
    unknown = [m for m in models if m not in covered]
    if unknown:
      parser.error(f'--models {",".join(unknown)}: not in {", ".join(names)}')
  status, requests = 0, {}
  for name in names:
    reason = unavailable(name)
    if reason:
      print(f'{name}: cannot extract: {reason}', file=sys.stderr)
      status = 1
      continue
    wanted = models and [m for m in models if m in REFERENCES[name].models]
    if not models or wanted:
      requests[name] = wanted or None
  for name, table in extract_tables(requests).items():
    path = args.out / f'{name}.json'
    if not args.check:
      args.out.mkdir(parents=True, exist_ok=True)
      path.write_text(dumps(table))
      print(f'{name}: wrote {path} ({", ".join(table["models"])})')
      continue
    if not path.exists():
      print(f'{name}: {path} does not exist')
      status = 1
      continue
    problems = differences(table, json.loads(path.read_text()))
    if problems:
      status = 1
      print(f'{name}: {len(problems)} difference(s) from {path}:')
      for problem in problems:
        print(f'  - {problem}')
    else:
      print(f'{name}: {path} agrees ({", ".join(table["models"])} '
            're-extracted)')
  return status


if __name__ == '__main__':
  sys.exit(main())

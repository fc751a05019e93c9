"""Hooks that read a PyTorch ResNet's layout (torchvision, timm, the paper)."""

from __future__ import annotations

from typing import Any, Sequence

from flax_resnet.references.events import Probe, square as _square

# Parameter-free layers that neither move data nor change shapes: not rows.
# (An empty Sequential is how the paper's code spells an identity shortcut.)
_TORCH_SKIPPED = ('ReLU', 'ReLU6', 'SiLU', 'GELU', 'Identity', 'Dropout',
                  'Flatten', 'Sequential')



def _torch_shape(value) -> list[int]:
  if isinstance(value, (tuple, list)):
    value = value[0]
  return [int(d) for d in value.shape[1:]]  # NCHW without the batch axis



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


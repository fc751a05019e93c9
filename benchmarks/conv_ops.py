"""One conv layer, forward + both gradients: XLA:CPU, oneDNN, PyTorch.

  python benchmarks/conv_ops.py
  python benchmarks/conv_ops.py --nets resnet50_other   # stem, 1x1, strided

For the 3x3 stride-1 conv shapes of resnet20 (batch 128) and resnet50 (batch
16), or resnet50's other convs (`resnet50_other`: stem, 1x1, strided), times
the forward pass and the input and weight gradients as XLA:CPU compiles them
(with steps.compiler_options(), as the train step does) and a PyTorch
channels_last Conv2d forward+backward, alternating, median of --repeats; and
the same through the model's conv (`flax_resnet.cpu.conv_general_dilated`:
oneDNN via jax.ffi). The ratios say how much of the train-step gap is the
convolution kernels themselves.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import torch

from flax_resnet import cpu
from flax_resnet.cpu import xla_conv
from flax_resnet.train import steps
from machine import machine_info

# (batch, size, in_channels, out_channels, stride[, kernel size: 3]); padded
# as torchvision pads (kernel // 2 on every side).
SHAPES = {
    'resnet20': [(128, 32, 16, 16, 1), (128, 32, 16, 32, 2),
                 (128, 16, 32, 32, 1), (128, 8, 64, 64, 1)],
    'resnet50': [(16, 56, 64, 64, 1), (16, 28, 128, 128, 1),
                 (16, 14, 256, 256, 1), (16, 7, 512, 512, 1)],
    # resnet50's other convs, most of its layers: the 7x7/2 stem, the 1x1
    # reduce / expand convs of stages 1-4, a strided 3x3 (v1.5: the first
    # block of stages 2-4) and a strided 1x1 projection shortcut. resnet20
    # has only 3x3 convs; where the two nets' ratios to PyTorch part (on the
    # AMD EPYC, BENCHMARKS.md "Machines"), these are the layers to time.
    'resnet50_other': [(16, 224, 3, 64, 2, 7), (16, 56, 64, 256, 1, 1),
                       (16, 56, 256, 64, 1, 1), (16, 28, 512, 128, 1, 1),
                       (16, 14, 1024, 256, 1, 1), (16, 7, 2048, 512, 1, 1),
                       (16, 56, 128, 128, 2, 3), (16, 56, 256, 512, 2, 1)],
}


def _conv(x, kernel, stride, conv_fn=lax.conv_general_dilated):
  pad = kernel.shape[0] // 2
  return conv_fn(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def jax_step(batch, size, cin, cout, stride, kernel_size=3,
             conv_fn=lax.conv_general_dilated, compiler_options=None):
  """Forward, input gradient and weight gradient, as in a train step."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
  kernel = jnp.asarray(
      rng.normal(size=(kernel_size, kernel_size, cin, cout)), jnp.float32)

  def fwd_bwd(x, kernel):
    y, vjp = jax.vjp(functools.partial(_conv, stride=stride,
                                       conv_fn=conv_fn), x, kernel)
    return y, vjp(jnp.ones_like(y))

  fn = jax.jit(fwd_bwd, compiler_options=compiler_options)
  jax.block_until_ready(fn(x, kernel))
  return lambda: jax.block_until_ready(fn(x, kernel))


def torch_step(batch, size, cin, cout, stride, kernel_size=3):
  x = torch.randn(batch, cin, size, size).contiguous(
      memory_format=torch.channels_last).requires_grad_()
  conv = torch.nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2,
                         bias=False).to(memory_format=torch.channels_last)

  def step():
    y = conv(x)
    torch.autograd.grad(y, (x, conv.weight), torch.ones_like(y))

  step()
  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nets', default='resnet20,resnet50',
                      help=f'comma-separated, of {", ".join(SHAPES)}')
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--shapes', type=int, default=None,
                      help='only the first N shapes of each net')
  args = parser.parse_args(argv)
  nets = args.nets.split(',')
  unknown = [n for n in nets if n not in SHAPES]
  if unknown:
    parser.error(f'--nets: {", ".join(unknown)} not among {", ".join(SHAPES)}')
  print(json.dumps({'machine': machine_info()}), flush=True)
  rows = []
  for net in nets:
    for shape in SHAPES[net][:args.shapes]:
      contestants = {
          # XLA's convolutions, as the train step ran them before oneDNN.
          'jax': jax_step(*shape, conv_fn=xla_conv.conv_general_dilated,
                          compiler_options=steps.CPU_COMPILER_OPTIONS),
          'onednn': jax_step(*shape, conv_fn=cpu.conv_general_dilated),
          'torch': torch_step(*shape)}
      times = {name: [] for name in contestants}
      for _ in range(args.repeats):
        for name, fn in contestants.items():
          start = time.perf_counter()
          fn()
          times[name].append(1e3 * (time.perf_counter() - start))
      jax_ms = statistics.median(times['jax'])
      onednn_ms = statistics.median(times['onednn'])
      torch_ms = statistics.median(times['torch'])
      rows.append({'net': net, 'shape': shape, 'jax_ms': round(jax_ms, 2),
                   'onednn_ms': round(onednn_ms, 2),
                   'torch_ms': round(torch_ms, 2),
                   'jax_over_torch_time': round(jax_ms / torch_ms, 2),
                   'onednn_over_torch_time': round(onednn_ms / torch_ms, 2)})
      print(json.dumps(rows[-1]), flush=True)


if __name__ == '__main__':
  main()

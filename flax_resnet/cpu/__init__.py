"""Everything CPU-specific that makes the model fast on XLA:CPU, in one place.

- `conv_general_dilated` (conv.py): the conv every `nn.Conv` of the model
  calls; oneDNN kernels through `jax.ffi` (onednn.py, onednn_conv.cc), or
  XLA:CPU-friendly gradients where the extension is unavailable (xla_conv.py).
- `batch_norm` (batch_norm.py): the training-mode BatchNorm gradient in the
  fewest passes over memory (the same math on every platform).
- `fusion_barrier` (barrier.py): stops XLA:CPU recomputing the residual
  stream's BatchNorm/ReLU chain inside every consumer fusion;
  `conv_input_barrier` does it only where XLA runs the convolutions.
- `max_pool` (max_pool.py): max-pool with a mask-based gradient instead of
  select-and-scatter.
- `compiler_options` (options.py): XLA options the steps need on CPU (only
  without oneDNN).

Each is exact; all but `batch_norm` are a no-op (XLA's own op) on GPU/TPU
via `lax.platform_dependent`. BENCHMARKS.md measures each one.
"""

from flax_resnet.cpu import batch_norm
from flax_resnet.cpu.barrier import conv_input_barrier
from flax_resnet.cpu.barrier import fusion_barrier
from flax_resnet.cpu.conv import conv_general_dilated
from flax_resnet.cpu.max_pool import max_pool
from flax_resnet.cpu.options import compiler_options
from flax_resnet.cpu.options import XLA_CONV_COMPILER_OPTIONS

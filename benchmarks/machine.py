"""Which machine a benchmark ran on: the CPU model above all.

The same command gives different ratios on different CPU models (oneDNN,
XLA and PyTorch pick different kernels per instruction set and cache size;
BENCHMARKS.md lists the figures per CPU model), so every result file records
the model, its family/model numbers and the instruction-set flags that choose
kernels: AVX-512, its bf16 extension, AMX.
"""

from __future__ import annotations

import os
import platform

# The flags that change which convolution / matmul kernels run.
KERNEL_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni',
                'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_bf16')


def cpu_model(cpuinfo_text: str | None = None) -> dict:
  """The first processor of /proc/cpuinfo: vendor, model name, family/model.

  `flags` keeps only KERNEL_FLAGS, in that order; `amx` is True when any AMX
  flag is present. Empty where /proc/cpuinfo cannot be read (not Linux).
  """
  if cpuinfo_text is None:
    try:
      with open('/proc/cpuinfo') as f:
        cpuinfo_text = f.read()
    except OSError:
      return {'model_name': platform.processor() or platform.machine()}
  fields: dict[str, str] = {}
  for line in cpuinfo_text.splitlines():
    if not line.strip():
      if fields:
        break  # only the first processor's block
      continue
    key, _, value = line.partition(':')
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get('flags', '').split())
  return {
      'model_name': fields.get('model name', platform.machine()),
      'vendor': fields.get('vendor_id'),
      'family': _int_or_none(fields.get('cpu family')),
      'model': _int_or_none(fields.get('model')),
      'stepping': _int_or_none(fields.get('stepping')),
      'flags': [f for f in KERNEL_FLAGS if f in flags],
      'avx512f': 'avx512f' in flags,
      'avx512_bf16': 'avx512_bf16' in flags,
      'amx': any(f.startswith('amx') for f in flags),
  }


def _int_or_none(value):
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def cpu_label(cpu: dict) -> str:
  """One line for a table header, e.g.

  'Intel(R) Xeon(R) Processor (family 6 model 167; avx512f avx512_bf16 amx)'.
  """
  isa = ' '.join(f for f in ('avx512f', 'avx512_bf16', 'amx') if cpu.get(f))
  numbers = (f"family {cpu['family']} model {cpu['model']}"
             if cpu.get('family') is not None else '')
  detail = '; '.join(p for p in (numbers, isa or 'no avx512') if p)
  return f"{cpu.get('model_name')} ({detail})"


KERNEL_SETTINGS = ('ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'XLA_FLAGS',
                   'FLAX_RESNET_ONEDNN', 'FLAX_RESNET_MALLOC',
                   'OMP_NUM_THREADS')


def machine_info() -> dict:
  """CPU model, core count, memory and Python, for a result file."""
  info = {'python': platform.python_version(), 'cpu_count': os.cpu_count(),
          'cpu': cpu_model()}
  try:
    with open('/proc/meminfo') as f:
      info['mem_total_gb'] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  # Settings that change which kernels run (ONEDNN_MAX_CPU_ISA=AVX2 stands in
  # for a CPU without AVX-512): a result measured under them says so.
  info['kernel_settings'] = {name: os.environ[name]
                             for name in KERNEL_SETTINGS if name in os.environ}
  return info


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]

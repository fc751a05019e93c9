"""The benchmark scripts' own plumbing: CPU model records, the device check."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

# The first block of /proc/cpuinfo on an AMD EPYC Zen 4 (abridged flags), the
# other CPU model the project's machines come as.
ZEN4_CPUINFO = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9R14
stepping	: 1
flags		: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni

processor	: 1
vendor_id	: GenuineIntel
model name	: not the first processor
"""


def test_cpu_model_records_the_kernel_choosing_flags():
  cpu = machine.cpu_model(ZEN4_CPUINFO)
  assert cpu == {
      'model_name': 'AMD EPYC 9R14', 'vendor': 'AuthenticAMD', 'family': 25,
      'model': 17, 'stepping': 1,
      'flags': ['avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni',
                'avx512_bf16'],
      'avx512f': True, 'avx512_bf16': True, 'amx': False}
  assert machine.cpu_label(cpu) == (
      'AMD EPYC 9R14 (family 25 model 17; avx512f avx512_bf16)')
  # This machine's, as benchmarks/run.py writes it into its JSON.
  assert machine.machine_info()['cpu']['model_name']


def test_machine_info_records_kernel_capping_settings(monkeypatch):
  for name in machine.KERNEL_SETTINGS:
    monkeypatch.delenv(name, raising=False)
  assert machine.machine_info()['kernel_settings'] == {}
  monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX2')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_max_isa=AVX2')
  assert machine.machine_info()['kernel_settings'] == {
      'ONEDNN_MAX_CPU_ISA': 'AVX2', 'XLA_FLAGS': '--xla_cpu_max_isa=AVX2'}


def run_device_check(*args, timeout=600):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'device_check.py'),
       *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, 'PYTHONPATH': REPO})


@pytest.mark.slow
def test_device_check_smoke_on_cpu(tmp_path):
  """--smoke runs every part; (c) then compares XLA's convs with oneDNN's."""
  from flax_resnet.cpu import onednn  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'check.json'
  result = run_device_check('--smoke', '--workers', '0', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = result.stdout.strip().splitlines()[-1]
  assert summary.startswith('device_check cpu: resnet20 bf16 batch 4: train ')
  assert summary.count(' OK |') == 1, summary
  record = json.loads(out.read_text())
  assert record['host']['cpu']['model_name']
  for phase in ('train', 'eval'):
    assert record['speed'][phase]['images_per_s'] > 0
    assert len(record['speed'][phase]['rounds']) == 2
  pipe = record['pipeline']
  assert pipe['images_per_s'] > 0 and pipe['batch_size'] == 4
  assert pipe['pipeline_over_train'] == pytest.approx(
      pipe['images_per_s'] / record['speed']['train']['images_per_s'],
      rel=1e-2)
  conv = record['conv']
  assert conv['ok'] and conv['device_convs'] == 'XLA'
  if onednn.available():  # two different kernels: rounding differs, a little
    assert conv['host_convs'] == 'oneDNN'
    assert 0 < conv['logits_relative_error'] <= conv['logits_tolerance']
    assert 0 < conv['grads_relative_error'] <= conv['grads_tolerance']


def test_device_check_says_when_jax_sees_no_gpu():
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('an accelerator is present')
  result = run_device_check(timeout=120)
  assert result.returncode == 2
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      'error: no GPU/TPU backend: jax '), result.stderr
  assert "pip install -U 'jax[cuda13]'" in lines[0]


def test_device_check_unwritable_out_is_one_error_line_before_measuring(
    tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  result = run_device_check('--smoke', '--out',
                            str(blocker / 'runs' / 'check.json'), timeout=120)
  assert result.returncode == 2 and result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (f'error: --out {blocker}/runs/check.json: cannot '
                       'write it '
                       '(Not a directory); pass a path in a writable folder')
  assert 'Traceback' not in result.stderr


def test_alternate_reports_kernel_time_and_page_faults_per_round():
  import run  # pylint: disable=g-import-not-at-top
  touched = []

  def faulting(steps):  # maps fresh pages, as a step without the settings
    for _ in range(steps):
      touched.append(bytearray(8 * 2**20))  # zero-filled: every page written

  result = run.alternate({'faulting': faulting, 'idle': lambda steps: None},
                         steps=2, rounds=3, images_per_step=4)
  assert set(result) == {'faulting', 'idle'}
  for name, r in result.items():
    assert len(r['rounds']) == len(r['minor_faults_per_step_rounds']) == 3
    assert r['sys_ms_per_image'] >= 0, name
  # 8 MiB a step is 2,048 fresh 4 KiB pages (fewer with huge pages).
  assert result['faulting']['minor_faults_per_step'] > 100
  assert result['idle']['minor_faults_per_step'] < 100


@pytest.mark.slow
def test_step_faults_measures_both_settings(tmp_path):
  out = tmp_path / 'step_faults.json'
  subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks',
                                               'step_faults.py'),
                  '--nets', 'resnet20', '--steps', '2', '--out', str(out)],
                 check=True, capture_output=True, timeout=900)
  by_setting = json.loads(out.read_text())['nets']['resnet20']
  assert by_setting['on']['malloc'] == 'applied', by_setting
  assert by_setting['off']['malloc'] == 'not applied: FLAX_RESNET_MALLOC=0'
  # Without: resnet20 at batch 128 faults its buffers in afresh every step
  # (measured 49,153 faults per step, every step).
  assert by_setting['off']['minor_faults_per_step'] > 1000, by_setting
  assert by_setting['on']['peak_rss_mb'] > 0


def test_device_check_a_failing_part_keeps_the_others(tmp_path, monkeypatch,
                                                      capsys):
  """One lent device, minutes long: a part that raises costs only itself."""
  import device_check  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'check.json'

  def out_of_memory(sizes, args):
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory\nallocator details')

  def conv_once_the_others_are_on_disk(sizes, device, host):
    on_disk = json.loads(out.read_text())  # rewritten after every part
    assert on_disk['speed'] == {
        'error': 'RuntimeError: RESOURCE_EXHAUSTED: out of memory'}
    assert on_disk['pipeline']['images_per_s'] > 0
    return {'device_convs': 'XLA', 'host_convs': 'XLA',
            'logits_relative_error': 0.0, 'grads_relative_error': 1e-7,
            'ok': True}

  monkeypatch.setattr(device_check, 'train_speed', out_of_memory)
  monkeypatch.setattr(device_check, 'conv_accuracy',
                      conv_once_the_others_are_on_disk)
  status = device_check.main(['--smoke', '--workers', '0', '--out', str(out)])
  captured = capsys.readouterr()
  assert status == 1
  record = json.loads(out.read_text())
  assert record['conv']['ok'], record['conv']
  # No train rate to compare the pipeline with: no ratio, no bottleneck claim.
  assert record['pipeline']['pipeline_over_train'] is None
  assert record['pipeline']['bottleneck'] is False
  assert set(record['part_s']) == {'speed', 'pipeline', 'conv'}
  summary = captured.out.strip().splitlines()[-1]
  assert ('speed: ERROR RuntimeError: RESOURCE_EXHAUSTED: out of memory | '
          'input pipeline 0 workers ') in summary, summary
  assert '(no train rate to compare) | f32 XLA vs host XLA' in summary
  assert 'Traceback' in captured.err and 'allocator details' in captured.err
  assert captured.err.strip().splitlines()[-1] == (
      'error: device_check part speed failed (traceback above); the other '
      'parts were measured')


# What the GPU machines' image ('cuda', /work/.library/device/KINDS.md, read
# 2026-11-17) already holds of flax_resnet's dependency closure.
DEVICE_IMAGE_HAS = {
    'absl-py', 'attrs', 'chex', 'cloudpickle', 'etils', 'flax', 'h5py', 'jax',
    'numpy', 'optax', 'orbax-checkpoint', 'packaging', 'pillow', 'protobuf',
    'psutil', 'pyarrow', 'pyyaml', 'requests', 'safetensors', 'six', 'tqdm',
    'typing-extensions', 'wrapt'}
# 160 MB, over a call's 64 MiB carry: the device's host CPU then runs XLA's
# convolutions in part (c), which the summary names.
NOT_CARRIED = {'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'}


def test_device_wheels_cover_what_the_gpu_image_lacks():
  """benchmarks/device_wheels.sh's list = the closure of flax_resnet's
  requirements on the device's Python 3.12, less its image, and each pin
  satisfies every requirement on it."""
  import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.version import Version  # pylint: disable=g-import-not-at-top

  def canonical(name):
    return re.sub(r'[-_.]+', '-', name).lower()

  with open(os.path.join(REPO, 'benchmarks', 'device_wheels.sh')) as f:
    script = f.read()
  def pinned(array):  # NAME=( pkg==1.2 ... ) in the script
    body = re.search(rf'^{array}=\(([^)]*)\)', script, re.M).group(1)
    return {canonical(name): Version(version) for name, version in
            re.findall(r'([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)', body)}

  pins = {**pinned('WHEELS'), **pinned('SOURCE_ONLY')}
  # Carried for image packages whose version is not on record, installed
  # where the image's is older: each must meet every requirement on it.
  if_older = pinned('IF_OLDER')
  assert set(if_older) <= DEVICE_IMAGE_HAS
  device = {'python_version': '3.12', 'python_full_version': '3.12.1',
            'sys_platform': 'linux', 'platform_machine': 'x86_64',
            'implementation_name': 'cpython', 'extra': ''}
  lacking, unmet, todo = set(), [], ['flax-resnet']
  while todo:
    for line in metadata.requires(todo.pop()) or []:
      requirement = Requirement(line)
      if requirement.marker and not requirement.marker.evaluate(device):
        continue
      name = canonical(requirement.name)
      if name in if_older and if_older[name] not in requirement.specifier:
        unmet.append(f'{line} (device_wheels.sh carries {if_older[name]})')
      if name in DEVICE_IMAGE_HAS or name in NOT_CARRIED:
        continue
      if name in pins and pins[name] not in requirement.specifier:
        unmet.append(f'{line} (device_wheels.sh pins {pins[name]})')
      if name not in lacking:
        lacking.add(name)
        todo.append(name)
  assert lacking == set(pins), (
      f'add to device_wheels.sh: {sorted(lacking - set(pins))}; '
      f'drop: {sorted(set(pins) - lacking)}')
  assert not unmet, unmet

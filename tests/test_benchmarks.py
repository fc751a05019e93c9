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
  assert "pip install -U 'jax[cuda12]'" in lines[0]


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

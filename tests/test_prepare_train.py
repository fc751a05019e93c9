"""train.py trains from each prepared upstream format (end to end, no network).

Each dataset is synthesized in its upstream layout, prepared with
`python -m flax_resnet.data.prepare`, and trained for a few steps with the
project's own config for it; the run must finish, score every held-out
example and exit 0.
"""

import json
import os
import subprocess
import sys

import pytest

import upstream_archives as ua
from test_prepare import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': REPO}


def run(args, timeout=600):
  return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def source_of(case, tmp_path):
  """(dataset name or folder:, source, config, overrides, eval examples)."""
  if case == 'cifar10_binary':
    data = ua.cifar_data('cifar10')
    return ('cifar10', ua.cifar_archive(tmp_path, 'cifar10', 'binary', data),
            'configs/cifar10_resnet20.py', [], ua.CIFAR10_TEST)
  if case == 'cifar100_python_torchvision_folder':
    data = ua.cifar_data('cifar100')
    root = ua.extract(ua.cifar_python_files('cifar100', data),
                      tmp_path / 'torchvision')
    return ('cifar100', root, 'configs/cifar100_resnet56.py',
            ['--config.model=resnet20'], ua.CIFAR100_TEST)
  if case == 'imagenet2012':
    train, val = ua.imagenet_files()
    return ('imagenet2012', ua.imagenet_tars(tmp_path / 'manual', train, val),
            'configs/resnet18.py',
            ['--config.image_size=32', '--config.precision=float32'],
            ua.IMAGENET_VAL)
  make_image_folder(tmp_path / 'pets')
  # 64 px keeps resnet18's last map 2x2: with batch 2 every train-mode BN
  # then sees 8 values per channel, not a near-degenerate 2.
  overrides = ['--config.num_classes=3', '--config.image_size=64',
               '--config.precision=float32', '--config.augment=none',
               '--config.eval_split=val']
  if case == 'image_folder_prepared':
    return ('my_pets', tmp_path / 'pets', 'configs/resnet18.py', overrides, 6)
  return (f'folder:{tmp_path / "pets"}', None, 'configs/resnet18.py',
          overrides, 6)


@pytest.mark.slow
@pytest.mark.parametrize('case', ['cifar10_binary',
                                  'cifar100_python_torchvision_folder',
                                  'imagenet2012', 'image_folder_prepared',
                                  'image_folder_direct'])
def test_train_py_trains_from_the_prepared_dataset(tmp_path, case):
  name, source, config, overrides, num_eval = source_of(case, tmp_path)
  data_dir = tmp_path / 'data'
  if source is not None:
    prepared = run(['-m', 'flax_resnet.data.prepare', name, '--data_dir',
                    data_dir, '--source', source, '--no_progress'])
    assert prepared.returncode == 0, prepared.stderr
  workdir = tmp_path / 'run'
  result = run([
      'train.py', '--config', config, '--workdir', workdir,
      f'--config.dataset={name}', f'--config.data_dir={data_dir}',
      '--config.num_train_steps=3', '--config.eval_every_steps=3',
      '--config.batch_size=2', '--config.eval_batch_size=4',
      '--config.worker_count=0', '--config.compilation_cache_dir=',
      '--config.progress_bar=off', *overrides])
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in records if 'eval_top1' in r]
  assert evals and evals[-1]['step'] == 3
  assert evals[-1]['eval_examples'] == num_eval  # every held-out example
  assert 'completed at step 3/3' in result.stdout
  # The reference tables hold 1000/10-class heads; a dataset's own class
  # count is checked at the reference's and said so.
  assert 'MATCH' in result.stdout

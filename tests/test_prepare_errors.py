"""prepare's errors, interruptions, downloads and life without TensorFlow.

Every failure must be one `error:` line naming what was expected, and leave
nothing that `tfds.builder(...).is_prepared()` (what training checks) accepts.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import upstream_archives as ua
from flax_resnet.data import cifar_source
from flax_resnet.data import prepare as prepare_lib
from test_prepare import REPO, check_cifar, dataset_files, make_image_folder, prepare

tfds.disable_progress_bar()


# ---------------------------------------------------------------------------
# Errors: one line, the fix, and nothing half-written


def run_cli(*args, **kwargs):
  return subprocess.run(
      [sys.executable, '-m', 'flax_resnet.data.prepare', *map(str, args),
       '--no_progress'], cwd=REPO, capture_output=True, text=True,
      env={**os.environ, 'PYTHONPATH': REPO}, timeout=120, **kwargs)


def assert_nothing_readable(data_dir, name):
  builder = tfds.builder(name, data_dir=str(data_dir))
  assert not builder.is_prepared()
  leftovers = [f for f in os.listdir(data_dir)] if os.path.isdir(
      data_dir) else []
  assert not [f for f in leftovers if f.startswith('.prepare-')], leftovers


def truncated(path, tmp_path):
  data = open(path, 'rb').read()
  cut = tmp_path / os.path.basename(path)
  cut.write_bytes(data[:len(data) // 2])
  return cut


@pytest.mark.parametrize('case, message', [
    ('truncated', r'is not a readable archive .* truncated or it is not '
                  r'cifar-10-binary.tar.gz or cifar-10-python.tar.gz'),
    ('other_dataset', r"top folder is 'cifar-100-binary'.*It looks like "
                      r'cifar100'),
    ('missing_split', r'test_batch is missing, so split .test. of cifar10 is '
                      r'incomplete'),
    ('not_there', r'does not exist; give cifar-10-binary.tar.gz'),
    # tarfile's own message lists each compression it tried, one per line.
    ('not_an_archive', r'is not a readable archive \(ReadError: file could '
                       r'not be opened successfully\): the download'),
    ('cut_record', r'not a whole number of 3073-byte cifar10 records'),
])
def test_bad_cifar_source_is_one_error_line(tmp_path, case, message):
  data = ua.cifar_data('cifar10')
  src = tmp_path / 'src'
  src.mkdir()
  if case == 'truncated':
    source = truncated(ua.cifar_archive(src, 'cifar10', 'binary', data),
                       tmp_path)
  elif case == 'other_dataset':
    source = ua.cifar_archive(src, 'cifar100', 'binary',
                              ua.cifar_data('cifar100'))
  elif case == 'missing_split':
    files = ua.cifar_python_files('cifar10', data)
    del files['cifar-10-batches-py/test_batch']
    source = ua.extract(files, src)
  elif case == 'not_there':
    source = src / 'cifar-10-binary.tar.gz'
  elif case == 'not_an_archive':
    source = src / 'cifar-10-python.tar.gz'
    source.write_bytes(b'<html>404 Not Found</html>\n')
  else:
    files = ua.cifar_binary_files('cifar10', data)
    files['cifar-10-batches-bin/data_batch_3.bin'] = files[
        'cifar-10-batches-bin/data_batch_3.bin'][:-100]
    source = ua.extract(files, src)
  result = run_cli('cifar10', '--data_dir', tmp_path / 'data', '--source',
                   source)
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert __import__('re').search(message, lines[0]), lines[0]
  assert_nothing_readable(tmp_path / 'data', 'cifar10')


def test_bad_imagenet_sources(tmp_path):
  train, val = ua.imagenet_files()
  manual = ua.imagenet_tars(tmp_path / 'manual', train, val)
  os.remove(os.path.join(manual, 'ILSVRC2012_img_val.tar'))
  with pytest.raises(prepare_lib.PrepareError,
                     match=r"ILSVRC2012_img_val.tar is missing, so split "
                           r"'validation'"):
    prepare('imagenet2012', tmp_path / 'data', manual)
  manual = ua.imagenet_tars(tmp_path / 'manual2', train, val)
  train_tar = os.path.join(manual, 'ILSVRC2012_img_train.tar')
  data = open(train_tar, 'rb').read()
  with open(train_tar, 'wb') as f:
    f.write(data[:len(data) * 2 // 3])  # a download cut short
  with pytest.raises(prepare_lib.PrepareError,
                     match=r'ILSVRC2012_img_train.tar.* truncated'):
    prepare('imagenet2012', tmp_path / 'data', manual)
  with pytest.raises(prepare_lib.PrepareError, match='cannot be downloaded'):
    prepare('imagenet2012', tmp_path / 'data')
  assert_nothing_readable(tmp_path / 'data', 'imagenet2012')


def test_unwritable_data_dir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  archive = ua.cifar_archive(tmp_path, 'cifar10', 'binary',
                             ua.cifar_data('cifar10'))
  result = run_cli('cifar10', '--data_dir', blocker / 'data', '--source',
                   archive)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'error: --data_dir {blocker / "data"} is not writable (Not a '
      'directory); choose a folder you can write to, e.g. --data_dir '
      '~/tensorflow_datasets.']


def _mount_tmpfs(path, size):
  os.makedirs(path)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                           'tmpfs', str(path)], capture_output=True)
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {result.stderr!r}')


def test_full_disk_is_one_error_and_leaves_nothing(tmp_path):
  """A real full disk: a 600 KiB tmpfs for a ~1 MB dataset."""
  data = ua.cifar_data('cifar100', seed=1)
  labels, images = data['train']
  data['train'] = (np.tile(labels, (20, 1)), np.tile(images, (20, 1, 1, 1)))
  archive = ua.cifar_archive(tmp_path, 'cifar100', 'binary', data)
  disk = tmp_path / 'disk'
  _mount_tmpfs(disk, '600k')
  try:
    result = run_cli('cifar100', '--data_dir', disk, '--source', archive)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f'error: no space left on the disk of {disk}')
    assert_nothing_readable(disk, 'cifar100')
    assert os.listdir(disk) == [] or set(os.listdir(disk)) <= {'downloads'}
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def _wait_until_reading(proc, fifo, deadline):
  """The write end of `fifo`, opened once `proc` has opened it to read.

  Opening a FIFO to write without blocking fails (ENXIO) until a reader has
  it open, so this sees the exact moment prepare reaches the batch. Holding
  the write end open without writing keeps it blocked in read().
  """
  while True:
    try:
      return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
      if e.errno != errno.ENXIO:
        raise
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()  # never read the pipes of a live process: that would hang
      _, err = proc.communicate()
      pytest.fail(f'prepare never read the FIFO (exit {proc.returncode}):\n'
                  + err)
    time.sleep(0.05)


@pytest.mark.parametrize('how', [signal.SIGINT, signal.SIGTERM,
                                 signal.SIGKILL])
def test_interrupted_prepare_leaves_nothing_readable(tmp_path, how):
  """Stops prepare while it waits on a batch that never comes (a FIFO)."""
  data = ua.cifar_data('cifar10')
  files = ua.cifar_python_files('cifar10', data)
  root = ua.extract(files, tmp_path / 'src')
  fifo = os.path.join(root, 'cifar-10-batches-py', 'test_batch')
  os.remove(fifo)
  os.mkfifo(fifo)
  data_dir = tmp_path / 'data'
  proc = subprocess.Popen(
      [sys.executable, '-m', 'flax_resnet.data.prepare', 'cifar10',
       '--data_dir', str(data_dir), '--source', root, '--no_progress'],
      cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO,
                     'PYTHONFAULTHANDLER': '1'},  # a hang shows its stacks
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  writer = _wait_until_reading(proc, fifo, deadline=time.time() + 180)
  try:
    # It has opened the FIFO and blocks reading it: no import or setup is
    # left for the signal to land in.
    assert any(f.startswith('.prepare-cifar10') for f in os.listdir(data_dir))
    proc.send_signal(how)
    try:
      _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGABRT)  # faulthandler prints every stack
      pytest.fail(f'prepare did not stop within 60 s of signal {how}:\n'
                  + proc.communicate()[1])
  finally:
    os.close(writer)
  if how == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
    assert not tfds.builder('cifar10', data_dir=str(data_dir)).is_prepared()
    # The next prepare clears what the killed one left, and succeeds.
    os.remove(fifo)
    ua.extract({k: v for k, v in files.items() if k.endswith('test_batch')},
               root)
    prepare('cifar10', data_dir, root)
    check_cifar('cifar10', data_dir, data)
    assert not [f for f in os.listdir(data_dir) if f.startswith('.prepare')]
    return
  assert proc.returncode == 1, err
  assert err.strip().splitlines() == [
      f'error: interrupted ({"Ctrl-C" if how == signal.SIGINT else "signal 15"}'
      '); nothing was kept, run the same command again to prepare.']
  assert_nothing_readable(data_dir, 'cifar10')


def test_already_prepared_is_left_alone(tmp_path):
  data = ua.cifar_data('cifar10')
  archive = ua.cifar_archive(tmp_path, 'cifar10', 'binary', data)
  final = prepare('cifar10', tmp_path / 'data', archive)
  before = dataset_files(tmp_path / 'data', 'cifar10')
  messages = []
  assert prepare_lib.prepare('cifar10', str(tmp_path / 'data'), archive,
                             progress=False, log=messages.append) == final
  assert 'already prepared' in messages[0]
  assert dataset_files(tmp_path / 'data', 'cifar10') == before


def test_prepare_shows_a_progress_bar(tmp_path):
  archive = ua.cifar_archive(tmp_path, 'cifar10', 'binary',
                             ua.cifar_data('cifar10'))
  result = subprocess.run(
      [sys.executable, '-m', 'flax_resnet.data.prepare', 'cifar10',
       '--data_dir', str(tmp_path / 'data'), '--source', archive],
      cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'train: 100%' in result.stderr and '15/15' in result.stderr
  assert 'test: 100%' in result.stderr and '7/7' in result.stderr
  assert result.stdout.splitlines()[-1].startswith(
      'prepared cifar10: test 7, train 15 examples in ')


# ---------------------------------------------------------------------------
# Without TensorFlow

# Hides tensorflow as if it were not installed: every finder answers None
# for it, so `find_spec` (how etils/TFDS probe for it) and `import` both fail.
_NO_TF = '''
import sys
class _Hide:
  def __init__(self, finder):
    self._finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return None
    return self._finder.find_spec(name, path, target)
  def __getattr__(self, name):
    return getattr(self._finder, name)
sys.meta_path[:] = [_Hide(f) if hasattr(f, 'find_spec') else f
                    for f in sys.meta_path]
'''


def test_prepare_and_digits_need_no_tensorflow(tmp_path):
  train, val = ua.imagenet_files()
  manual = ua.imagenet_tars(tmp_path / 'manual', train, val)
  archive = ua.cifar_archive(tmp_path, 'cifar100', 'python',
                             ua.cifar_data('cifar100'))
  make_image_folder(tmp_path / 'pets')
  script = _NO_TF + f'''
try:
  import tensorflow
except ImportError:
  pass
else:
  raise AssertionError('tensorflow importable')
from flax_resnet.data.prepare import prepare
from flax_resnet import data
from configs import quickstart
prepare('cifar100', {str(tmp_path / 'd')!r}, {archive!r}, progress=False)
prepare('imagenet2012', {str(tmp_path / 'd')!r}, {manual!r}, progress=False)
prepare('pets', {str(tmp_path / 'd')!r}, {str(tmp_path / 'pets')!r},
        progress=False)
config = quickstart.get_config()
config.data_dir = {str(tmp_path / 'd')!r}
print(data.dataset_info(config))  # builds sklearn_digits
assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules
               if sys.modules[m] is not None), 'tensorflow was imported'
print('NO_TF_OK')
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO},
                          capture_output=True, text=True, timeout=300)
  assert 'NO_TF_OK' in result.stdout, result.stderr[-3000:]
  for name in ('cifar100', 'imagenet2012', 'pets', 'sklearn_digits'):
    assert tfds.builder(name, data_dir=str(tmp_path / 'd')).is_prepared()


def test_cifar_without_source_downloads_the_archive(tmp_path, monkeypatch):
  """The download path, served from 127.0.0.1 (no real network)."""
  import functools  # pylint: disable=g-import-not-at-top
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  data = ua.cifar_data('cifar10', seed=11)
  served = tmp_path / 'served'
  served.mkdir()
  ua.cifar_archive(served, 'cifar10', 'binary', data)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    monkeypatch.setitem(
        cifar_source.URLS, 'cifar10',
        f'http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz')
    prepare('cifar10', tmp_path / 'data')
  finally:
    server.shutdown()
  check_cifar('cifar10', tmp_path / 'data', data)
  # The download is kept for a later prepare.
  assert os.listdir(tmp_path / 'data' / 'downloads')


def test_a_builder_that_needs_tensorflow_names_the_extra(tmp_path):
  """TFDS's own builders encode numpy images with TF: say which extra."""
  script = _NO_TF + f'''
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

class FrNumpyImages(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('1.0.0')
  pkg_dir_path = epath.Path({str(tmp_path)!r})
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path({str(tmp_path)!r}) / 'x.py'
  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
        {{'image': tfds.features.Image(shape=(4, 4, 3)),
         'label': tfds.features.ClassLabel(num_classes=2)}}))
  def _split_generators(self, dl_manager):
    return {{'train': self._generate_examples()}}
  def _generate_examples(self):
    for i in range(2):
      yield i, {{'image': np.zeros((4, 4, 3), np.uint8), 'label': i}}

from flax_resnet.data import prepare
sys.exit(prepare.main(['fr_numpy_images', '--data_dir', {str(tmp_path / 'd')!r},
                       '--no_progress']))
'''
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: TFDS's fr_numpy_images builder needs "
                             'tensorflow'), lines[0]
  assert "pip install -e '.[build]'" in lines[0]
  assert not [f for f in os.listdir(tmp_path / 'd') if f != 'downloads']

"""The README's first command: the offline quickstart reaches >= 95 %."""

import pathlib

import pytest

from flax_resnet.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_95_percent_held_out(tmp_path):
  import configs.quickstart as quickstart
  config = quickstart.get_config()
  config.compilation_cache_dir = ''
  config.progress_bar = 'off'
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result.status == 'completed'
  # All 360 held-out digits are scored (the last eval batch is masked).
  assert result.eval_metrics['eval_examples'] == 360
  print(f"quickstart: eval top-1 {result.eval_metrics['eval_top1']:.4f} "
        f'in {result.seconds:.1f} s')
  # Not the README's 99.17 % (seed 0 on an Intel Xeon): float rounding differs
  # between CPU models and kernels, and with it the trajectory. Measured on an
  # Intel Xeon: seeds 0-7 with oneDNN's convolutions 98.33-99.44 %, seeds 0-3
  # with XLA's (FLAX_RESNET_ONEDNN=0) 98.61-99.44 % (seed 0: 98.89), seeds 0-1
  # with both held to AVX2 99.17 / 98.89 %. 95 % is 12 digits below the worst.
  assert result.eval_metrics['eval_top1'] >= 0.95


def run_in_terminal(args, columns, tmp_path, timeout=600):
  """Runs train.py in a pseudo-terminal `columns` wide; returns its output."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import pty  # pylint: disable=g-import-not-at-top
  import select  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import termios  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  del tmp_path
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, columns, 0,
                                                     0))
  env = {k: v for k, v in os.environ.items() if k != 'COLUMNS'}
  proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO,
                          env={**env, 'PYTHONPATH': str(REPO)}, stdin=slave,
                          stdout=slave, stderr=slave, start_new_session=True)
  os.close(slave)
  output, deadline = b'', time.time() + timeout
  while time.time() < deadline:
    ready, _, _ = select.select([master], [], [], 1.0)
    if not ready:
      if proc.poll() is not None:
        break
      continue
    try:
      chunk = os.read(master, 65536)
    except OSError:  # the terminal closed: the program has exited
      break
    if not chunk:
      break
    output += chunk
  os.close(master)
  return proc.wait(timeout=60), output.decode(errors='replace')


# absl's default: 'I1203 09:51:30.781724 140325148359552 loop.py:372] ...'
ABSL_PREFIX = r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\]'


@pytest.mark.slow
@pytest.mark.parametrize('columns', [100, 0])
def test_console_a_newcomer_reads(tmp_path, columns):
  """Compile message and time, eval lines of their own, no absl prefixes."""
  import re  # pylint: disable=g-import-not-at-top
  rc, out = run_in_terminal([
      '--config', 'tests/fault_config.py', '--workdir', str(tmp_path / 'run'),
      f'--config.data_dir={tmp_path / "data"}', '--config.progress_bar=auto',
      '--config.log_every_steps=4'], columns, tmp_path)
  assert rc == 0, out[-3000:]
  assert 'compiling the train step ...' in out
  assert re.search(r'compiled the train step in \d+\.\d s', out)
  assert not re.search(ABSL_PREFIX, out), out[-3000:]
  assert 'resource_tracker' not in out
  # Each eval line starts a line of its own (after the bar is cleared).
  lines = [line.strip() for line in re.split(r'[\r\n]', out)]
  evals = [line for line in lines if 'eval at step' in line]
  assert len(evals) == 2, out[-3000:]
  for line, step in zip(evals, (12, 24)):
    assert re.fullmatch(rf'(\d\d:\d\d:\d\d )?eval at step {step}: top1=\S+ '
                        r'top5=\S+ loss=\S+ \(360 examples, \d+\.\d s\)',
                        line), line
  assert not [line for line in lines if 'warning' in line.lower()], out
  if columns:
    assert re.search(r'\d+/24 \[', out)  # the bar
  else:  # a terminal reporting 0 columns gets the plain train lines
    assert re.search(r'step 24/24  loss=\S+ top1=\S+  eta 0:00:00', out)
    assert re.search(r'step 4/24  loss=\S+ top1=\S+  eta \d:\d\d:\d\d', out)
  assert '== completed at step 24/24' in out


@pytest.mark.slow
def test_worker_processes_leave_no_shared_memory_behind(tmp_path):
  """grain workers (train and each eval) are stopped before exit.

  Before they were closed, this run ended with "resource_tracker: There
  appear to be 2 leaked shared_memory objects" and waited on the workers.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, 'train.py', '--config', 'tests/fault_config.py',
       '--workdir', str(tmp_path / 'run'),
       f'--config.data_dir={tmp_path / "data"}', '--config.worker_count=2',
       '--config.eval_every_steps=6', '--config.eval_batch_size=40'],
      cwd=REPO, env={**__import__('os').environ, 'PYTHONPATH': str(REPO)},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '== completed at step 24/24' in result.stdout
  assert 'leaked' not in result.stderr and 'resource_tracker' not in (
      result.stderr), result.stderr[-3000:]


def train_help(*args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_help_exits_0_and_shows_the_config_a_bare_run_trains():
  """Was exit 1 with the schema's ImageNet/resnet50 defaults."""
  out = train_help('--help')
  assert out.returncode == 0, out.stderr[-2000:]
  assert ('Config fields as a run with configs/quickstart.py sets them '
          '(change one with --config.FIELD=VALUE):') in out.stdout
  assert "  model = 'resnet20'\n" in out.stdout
  assert "  dataset = 'sklearn_digits'\n" in out.stdout
  assert "'folder:ROOT' (your images, ROOT/train/CLASS/*.jpg)" in out.stdout
  assert '--workdir: Where checkpoints and metrics go' in out.stdout


def test_help_shows_the_given_config_and_overrides_wherever_it_stands():
  out = train_help('-h', '--config', 'configs/resnet50.py',
                   '--config.batch_size=128',
                   '--config.model_overrides.shortcut=C')
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'a run with configs/resnet50.py sets them' in out.stdout
  assert "  model = 'resnet50'\n" in out.stdout
  assert '  batch_size = 128\n' in out.stdout
  assert "  model_overrides.shortcut = 'C'\n" in out.stdout
  # A mistake in the flags is still one error line, help or not.
  out = train_help('--help', '--config.batch_sise=1')
  assert out.returncode == 1 and out.stderr.startswith('error: ')


def test_finished_workdir_message_names_final_and_best_eval(tmp_path):
  from flax_resnet.train import finished  # pylint: disable=g-import-not-at-top
  import configs.quickstart  # pylint: disable=g-import-not-at-top
  records = [{'step': 10, 'train_loss': 0.5},
             {'step': 10, 'eval_top1': 0.97, 'eval_top5': 1.0,
              'eval_loss': 0.11},
             {'step': 20, 'eval_top1': 0.95, 'eval_top5': 0.99,
              'eval_loss': 0.15}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(__import__('json').dumps(r) + '\n' for r in records) +
      '{"step": 2')  # a record cut short is skipped
  for step in (10, 18, 20):
    (tmp_path / 'checkpoints' / str(step)).mkdir(parents=True)
  config = configs.quickstart.get_config()
  assert finished.message(config, str(tmp_path), tmp_path / 'checkpoints',
                          19, 20) is None  # steps left: the usual summary
  text = finished.message(config, str(tmp_path), tmp_path / 'checkpoints',
                          20, 15)
  assert text.splitlines()[1:] == [
      f'== already completed: {tmp_path} was trained to step 20 (more than '
      'the 15 this config asks for) by an earlier run; nothing left to train '
      '==',
      'final eval: top1=0.9500 top5=0.9900 loss=0.1500 (step 20)',
      'best eval:  top1=0.9700 top5=1.0000 loss=0.1100 (step 10)',
      f'checkpoints: {tmp_path / "checkpoints"} (steps 10, 18, 20)',
      'To train longer, rerun with a larger --config.num_epochs (it resumes '
      'from step 20); to start over, pass another --workdir; to score the '
      f'weights: python -m flax_resnet.evaluate --weights {tmp_path}']


def test_an_extension_build_is_announced_once_and_a_cached_one_not(
    tmp_path, capsys):
  """The first run was silent for seconds while g++ built the extensions."""
  from flax_resnet import native  # pylint: disable=g-import-not-at-top
  built = []

  def build(path):
    built.append(path)
    with open(path, 'wb') as f:
      f.write(b'not a shared library')  # loading it fails: one warning

  def extension():
    return native.LazyLibrary('test widget', 'FLAX_RESNET_TEST_WIDGET',
                              'doing without', lambda: str(tmp_path / 'w.so'),
                              build, lambda library: None)

  assert extension().load() is None
  err = capsys.readouterr().err
  assert (f'flax_resnet: building the test widget extension (once; cached in '
          f'{tmp_path})') in err
  assert len(built) == 1
  assert extension().load() is None  # the file is there now: no build
  assert 'building' not in capsys.readouterr().err and len(built) == 1

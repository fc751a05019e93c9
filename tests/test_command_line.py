"""The read-only commands (predict, evaluate, pretrained, layout) at the
console: one-line usage errors, a prompt and quiet stop on SIGINT/SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import pytest

import inference_runs
import stop_handlers
from flax_resnet.data import builders, digits

USAGE_ERRORS = [
    ('flax_resnet.predict', ['x.png', '--weights', 'w', '--top', '0'],
     '--top'),
    ('flax_resnet.predict', ['x.png', '--weights', 'w', '--batch_size', '0'],
     '--batch_size'),
    ('flax_resnet.evaluate', [], '--weights'),
    ('flax_resnet.evaluate', ['--weights', 'w', '--threads', 'many'],
     '--threads'),
    ('flax_resnet.pretrained.__main__', ['--publisher', 'nobody'], '--publisher'),
    ('flax_resnet.layout_report', ['resnet50', '--size', '-1'], '--size'),
]


@pytest.mark.parametrize('module,argv,flag', USAGE_ERRORS)
def test_usage_error_is_one_line_naming_the_flag(capsys, module, argv, flag):
  main = __import__(module, fromlist=['main']).main
  with pytest.raises(SystemExit) as e:
    main(argv)
  out, err = capsys.readouterr()
  assert e.value.code == 2 and not out
  # Not argparse's usage block before the error.
  assert err.startswith('error: ') and err.count('\n') == 1, err
  assert flag in err and '--help' in err, err


def _start(argv):
  # A shell's background job ignores SIGINT; the command must get it as a
  # user's Ctrl-C delivers it.
  # (Set in a fresh interpreter that execs the command: a preexec_fn would
  # fork this multithreaded process.)
  command = [sys.executable, '-m', *map(str, argv)]
  return subprocess.Popen(
      [sys.executable, '-c', 'import os, signal, sys; '
       'signal.signal(signal.SIGINT, signal.SIG_DFL); '
       'os.execv(sys.argv[1], sys.argv[1:])', *command],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped(process, signum):
  process.send_signal(signum)
  sent = time.monotonic()
  out, err = process.communicate(timeout=60)
  return time.monotonic() - sent, out, err


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_while_importing_ends_at_once_without_traceback(tmp_path,
                                                                signum):
  # Before the handler, a SIGINT inside jax's import was swallowed by its gc
  # callback ("KeyboardInterrupt:" printed, the command ran on to the end) or
  # ended in a traceback.
  image = tmp_path / 'a.png'
  image.write_bytes(builders.png_bytes(digits.load_split('test')[0][0]))
  process = _start(['flax_resnet.predict', image, '--model', 'resnet20',
                    '--weights', tmp_path / 'w.pth'])
  stop_handlers.wait_for_stop_handler(process)
  seconds, out, err = _stopped(process, signum)
  assert process.returncode == 128 + signum, (out, err)
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
  assert f'stopped ({signal.Signals(signum).name})' in err
  assert seconds < 10


def test_sigint_while_scoring_ends_at_once_without_traceback():
  workdir, _ = inference_runs.digits_workdir()
  # Batches of one over the 1,437 training digits: seconds of scoring.
  process = _start(['flax_resnet.evaluate', '--weights', workdir,
                    '--split', 'train', '--batch_size', 1, '--threads', 1])
  header = process.stderr.readline()  # printed once the weights are loaded
  assert 'on sklearn_digits train' in header, header
  time.sleep(0.5)
  seconds, out, err = _stopped(process, signal.SIGINT)
  assert process.returncode == 130, (out, err)
  assert not out  # the scores were not printed: the split was cut short
  assert 'Traceback' not in err and 'stopped (SIGINT)' in err, err
  assert seconds < 10
  assert os.path.isdir(workdir / 'checkpoints')  # read-only: left as it was

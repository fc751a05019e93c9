"""Train a ResNet: python train.py --config configs/resnet50.py --workdir runs/r50

With no flags it trains the offline quickstart (real handwritten digits that
ship with scikit-learn) into runs/quickstart. Override any field with
--config.FIELD=VALUE, e.g. --config.batch_size=128 --config.model_overrides.shortcut=B.
Multi-host: pass --distributed on every host (see README); without a cluster
environment jax can discover, also --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (tests/test_faults.py runs two on one CPU).
"""

import logging as std_logging
import os
import pathlib
import signal
import sys


def _stop_before_training(signum, frame):
  """SIGTERM/SIGINT before the training loop takes them over: leave, exit 0.

  Nothing is open or written yet, so the process ends here and now: an
  exception raised into an import of a C extension (jaxlib's) aborts it.
  """
  del frame
  print(f'\nstopping early (signal {signum}) during startup: nothing trained '
        'yet, nothing to save.', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(0)  # pylint: disable=protected-access


if __name__ == '__main__':
  # From the first line on (imports take seconds); the loop installs its own
  # handlers for the run and gives these back after it.
  for _signal in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_signal, _stop_before_training)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))



def _fail(message: str):
  """A user error: one `error:` line (the message may go on), no traceback."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def _fail_on_flag_error(error: Exception, argv):
  """Exits with one `error:` line for a mistake in the flags or overrides."""
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: an override of a field the (locked) config lacks.
    from flax_resnet.train import config_check  # pylint: disable=g-import-not-at-top
    text = str(error)
    arg = next((a for a in argv if a.startswith('--config.') and
                a.split('=', 1)[0].split('.')[-1] in text), None)
    if arg is None:
      _fail(f'a --config override names no config field ({text[:200]}). '
            '`python train.py --help` lists every field.')
    name = arg.split('=', 1)[0][len('--config.'):]
    _fail(f'{arg}: config has no field {name!r}. '
          f'{config_check.suggest(name)}`python train.py --help` lists every '
          'field with its default and meaning.')
  text = str(error).strip()
  if isinstance(error, OSError) and 'Failed loading config file' in text:
    # ml_collections lists the paths it tried; the last line says why.
    text = text.splitlines()[-1].strip()
  _fail(f'{text}. `python train.py --help` lists every flag and config field.')


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError,
                OSError)

try:
  # Overrides on the command line are applied here, as the default is set.
  _CONFIG = config_flags.DEFINE_config_file(
      'config', str(pathlib.Path(__file__).resolve().parent / 'configs' /
                    'quickstart.py'),
      'Path to a config file in configs/; `--help` lists its fields.',
      lock_config=True)
except _FLAG_ERRORS as e:
  _fail_on_flag_error(e, sys.argv)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints and metrics go; a run resumes from it. '
    'Default: runs/<config file name>.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() first (multi-host).')
# Without a cluster environment (SLURM, TPU pods, ...) jax cannot discover the
# processes itself: name the coordinator and this process explicitly.
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'With --distributed: host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'With --distributed: how many processes in all.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'With --distributed: this process, 0..num_processes-1.')


# absl's own help flags exit 1, before --config is read, with the schema's
# ImageNet defaults; answered here instead, after the config has loaded.
_HELP_FLAGS = {'--help': True, '-help': True, '-h': True, '-?': True,
               '--helpshort': True, '-helpshort': True, '--helpfull': False,
               '-helpfull': False}


def _parse_flags(argv):
  """absl's parser, with config-override mistakes as one `error:` line."""
  asked = [_HELP_FLAGS[a] for a in argv[1:] if a in _HELP_FLAGS]
  try:
    rest = flags.FLAGS([a for a in argv if a not in _HELP_FLAGS])
  except _FLAG_ERRORS as e:
    _fail_on_flag_error(e, argv)
  if asked:
    _print_help(short=all(asked))
  return rest


def _print_help(short: bool):
  """The docstring, the fields of the config that would run, then the flags."""
  global __doc__
  _check_config_loaded()
  from flax_resnet.train.config import schema_help  # pylint: disable=g-import-not-at-top
  source = config_flags.get_config_filename(flags.FLAGS['config'])
  try:
    source = str(pathlib.Path(source).resolve().relative_to(pathlib.Path.cwd()))
  except ValueError:
    pass  # outside the current folder: the path as given
  __doc__ = f'{__doc__}\n{schema_help(_CONFIG.value, source)}\n'
  app.usage(shorthelp=short, writeto_stdout=True, exitcode=0)


def _check_process_flags():
  """Multi-host flags mean nothing without --distributed: refuse, not ignore."""
  given = [f'--{f.name}' for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)
           if f.present]
  if given and not _DISTRIBUTED.value:
    _fail(f'{", ".join(given)} only apply with --distributed; add '
          '--distributed to run multi-process, or drop them.')
  if _NUM_PROCESSES.value is not None and _NUM_PROCESSES.value < 1:
    _fail(f'--num_processes={_NUM_PROCESSES.value} must be at least 1.')
  if _PROCESS_ID.value is not None and not (
      0 <= _PROCESS_ID.value < (_NUM_PROCESSES.value or 2**31)):
    _fail(f'--process_id={_PROCESS_ID.value} must be in [0, '
          f'{_NUM_PROCESSES.value}) (0 .. --num_processes - 1).')
  if _WORKDIR.present and not (_WORKDIR.value or '').strip():
    _fail('--workdir is empty; give the folder for this run\'s checkpoints '
          'and metrics, e.g. --workdir runs/my_run (or leave the flag out for '
          'runs/<config name>).')


class _QuietLibraries(std_logging.Filter):
  """Orbax logs every save step at INFO through absl; keep its warnings only."""

  def filter(self, record):
    if 'has no dataset_info.json' in record.getMessage():
      return False  # TFDS, about a dataset that is about to be prepared
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname
        for part in ('/orbax/', '/grain/', '/jax/', '/tensorflow_datasets/'))


class _ReadableFormat(std_logging.Formatter):
  """'12:01:02 message' ('warning: ' before warnings) instead of absl's
  'I1203 12:01:02.123456 140325148359552 loop.py:372] message'."""

  def __init__(self):
    super().__init__('%(asctime)s %(message)s', datefmt='%H:%M:%S')

  def format(self, record):
    text = super().format(record)
    if record.levelno >= std_logging.WARNING:
      stamp, _, message = text.partition(' ')
      text = f'{stamp} {record.levelname.lower()}: {message}'
    return text


def _check_config_loaded():
  """ml_collections defers a config file it could not load to first use."""
  try:
    _CONFIG.value.keys()
  except OSError as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(f'--config {config_flags.get_config_filename(flags.FLAGS["config"])}'
          f': could not load it ({reason[-1]}); give a config file such as '
          'configs/quickstart.py (the configs/ folder lists them all).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _check_process_flags()
  _check_config_loaded()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().setFormatter(_ReadableFormat())
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  from flax_resnet import train  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import loop  # pylint: disable=g-import-not-at-top
  from flax_resnet.layout_check import LayoutMismatch  # pylint: disable=g-import-not-at-top
  from flax_resnet.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import InputWorkerError  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    # The persistent compilation cache must be on before the first compile,
    # and initialize() already compiles (its barrier).
    loop.enable_compilation_cache(_CONFIG.value.compilation_cache_dir)
    try:
      jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value,
                                 process_id=_PROCESS_ID.value)
    except (ValueError, RuntimeError) as e:
      # Typically no cluster environment jax can discover the processes from.
      _fail(f'--distributed: jax.distributed.initialize() failed '
            f'({str(e).strip().splitlines()[0][:300]}). Outside a cluster jax '
            'can discover (SLURM, TPU pods, ...), also pass '
            '--coordinator_address=HOST:PORT --num_processes=N '
            '--process_id=I (see README).')
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  workdir = _WORKDIR.value or str(
      pathlib.Path('runs') / pathlib.Path(config_file.split(':')[0]).stem)
  try:
    result = train.train_and_evaluate(_CONFIG.value, workdir)
    # Everything is saved: a signal now just ends the process (not with the
    # start-up handler's "nothing trained yet").
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
  except (ValueError, LayoutMismatch, CheckpointError,
          train.NonFiniteLossError, InputWorkerError) as e:
    print(f'\nerror: {e}', file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    if e.filename is None:
      raise  # not about a path the user gave: a bug, keep the traceback
    print(f'\nerror: {e.filename}: {e.strerror}; check that the path exists '
          'and is readable (config.data_dir, --workdir, config.init_from).',
          file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if result.status in ('completed', 'preempted') else 1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)

"""Train a ResNet: python train.py --config configs/resnet50.py --workdir runs/r50

With no flags it trains the offline quickstart (real handwritten digits that
ship with scikit-learn) into runs/quickstart. Override any field with
--config.FIELD=VALUE, e.g. --config.batch_size=128 --config.model_overrides.shortcut=B.
Multi-host: pass --distributed on every host (see README); without a cluster
environment jax can discover, also --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (tests/test_faults.py runs two on one CPU).
"""

import logging as std_logging
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(pathlib.Path(__file__).resolve().parent / 'configs' /
                  'quickstart.py'),
    'Path to a config file in configs/.', lock_config=True)
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().setFormatter(_ReadableFormat())
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  import jax  # pylint: disable=g-import-not-at-top
  from flax_resnet import train  # pylint: disable=g-import-not-at-top
  from flax_resnet.train import loop  # pylint: disable=g-import-not-at-top
  from flax_resnet.layout import LayoutMismatch  # pylint: disable=g-import-not-at-top
  from flax_resnet.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value:
    # The persistent compilation cache must be on before the first compile,
    # and initialize() already compiles (its barrier).
    loop.enable_compilation_cache(_CONFIG.value.compilation_cache_dir)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  workdir = _WORKDIR.value or str(
      pathlib.Path('runs') / pathlib.Path(config_file.split(':')[0]).stem)
  try:
    result = train.train_and_evaluate(_CONFIG.value, workdir)
  except (ValueError, LayoutMismatch, CheckpointError,
          train.NonFiniteLossError) as e:
    print(f'\nerror: {e}', file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if result.status in ('completed', 'preempted') else 1)


if __name__ == '__main__':
  app.run(main)

"""Tiny training workdirs for the predict/evaluate tests, made once a process.

digits_workdir(): resnet20 (one block a stage) on the offline digits, 6 steps,
  checkpoints and evals at steps 3 and 6.
run_model(): the model and variables of a workdir, read without
  flax_resnet.inference.
folder_workdir(): the same net on an image folder of three digit classes
  named 'one', 'seven', 'zero' (train/ and val/), 4 steps.
"""

import atexit
import functools
import pathlib
import shutil
import tempfile

import numpy as np

import flax_resnet
from flax_resnet.data import builders, digits
from flax_resnet.train import loop
from test_train_loop import digits_config, restore_final

FOLDER_CLASSES = {'one': 1, 'seven': 7, 'zero': 0}  # name: digit


def _scratch(prefix: str) -> pathlib.Path:
  path = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
  atexit.register(shutil.rmtree, path, True)
  return path


@functools.lru_cache(maxsize=None)
def digits_workdir():
  """(workdir, config) of a finished digits run."""
  workdir = _scratch('predict_digits_') / 'run'
  config = digits_config(num_train_steps=6, eval_every_steps=3,
                         checkpoint_every_steps=3)
  loop.train_and_evaluate(config, str(workdir))
  return workdir, config


def write_folder_dataset(root: pathlib.Path, per_class: dict[str, int]):
  """ROOT/{train,val}/NAME/*.png of the digit classes, from the digits'
  train and test splits; returns {split: [(path, digit)]}."""
  written = {}
  for split, source, count in (('train', 'train', per_class['train']),
                               ('val', 'test', per_class['val'])):
    images, labels = digits.load_split(source)
    written[split] = []
    for name, digit in FOLDER_CLASSES.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in np.flatnonzero(labels == digit)[:count]:
        path = folder / f'{i:04d}.png'
        path.write_bytes(builders.png_bytes(images[i]))
        written[split].append((path, digit))
  return written


@functools.lru_cache(maxsize=None)
def folder_workdir():
  """(workdir, config, dataset root) of a finished run on an image folder."""
  scratch = _scratch('predict_folder_')
  root = scratch / 'images'
  write_folder_dataset(root, {'train': 40, 'val': 7})
  workdir = scratch / 'run'
  config = digits_config(dataset=f'folder:{root}', num_classes=3,
                         train_split='train', eval_split='val',
                         num_train_steps=4, eval_every_steps=4,
                         checkpoint_every_steps=4, eval_batch_size=8)
  loop.train_and_evaluate(config, str(workdir))
  return workdir, config, root


def run_model(workdir, config):
  """(model, variables of the newest step, read straight from orbax)."""
  _, state = restore_final(workdir, config)
  model = flax_resnet.create_model(
      config.model, num_classes=config.num_classes,
      **{k: v for k, v in config.model_overrides.items() if v is not None})
  return model, {'params': state['params'], 'batch_stats': state['batch_stats']}


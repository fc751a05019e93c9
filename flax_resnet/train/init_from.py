"""config.init_from: find what it names, read it, check it fits and is finite.

It may name a weights file (any format `convert.load_weights` reads), an
http(s) URL or a registry tag (through `flax_resnet.pretrained`: cached,
checksummed downloads), a training workdir (its newest readable step), a
workdir's checkpoints folder or one step folder of it, or the folder that
`python -m flax_resnet.convert MODEL FILE OUT_DIR` writes. Every problem is a
ConfigError naming config.init_from, raised before the train step compiles.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config_check

log = logging.getLogger(__name__)

_URL_SCHEMES = ('http://', 'https://', 'file://')
# The tree's metadata file in a folder orbax wrote one item into
# (StandardCheckpointer); a training step's folder holds one per item below.
_ORBAX_TREE_METADATA = '_METADATA'
_ACCEPTED = ('a training workdir that holds checkpoints, a folder written by '
             'python -m flax_resnet.convert, a weights file '
             '(.pth/.safetensors/.params/.h5), an http(s) URL or a registry '
             'tag')


def _error(message: str) -> config_check.ConfigError:
  return config_check.ConfigError(f'config.init_from: {message}')


def _resolve(config) -> tuple[str, Optional[str]]:
  """(local path, the URL it was downloaded from or None)."""
  from flax_resnet import pretrained  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(config.init_from)
  if os.path.exists(path):
    return path, None
  try:
    local, entry = pretrained.resolve(config.model, config.init_from)
  except (pretrained.DownloadError, pretrained.ChecksumMismatch,
          pretrained.download.CachedFileDamaged) as e:
    raise _error(str(e)) from None
  except ValueError as e:
    if config.init_from.startswith(_URL_SCHEMES):
      raise _error(str(e)) from None  # a URL naming no file, a bad checksum
    tags = ', '.join(w.tag for w in pretrained.list_pretrained(config.model))
    raise _error(
        f'{path} does not exist; give a torchvision .pth/.safetensors file, a '
        'training workdir, a folder written by python -m flax_resnet.convert, '
        f'an http(s) URL or a registry tag ('
        f'{tags or "none registered for " + config.model}; python -m '
        'flax_resnet.pretrained lists them).') from None
  return str(local), entry.url if entry is not None else config.init_from


def _is_orbax_item(folder: pathlib.Path) -> bool:
  return (folder / _ORBAX_TREE_METADATA).is_file()


def _restore_item(folder: pathlib.Path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(folder)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [''])[0][:200]
    raise _error(
        f'{folder} is an orbax checkpoint that cannot be read ({reason}); '
        'write it again (python -m flax_resnet.convert ... --force) or give '
        'another source.') from e


def _read_folder(folder: pathlib.Path) -> tuple[Any, str]:
  """(the restored tree, where it came from) of any folder init_from takes."""
  for item in (folder, folder / 'state'):  # convert's output; a run's step
    if _is_orbax_item(item):
      log.info('initial weights from the checkpoint in %s', item)
      return _restore_item(item), str(item)
  ckpt_dir = folder / 'checkpoints'
  if not ckpt_dir.is_dir():
    ckpt_dir = folder  # the checkpoints folder itself
  mgr = checkpoint_lib.Checkpointer(ckpt_dir, keep=1000, keep_best=False)
  try:
    restored, step = mgr.restore_newest_readable()
  except checkpoint_lib.CheckpointError as e:
    raise _error(f'{e}; give {_ACCEPTED}.') from None
  finally:
    mgr.close()
  log.info('initial weights from checkpoint step %d in %s', step, ckpt_dir)
  return restored, f'{ckpt_dir} step {step}'


def _variables_of(tree, where: str) -> dict[str, Any]:
  if not (hasattr(tree, 'get') and 'params' in tree):
    keys = ', '.join(map(str, tree)) if hasattr(tree, 'keys') else type(
        tree).__name__
    raise _error(f'{where} holds no Flax params (it holds {keys}); give '
                 f'{_ACCEPTED}.')
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {})}


def _read_file(path: str, config, spec, downloaded_from: Optional[str]):
  from flax_resnet import convert  # pylint: disable=g-import-not-at-top
  cached = (f' It is the cached download of {downloaded_from}: delete it to '
            'download again.' if downloaded_from else '')
  try:
    return convert.load_weights(path, spec,
                                skip_head=config.init_from_skip_head)
  except convert.StateDictMismatch as e:
    raise _error(
        f'{path} does not fit model {config.model!r} '
        '(config.init_from_skip_head=True loads all but the classifier):\n'
        f'{str(e).removeprefix(f"{path}: ")}') from e
  except convert.NonFiniteWeights as e:
    raise _error(f'{e}{cached}') from None
  except Exception as e:  # pylint: disable=broad-except
    # torch / safetensors errors on a file that is not a state_dict at all;
    # their first sentence only (torch goes on to suggest unpickling it).
    reason = str(e).strip().split('\n')[0].split('. ')[0][:150]
    raise _error(
        f'{path} is not a readable state_dict ({type(e).__name__}: '
        f'{reason}); give a torchvision .pth/.safetensors file or a training '
        f'workdir.{cached}') from e


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fitted(reference, loaded, collection: str, config, where: str):
  """`loaded` in the structure, shapes and dtypes of `reference`, or raises."""
  want, got = _flat(reference), _flat(loaded)
  problems = [f'{collection}{k} missing' for k in sorted(set(want) - set(got))]
  problems += [f'{collection}{k} unexpected' for k in sorted(
      set(got) - set(want))]
  problems += [f'{collection}{k}: got {tuple(got[k].shape)}, expected '
               f'{tuple(want[k].shape)}' for k in sorted(set(want) & set(got))
               if tuple(got[k].shape) != tuple(want[k].shape)]
  if problems:
    more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
    raise _error(
        f'{where} does not fit model {config.model!r}: '
        f'{"; ".join(problems[:5])}{more}. Set init_from_skip_head=True if '
        'only the classifier differs, or give weights of this model.')
  return jax.tree_util.tree_map_with_path(
      lambda path, ref: jnp.asarray(got[jax.tree_util.keystr(path)],
                                    ref.dtype), reference)


def load_init_weights(config, spec, state):
  """`state` with params and batch_stats from config.init_from."""
  from flax_resnet.convert import weights  # pylint: disable=g-import-not-at-top
  path, downloaded_from = _resolve(config)
  if os.path.isdir(path):
    tree, where = _read_folder(pathlib.Path(path))
    variables = _variables_of(tree, where)
    problem = weights.nonfinite_problem(_flat(variables).items()) or (
        weights.negative_variance_problem(variables['batch_stats']))
    if problem:
      raise _error(
          f'{where}: {problem}. It was saved from a run that diverged or is '
          'damaged; give an earlier checkpoint.')
  else:
    where = path
    variables = _read_file(path, config, spec, downloaded_from)
    log.info('initial weights from %s', path)
  params = dict(variables['params'])
  if config.init_from_skip_head:
    params['fc'] = state.params['fc']
  return state.replace(
      params=_fitted(state.params, params, 'params', config, where),
      batch_stats=_fitted(state.batch_stats, variables['batch_stats'],
                          'batch_stats', config, where))

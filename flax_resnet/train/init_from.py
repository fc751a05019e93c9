"""config.init_from: find what it names, read it, check it fits and is finite.

It may name a weights file (any format `convert.load_weights` reads), an
http(s) URL or a registry tag (through `flax_resnet.pretrained`: cached,
checksummed downloads), a training workdir (its newest readable step), a
workdir's checkpoints folder or one step folder of it, or the folder that
`python -m flax_resnet.convert MODEL FILE OUT_DIR` writes. Every problem is a
ConfigError naming config.init_from, raised before the train step compiles.

Before anything compiles, `check_preprocessing` refuses weights whose
publisher (a registry tag) or source run (a workdir) normalised inputs
otherwise than this config; `provenance` is what the checkpoints record as
their origin.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_resnet.train import checkpoint as checkpoint_lib
from flax_resnet.train import config as config_lib
from flax_resnet.train import config_check

log = logging.getLogger(__name__)

# Normalisations whose outputs differ by at most this (about one grey level
# over a std of 58) count as the same: TF's ImageNet mean_rgb (123.68, 116.78,
# 103.94) and std (58.393, 57.12, 57.375) differ from torchvision's by 0.009;
# a mean of 128 with torchvision's std by 0.43, Keras' [-1, 1] by 1.64.
MAX_INPUT_DIFFERENCE = 0.02
# The checkpoint metadata's key for `provenance(config)`.
PROVENANCE_KEY = 'initialised_from'
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
    # torch / safetensors errors on a file that is not a state_dict at all.
    raise _error(
        f'{path} is not a readable state_dict '
        f'({convert.unreadable_reason(e)}); give a torchvision '
        f'.pth/.safetensors file or a training workdir.{cached}') from e


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


def registry_entry(config):
  """The registry entry config.init_from names as a tag, else None.

  Only looks it up: nothing is downloaded.
  """
  from flax_resnet import pretrained  # pylint: disable=g-import-not-at-top
  value = config_check.init_from(config)
  if value is None or os.path.exists(os.path.expanduser(value)):
    return None
  return pretrained._registry_entry(config.model, value)  # pylint: disable=protected-access


def _source_run_meta(path: pathlib.Path) -> Optional[dict[str, Any]]:
  """The metadata of the newest readable step of a workdir, its checkpoints
  folder or one step folder; None for any other folder."""
  steps = [path] if (path / 'meta').is_dir() else [
      step for folder in (path / 'checkpoints', path) if folder.is_dir()
      for step in folder.iterdir()
      if step.name.isdigit() and (step / 'meta').is_dir()]
  for step in sorted(steps, key=lambda p: int(p.name), reverse=True):
    try:
      meta = checkpoint_lib.load_meta(step.parent, int(step.name))
    except (OSError, ValueError):
      continue  # a damaged step: loading falls back the same way
    if isinstance(meta, dict):
      return meta
  return None


def _source_run_config(path: pathlib.Path):
  """The training config saved with a source run's newest step, or None."""
  meta = _source_run_meta(path)
  try:
    saved = meta['config']
    config = config_lib.default_config()
    config.update(json.loads(saved) if isinstance(saved, str) else saved)
    return config
  except (KeyError, TypeError, ValueError, AttributeError):
    return None


def provenance(config) -> Optional[dict[str, str]]:
  """Where config.init_from's weights come from, for the checkpoint metadata:
  the publisher, model and tag of a registry entry, the URL, or the absolute
  path (and what a source run was itself initialised from). None without
  init_from. Only looks up: nothing is downloaded."""
  value = config_check.init_from(config)
  if value is None:
    return None
  entry = registry_entry(config)
  if entry is not None:
    return {'init_from': value, 'publisher': entry.publisher,
            'preset': entry.preset, 'tag': entry.tag, 'url': entry.url}
  path = pathlib.Path(os.path.expanduser(value))
  if not path.exists():
    return {'init_from': value}  # a URL
  record = {'init_from': value, 'path': str(path.resolve())}
  source = _source_run_meta(path) if path.is_dir() else None
  if source and isinstance(source.get(PROVENANCE_KEY), dict):
    record['source_initialised_from'] = describe_provenance(
        source[PROVENANCE_KEY])
  return record


def describe_provenance(record: dict[str, str]) -> str:
  """'torchvision resnet50 IMAGENET1K_V2', a URL or a path, for headers."""
  if 'tag' in record:
    text = f'{record["publisher"]} {record["preset"]} {record["tag"]}'
  else:
    text = record.get('path', record.get('init_from', '?'))
  if 'source_initialised_from' in record:
    text += f' (itself initialised from {record["source_initialised_from"]})'
  return text


def origin_of_run(meta: dict[str, Any], config) -> Optional[str]:
  """What a saved run was initialised from (describe_provenance), from its
  checkpoint metadata, or its config.init_from for runs saved before the
  metadata recorded it; None for a run that started from random weights."""
  record = meta.get(PROVENANCE_KEY)
  if isinstance(record, dict):
    return describe_provenance(record)
  return config_check.init_from(config)


def _source_transform(config):
  """(the eval transform the init_from weights were trained or published
  with, words naming them), or None when unknown (a file, a URL)."""
  from flax_resnet.pretrained import transforms  # pylint: disable=g-import-not-at-top
  entry = registry_entry(config)
  if entry is not None:
    if entry.transform is None:
      return None
    return entry.transform, f'{entry.publisher} {entry.preset} {entry.tag}'
  path = pathlib.Path(os.path.expanduser(config.init_from))
  if not path.is_dir():
    return None
  source_config = _source_run_config(path)
  if source_config is None:
    return None
  return transforms.from_config(source_config), f'the run in {path}'


def _normalisation(transform) -> dict[str, Any]:
  """A transform's normalisation as config fields: channel_order, and
  mean_rgb / std_rgb on the 0..255 scale in R, G, B order."""
  order = slice(None, None, -1 if transform.channels == 'BGR' else 1)
  return {
      'mean_rgb': tuple(m * transform.scale for m in transform.mean)[order],
      'std_rgb': tuple(s * transform.scale for s in transform.std)[order],
      'channel_order': transform.channels}


def _input_difference(want: dict[str, Any], have: dict[str, Any]) -> float:
  """Largest |difference| of two normalisations' outputs over pixel values
  0..255 and channels (affine per channel: the extremes are at 0 and 255)."""
  if want['channel_order'] != have['channel_order']:
    return math.inf
  pixels = np.array([[0.0], [255.0]])
  outputs = [(pixels - np.asarray(n['mean_rgb'])) / np.asarray(n['std_rgb'])
             for n in (want, have)]
  return float(np.abs(outputs[0] - outputs[1]).max())


def _same(want, have) -> bool:
  if isinstance(want, str):
    return want == have
  return bool(np.allclose(want, have, rtol=1e-4, atol=1e-6))


def _value(value) -> str:
  if isinstance(value, str):
    return value
  return f'({",".join(f"{v:.6g}" for v in value)})'


def _flag(field: str, value) -> str:
  """The flag, quoted for a shell where the value has parentheses."""
  text = _value(value)
  return f"--config.{field}='{text}'" if '(' in text else (
      f'--config.{field}={text}')


def check_preprocessing(config) -> None:
  """Refuses init_from weights trained on differently normalised inputs.

  Published weights (a registry tag with a known transform) and a training
  workdir (its saved config) state the normalisation they were trained with;
  fine-tuning them on inputs of another mean, scale or channel order starts
  from features that no longer fit. Raises ConfigError naming the fields and
  the flags that match, unless config.init_from_check_preprocessing is False.
  Resize and crop may differ (a legitimate choice): they are logged.
  """
  from flax_resnet.pretrained import transforms  # pylint: disable=g-import-not-at-top
  if config_check.init_from(config) is None:
    return
  source = _source_transform(config)
  if source is None:
    return
  source_transform, name = source
  run_transform = transforms.from_config(config)
  log.info('config.init_from: %s evaluates with %s; this run evaluates with '
           '%s', name, source_transform.describe(), run_transform.describe())
  want, have = _normalisation(source_transform), _normalisation(run_transform)
  if _input_difference(want, have) <= MAX_INPUT_DIFFERENCE:
    return
  differ = [field for field in want
            if not _same(want[field], have[field])] or list(want)
  stated = ', '.join(f'{field} {_value(want[field])}' for field in differ)
  yours = ', '.join(f'{field} {_value(have[field])}' for field in differ)
  if not config.init_from_check_preprocessing:
    log.warning('config.init_from: %s expects inputs normalised with %s; '
                'this run uses %s (kept: init_from_check_preprocessing is '
                'False).', name, stated, yours)
    return
  flags = ' '.join(_flag(field, want[field]) for field in differ)
  raise _error(
      f'{name} was trained on inputs normalised with {stated}, but this '
      f'config normalises with {yours}, so fine-tuning would start from '
      f'features of other inputs. Pass {flags} (0..255 scale, R, G, B order), '
      'or --config.init_from_check_preprocessing=False to keep yours.')


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

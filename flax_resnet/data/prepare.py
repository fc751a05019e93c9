"""Prepare a dataset for training: TFDS array_record files, no TF or Beam.

  python -m flax_resnet.data.prepare cifar10 --data_dir ~/tensorflow_datasets
      [--source cifar-10-python.tar.gz]
  python -m flax_resnet.data.prepare imagenet2012 --data_dir DIR
      --source FOLDER_WITH_THE_TWO_ILSVRC2012_TARS
  python -m flax_resnet.data.prepare my_photos --data_dir DIR --source ROOT
      (ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg)
  python -m flax_resnet.data.prepare mnist --data_dir DIR
      (downloaded and built by TFDS's own builder; most need the `build`
      extra, i.e. TensorFlow)

`--source` takes what users have: CIFAR's binary or python archives or
torchvision's extracted folders, ImageNet's two tars, an image folder. Without
it, TFDS downloads as `tfds build` would. The result is the dataset TFDS's
own builder writes (same name, version, splits, label names, pixels), read in
training by `tfds.data_source` + grain.

Nothing half-written is ever where training looks: the dataset is written to
DATA_DIR/.prepare-NAME-PID/ and moved to DATA_DIR/NAME/VERSION/ in one rename
when complete. An error, Ctrl-C or SIGTERM removes the temporary folder; one
left by SIGKILL is removed by the next prepare.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import time
from typing import Optional

from flax_resnet.data import cifar_source
from flax_resnet.data import image_folder
from flax_resnet.data import images
from flax_resnet.data import names
from flax_resnet.data.cifar_source import SourceError

FILE_FORMAT = 'array_record'  # the TFDS format with random access
# TFDS datasets prepare builds from --source; any other name with --source is
# a new dataset made from an image folder.
_FROM_SOURCE = (*cifar_source.LAYOUTS, 'imagenet2012')
_STAGING = '.prepare-'


class PrepareError(Exception):
  """A prepare that cannot go on; the message is the whole story."""


def command(name: str, data_dir: Optional[str] = None,
            source: Optional[str] = None) -> str:
  """The shell command that prepares `name` (for error messages)."""
  parts = ['python -m flax_resnet.data.prepare', name]
  if data_dir:
    parts += ['--data_dir', data_dir]
  if source:
    parts += ['--source', source]
  return ' '.join(parts)


def prepare(name: str, data_dir: Optional[str] = None,
            source: Optional[str] = None, *, progress: bool = True,
            log=print) -> str:
  """Writes TFDS dataset `name` into data_dir (array_record); returns its dir.

  Args:
    name: 'cifar10', 'cifar100', 'imagenet2012', any TFDS image dataset, or a
      new name for an image folder given as `source`; 'folder:ROOT' means
      name = basename of ROOT, source = ROOT.
    data_dir: the TFDS data directory; None for TFDS's default.
    source: what to build from (see the module doc); None downloads.
    progress: show a progress bar while writing.
    log: where the few status lines go.

  Raises:
    PrepareError: with a one-line reason and the fix.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if image_folder.is_folder_dataset(name):
    source = image_folder.root_of(name)
    name = _folder_dataset_name(source)
  from_folder = source is not None and name not in _FROM_SOURCE
  problem = (names.new_name_error if from_folder else names.tfds_name_error)(
      name)
  if problem:
    raise PrepareError(problem)
  # Real paths: what is written, and what is read, is decided on them.
  data_dir = os.path.realpath(os.path.expanduser(
      data_dir or tfds.core.constants.DATA_DIR))
  if from_folder and image_folder.looks_like_image_folder(source):
    _check_apart(os.path.realpath(os.path.expanduser(source)), data_dir,
                 name)
  _check_writable(data_dir)
  _remove_stale_staging(data_dir, log)
  staging = os.path.join(data_dir, f'{_STAGING}{name}-{os.getpid()}')
  started = time.time()
  with _cleanup_on_exit(staging), _Bars(enabled=progress) as bars:
    try:
      builder = _make_builder(name, source, staging, data_dir)
      final = os.path.join(data_dir, os.path.relpath(builder.data_dir,
                                                     staging))
      _check_inside(final, data_dir)
      if os.path.exists(os.path.join(final, 'dataset_info.json')):
        log(f'{name} is already prepared in {final}; nothing to do (delete '
            'that folder to prepare it again).')
        return final
      origin = (f' from {images.printable(source)}' if source else
                f' from {builder.ORIGIN}' if hasattr(builder, 'ORIGIN') else
                ' (downloading)')
      log(f'preparing {name} {builder.version} into {final}{origin}')
      builder.progress = bars.update
      _download_and_prepare(builder, data_dir, progress)
      bars.close()
      os.makedirs(os.path.dirname(final), exist_ok=True)
      os.rename(builder.data_dir, final)  # atomic: complete or absent
    except PrepareError:
      raise
    except SourceError as e:
      raise PrepareError(str(e)) from e
    except OSError as e:
      raise _os_error(e, data_dir, name) from e
    except Exception as e:  # pylint: disable=broad-except
      full = _disk_full(data_dir)
      if full:
        raise PrepareError(full) from e
      raise
  counts = ', '.join(f'{split} {info.num_examples:,}' for split, info in
                     sorted(builder.info.splits.items()))
  log(f'prepared {name}: {counts} examples in {time.time() - started:.1f} s '
      f'-> {final}')
  return final


def _folder_dataset_name(root: str) -> str:
  """A dataset name (see names.py) from the folder's name, e.g. 'My Pets'
  -> 'my_pets', '2024' -> 'folder_2024'."""
  import re  # pylint: disable=g-import-not-at-top
  base = os.path.basename(os.path.normpath(root)).lower()
  name = re.sub(r'[^a-z0-9_]+', '_', base).strip('_') or 'image_folder'
  return name if name[0].isalpha() else f'folder_{name}'


def _check_apart(source: str, data_dir: str, name: str) -> None:
  """Refuses a --data_dir inside the image folder, or the folder inside
  what prepare writes: one would be read into (or written over) the other."""
  if _is_within(data_dir, source):
    raise PrepareError(
        f'--data_dir {images.printable(data_dir)} is inside --source '
        f'{images.printable(source)}: the prepared files (and downloads/) '
        'would land among your images and be read as splits or classes the '
        'next time. Choose a --data_dir outside the image folder.')
  for written in (os.path.join(data_dir, name),
                  os.path.join(data_dir, 'downloads')):
    if _is_within(source, written):
      raise PrepareError(
          f'--source {images.printable(source)} is inside '
          f'{images.printable(written)}, which prepare writes; move the '
          'image folder elsewhere or choose another --data_dir.')
  if (_is_within(source, data_dir)
      and os.path.relpath(source, data_dir).startswith(_STAGING)):
    raise PrepareError(
        f'--source {images.printable(source)} is a staging folder of an '
        'interrupted prepare, which prepare removes; give the original image '
        'folder.')


def _is_within(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_inside(path: str, data_dir: str) -> None:
  """Nothing is ever written outside --data_dir (a bug if it would be)."""
  if not _is_within(os.path.normpath(path), data_dir):
    raise PrepareError(
        f'{images.printable(path)} is outside --data_dir '
        f'{images.printable(data_dir)}; refusing to write there (please '
        'report this).')


def _make_builder(name, source, staging, data_dir):
  """The TFDS builder writing `name` into `staging`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import builders  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import imagenet_source  # pylint: disable=g-import-not-at-top
  kwargs = {'data_dir': staging, 'file_format': FILE_FORMAT}
  if name in cifar_source.LAYOUTS:
    if source is None:
      source = _download_cifar(name, data_dir)
    return builders.cifar_builder(name, cifar_source.CifarSource(name, source),
                                  **kwargs)
  if name == 'imagenet2012':
    if source is None:
      raise PrepareError(
          'imagenet2012 cannot be downloaded automatically: get '
          'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
          'https://image-net.org/download-images, put them in one folder, '
          f'then run: {command(name, data_dir, "FOLDER")}')
    return builders.imagenet_builder(
        imagenet_source.ImagenetSource(source), **kwargs)
  if source is not None:
    if not image_folder.looks_like_image_folder(source):
      known = ' (cifar10, cifar100, imagenet2012 take --source)'
      raise PrepareError(
          f'--source {source} is not an image folder (ROOT/train/CLASS/*.jpg)'
          f' and {name!r} is not a dataset prepare reads from a source'
          f'{known}. Leave out --source to download {name} with TFDS.')
    if name in tfds.list_builders(with_community_datasets=False):
      raise PrepareError(
          f'{name!r} is the name of a TFDS dataset; give your image folder '
          'another name, e.g. my_' + name)
    folder = image_folder.ImageFolder(source)
    bad = [p for split in folder.splits for p in folder.unreadable(split)]
    if bad:
      shown = '; '.join(bad[:5]) + (f'; and {len(bad) - 5} more'
                                    if len(bad) > 5 else '')
      raise PrepareError(f'{len(bad)} unreadable image(s) in {source}: '
                         f'{shown}. Fix or remove them, then run again.')
    return builders.image_folder_builder(name, folder, **kwargs)
  return _registered_builder(name, kwargs)


def _download_cifar(name: str, data_dir: str) -> str:
  """TFDS downloads the binary archive (checksum-verified); its path."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  manager = tfds.download.DownloadManager(
      download_dir=os.path.join(data_dir, 'downloads'), dataset_name=name,
      url_infos=getattr(tfds.builder_cls(name), 'url_infos', None))
  return os.fspath(manager.download(cifar_source.URLS[name]))


def _registered_builder(name, kwargs):
  """TFDS's own builder of `name` (downloads); needs what that builder needs."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise PrepareError(
        f'{name!r} is not a TFDS dataset; use cifar10, cifar100, '
        'imagenet2012, a name from tfds.list_builders(), or a new name with '
        '--source ROOT for your own ROOT/train/CLASS/*.jpg folder.') from e
  features = builder.info.features
  if not all(k in features for k in ('image', 'label')):
    raise PrepareError(
        f'{name!r} has features {sorted(features.keys())}; training reads '
        '"image" and "label", so choose an image-classification dataset.')
  builder.progress = None
  return builder


def _download_and_prepare(builder, data_dir, progress):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from flax_resnet.data import builders  # pylint: disable=g-import-not-at-top
  config = tfds.download.DownloadConfig(
      # Statistics are computed with TensorFlow; training does not use them.
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
      # Build here, never fetch TFDS's pre-built (TFRecord) copy.
      try_download_gcs=False)
  if isinstance(builder, builders.QuietBuilder) or not progress:
    tfds.disable_progress_bar()  # ours shows the examples with their total
  try:
    builder.download_and_prepare(
        file_format=FILE_FORMAT, download_config=config,
        # Downloads outlive a failed or interrupted prepare.
        download_dir=os.path.join(data_dir, 'downloads'))
  except Exception as e:  # pylint: disable=broad-except
    missing = _missing_module(e)
    if missing not in _EXTRAS:
      raise
    raise PrepareError(
        f"TFDS's {builder.name} builder needs {missing} to prepare "
        f'{builder.name}; install {_EXTRAS[missing]} (cifar10, cifar100, '
        'imagenet2012 and image folders need neither).') from e


# Optional packages some TFDS builders need, and how to install them.
_EXTRAS = {'tensorflow': "the `build` extra: pip install -e '.[build]'",
           'apache_beam': 'Apache Beam: pip install apache-beam'}


def _missing_module(error: BaseException) -> Optional[str]:
  """The top-level module whose absence caused `error` (TFDS re-wraps it)."""
  import re  # pylint: disable=g-import-not-at-top
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, ModuleNotFoundError) and error.name:
      return error.name.split('.')[0]
    match = re.search(r"No module named '([\w.]+)'", str(error))
    if match:
      return match.group(1).split('.')[0]
    error = error.__cause__ or error.__context__
  return None


# ---------------------------------------------------------------------------
# Safety: writable target, full disk, interruption, stale staging folders.


def _check_writable(data_dir: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
    probe = os.path.join(data_dir, f'{_STAGING}probe-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise PrepareError(
        f'--data_dir {data_dir} is not writable ({e.strerror}); choose a '
        'folder you can write to, e.g. --data_dir ~/tensorflow_datasets.'
    ) from e


def _os_error(e: OSError, data_dir: str, name: str) -> PrepareError:
  full = _disk_full(data_dir) if e.errno != errno.ENOSPC else (
      f'no space left on the disk of {data_dir} while writing {name} '
      f'({e.filename or ""}); nothing was kept. Free some space or choose '
      'another --data_dir, then run again.')
  if full:
    return PrepareError(full)
  where = f' ({e.filename})' if e.filename else ''
  return PrepareError(f'{e.strerror or e}{where} while preparing {name}; '
                      'nothing was kept.')


def _disk_full(data_dir: str) -> Optional[str]:
  """A message if data_dir's disk is (nearly) full, else None."""
  try:
    free = shutil.disk_usage(data_dir).free
  except OSError:
    return None
  if free > 1 << 20:
    return None
  return (f'no space left on the disk of {data_dir} ({free:,} bytes free); '
          'nothing was kept. Free some space or choose another --data_dir, '
          'then run again.')


def _remove_stale_staging(data_dir: str, log) -> None:
  """Staging folders of prepares that died (SIGKILL, power loss)."""
  for entry in os.listdir(data_dir):
    if not entry.startswith(_STAGING) or entry.startswith(_STAGING + 'probe'):
      continue
    pid = entry.rsplit('-', 1)[-1]
    if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
      continue
    shutil.rmtree(os.path.join(data_dir, entry), ignore_errors=True)
    log(f'removed {os.path.join(data_dir, entry)}, left by an interrupted '
        'prepare')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Interrupted(Exception):
  pass


@contextlib.contextmanager
def _cleanup_on_exit(staging: str):
  """Removes `staging` however the block ends; SIGTERM ends it like Ctrl-C."""
  previous = None

  def on_sigterm(signum, frame):
    del frame
    raise Interrupted(f'signal {signum}')

  try:
    previous = signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not the main thread
    pass
  try:
    yield
  except (KeyboardInterrupt, Interrupted) as e:
    raise PrepareError(
        f'interrupted ({"Ctrl-C" if isinstance(e, KeyboardInterrupt) else e})'
        '; nothing was kept, run the same command again to prepare.') from e
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    shutil.rmtree(staging, ignore_errors=True)


class _Bars:
  """One tqdm bar per split, fed by the builders' progress callbacks."""

  def __init__(self, enabled: bool):
    self._enabled = enabled
    self._bars = {}

  def __enter__(self):
    return self

  def update(self, split: str, done: int, total: Optional[int]):
    if not self._enabled:
      return
    bar = self._bars.get(split)
    if bar is None:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      for other in self._bars.values():
        other.close()
      bar = self._bars[split] = tqdm(
          total=total, desc=f'{split}', unit=' img', dynamic_ncols=True,
          mininterval=0.5, file=sys.stderr)
    bar.update(done - bar.n)

  def close(self):
    for bar in self._bars.values():
      bar.close()
    self._bars = {}

  def __exit__(self, *exc):
    self.close()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m flax_resnet.data.prepare',
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
  parser.add_argument('name', help='cifar10, cifar100, imagenet2012, any TFDS '
                      'image dataset, a new name for your image folder, or '
                      'folder:ROOT')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data directory (default ~/tensorflow_datasets'
                      '); the same as config.data_dir')
  parser.add_argument('--source', default=None,
                      help='what you have on disk (archive, folder); without '
                      'it TFDS downloads the dataset')
  parser.add_argument('--no_progress', action='store_true',
                      help='no progress bar')
  args = parser.parse_args(argv)
  try:
    prepare(args.name, args.data_dir, args.source,
            progress=not args.no_progress)
  except PrepareError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())

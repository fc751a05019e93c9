"""Tiny datasets in the exact upstream on-disk formats (for the prepare tests).

CIFAR: https://www.cs.toronto.edu/~kriz/cifar.html. The binary archives hold
records <label bytes><1024 R><1024 G><1024 B>; the python archives hold
batches pickled by Python 2 (str keys and data, protocol 2), written here with
Python 2's own opcodes so the files load exactly as the real ones do.
ImageNet: ILSVRC2012_img_train.tar is a tar of per-synset tars of JPEGs,
ILSVRC2012_img_val.tar a flat tar of ILSVRC2012_val_%08d.JPEG.
"""

import io
import os
import pickle
import struct
import tarfile

import numpy as np
from PIL import Image

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                 'frog', 'horse', 'ship', 'truck']
CIFAR100_COARSE = [f'coarse_{i}' for i in range(20)]
CIFAR100_FINE = [f'fine_{i:02d}' for i in range(100)]
# Examples per file: 5 train batches and one test batch (CIFAR-10), one train
# and one test file (CIFAR-100).
CIFAR10_PER_BATCH, CIFAR10_TEST = 3, 7
CIFAR100_TRAIN, CIFAR100_TEST = 17, 9


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes bytes as Python 2 str (SHORT_BINSTRING/BINSTRING), as cPickle did."""

  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
  buffer = io.BytesIO()
  _Py2Pickler(buffer, protocol=2).dump(obj)
  return buffer.getvalue()


def cifar_data(name: str, seed: int = 0):
  """{split: (labels (N, K) uint8 [coarse, fine] or [label], images NHWC)}."""
  rng = np.random.default_rng(seed)
  if name == 'cifar10':
    sizes = {'train': 5 * CIFAR10_PER_BATCH, 'test': CIFAR10_TEST}
    classes = [10]
  else:
    sizes = {'train': CIFAR100_TRAIN, 'test': CIFAR100_TEST}
    classes = [20, 100]
  out = {}
  for split, n in sizes.items():
    labels = np.stack([rng.integers(0, c, n) for c in classes], 1)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out[split] = (labels.astype(np.uint8), images)
  return out


def _chw_rows(images):
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _tar_gz(path, files: dict[str, bytes]):
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def cifar_binary_files(name, data) -> dict[str, bytes]:
  def records(split, sl=slice(None)):
    labels, images = data[split]
    rows = np.concatenate([labels[sl], _chw_rows(images[sl])], 1)
    return rows.astype(np.uint8).tobytes()
  if name == 'cifar10':
    top = 'cifar-10-batches-bin'
    n = CIFAR10_PER_BATCH
    files = {f'{top}/data_batch_{i + 1}.bin':
             records('train', slice(i * n, (i + 1) * n)) for i in range(5)}
    files[f'{top}/test_batch.bin'] = records('test')
    files[f'{top}/batches.meta.txt'] = (
        '\n'.join(CIFAR10_NAMES) + '\n\n').encode()
    files[f'{top}/readme.html'] = b'<meta HTTP-EQUIV="REFRESH">'
    return files
  top = 'cifar-100-binary'
  return {f'{top}/train.bin': records('train'),
          f'{top}/test.bin': records('test'),
          f'{top}/coarse_label_names.txt':
              ('\n'.join(CIFAR100_COARSE) + '\n').encode(),
          f'{top}/fine_label_names.txt':
              ('\n'.join(CIFAR100_FINE) + '\n').encode()}


def cifar_python_files(name, data) -> dict[str, bytes]:
  def batch(split, label, sl=slice(None), **extra):
    labels, images = data[split]
    out = {b'batch_label': f'{split} batch'.encode(),
           b'data': _chw_rows(images[sl]),
           b'filenames': [f'img_{i}.png'.encode()
                          for i in range(len(images[sl]))]}
    if label == 'cifar10':
      out[b'labels'] = [int(x) for x in labels[sl, 0]]
    else:
      out[b'coarse_labels'] = [int(x) for x in labels[sl, 0]]
      out[b'fine_labels'] = [int(x) for x in labels[sl, 1]]
    out.update(extra)
    return py2_pickle(out)
  if name == 'cifar10':
    top = 'cifar-10-batches-py'
    n = CIFAR10_PER_BATCH
    files = {f'{top}/data_batch_{i + 1}':
             batch('train', name, slice(i * n, (i + 1) * n)) for i in range(5)}
    files[f'{top}/test_batch'] = batch('test', name)
    files[f'{top}/batches.meta'] = py2_pickle({
        b'label_names': [n.encode() for n in CIFAR10_NAMES],
        b'num_cases_per_batch': 10000, b'num_vis': 3072})
    return files
  top = 'cifar-100-python'
  return {f'{top}/train': batch('train', name),
          f'{top}/test': batch('test', name),
          f'{top}/meta': py2_pickle({
              b'fine_label_names': [n.encode() for n in CIFAR100_FINE],
              b'coarse_label_names': [n.encode() for n in CIFAR100_COARSE]})}


def cifar_archive(directory, name, kind, data):
  """Writes the upstream .tar.gz of `kind` ('binary' or 'python')."""
  number = name[len('cifar'):]
  files = (cifar_binary_files if kind == 'binary' else cifar_python_files)(
      name, data)
  return _tar_gz(os.path.join(directory, f'cifar-{number}-{kind}.tar.gz'),
                 files)


def extract(files: dict[str, bytes], root) -> str:
  """Writes `files` under root (as torchvision leaves them); returns root."""
  for name, data in files.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
  return str(root)


# ---------------------------------------------------------------------------
# ImageNet

IMAGENET_SYNSETS = ['n01440764', 'n01443537', 'n15075141']
IMAGENET_PER_SYNSET = 3
IMAGENET_VAL = 5


def jpeg(seed: int, size=(20, 28), mode='RGB') -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format='JPEG',
                                             quality=90)
  return buffer.getvalue()


def _tar_bytes(files: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def imagenet_files():
  """({synset: {file: jpeg}}, {val file: jpeg})."""
  train = {s: {f'{s}_{100 + i}.JPEG': jpeg(10 * k + i)
               for i in range(IMAGENET_PER_SYNSET)}
           for k, s in enumerate(IMAGENET_SYNSETS)}
  val = {f'ILSVRC2012_val_{i:08d}.JPEG': jpeg(1000 + i)
         for i in range(1, IMAGENET_VAL + 1)}
  return train, val


def imagenet_tars(directory, train, val) -> str:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'ILSVRC2012_img_train.tar'), 'wb') as f:
    f.write(_tar_bytes({f'{s}.tar': _tar_bytes(images)
                        for s, images in train.items()}))
  with open(os.path.join(directory, 'ILSVRC2012_img_val.tar'), 'wb') as f:
    f.write(_tar_bytes(val))
  return str(directory)

"""What format a weights file holds, told from its first bytes, not its name.

A `.pth` that holds safetensors bytes, a `.bin` that is a zip, an `.h5` that
is Keras 3's or the legacy layout: the reader is chosen by content. The checks
here only look at bytes; nothing is unpickled or imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import zipfile
from typing import Union

PathLike = Union[str, os.PathLike]

_HDF5 = b'\x89HDF\r\n\x1a\n'
_MXNET_LIST_MAGIC = 0x112
# Largest safetensors header we accept before calling the file damaged.
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024

FORMATS = {
    'torch-zip': 'PyTorch zip checkpoint (torch.save)',
    'torch-pickle': 'PyTorch legacy pickle checkpoint',
    'safetensors': 'safetensors',
    'mxnet': 'MXNet NDArray list (.params)',
    'hdf5': 'HDF5 (Keras .weights.h5 or .h5)',
    'keras-zip': 'Keras 3 .keras archive',
}


def existing_file(source: PathLike, what: str = 'weights file') -> pathlib.Path:
  """The path, or ValueError saying why it cannot be read as a file."""
  path = pathlib.Path(source)
  if path.is_dir():
    raise ValueError(f'{what} {path} is a directory, not a file; pass the '
                     'checkpoint file inside it.')
  if not path.exists():
    raise ValueError(f'{what} {path} does not exist.')
  if not path.is_file():
    raise ValueError(f'{what} {path} is not a regular file.')
  if path.stat().st_size == 0:
    raise ValueError(f'{what} {path} is empty (0 bytes); it was not written '
                     'completely. Save or download it again.')
  return path


def unreadable_reason(error: BaseException) -> str:
  """'Type: first sentence' of a reader's error on a file that is no weights.

  torch and safetensors go on for lines (torch suggests unpickling the file
  anyway); the first sentence says what is wrong.
  """
  reason = str(error).strip().split('\n')[0].split('. ')[0][:150]
  return f'{type(error).__name__}: {reason}'


def sniff(source: PathLike) -> str:
  """One of FORMATS' keys, from the file's leading bytes.

  Raises ValueError naming the file when no known format starts that way.
  """
  path = existing_file(source)
  with path.open('rb') as f:
    head = f.read(64)
  size = path.stat().st_size
  if head.startswith(_HDF5):
    return 'hdf5'
  if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except zipfile.BadZipFile as e:
      raise ValueError(f'{path} starts like a zip archive but is damaged '
                       f'({e}); save or download it again.') from e
    if 'model.weights.h5' in names:
      return 'keras-zip'
    return 'torch-zip'
  if len(head) >= 16:
    first, second = struct.unpack('<QQ', head[:16])
    if first == _MXNET_LIST_MAGIC and second == 0:
      return 'mxnet'
  if len(head) >= 9 and head[8:9] == b'{':
    header = struct.unpack('<Q', head[:8])[0]
    if header > _SAFETENSORS_MAX_HEADER or 8 + header > size:
      raise ValueError(
          f'{path} looks like safetensors but its header claims {header:,} '
          f'bytes in a file of {size:,}: the file is truncated or damaged.')
    _check_safetensors_length(path, header, size)
    return 'safetensors'
  if head[:1] == b'\x80' or head[:1] in (b'(', b']', b'}'):
    return 'torch-pickle'
  raise ValueError(
      f'{path} is not a weights file this reader knows (first bytes '
      f'{head[:8]!r}); supported: ' + ', '.join(FORMATS.values()) + '.')


def _check_safetensors_length(path: pathlib.Path, header: int, size: int):
  """The tensors the header lists end where the file ends (not truncated)."""
  with path.open('rb') as f:
    f.seek(8)
    raw = f.read(header)
  try:
    entries = json.loads(raw)
    end = max((int(e['data_offsets'][1]) for k, e in entries.items()
               if k != '__metadata__'), default=0)
  except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
    raise ValueError(f'{path} looks like safetensors but its header is not '
                     f'valid ({type(e).__name__}: {e}); the file is damaged. '
                     'Save or download it again.') from None
  if 8 + header + end > size:
    raise ValueError(
        f'{path} is truncated: its safetensors header lists {end:,} bytes of '
        f'tensors, the file holds {size - 8 - header:,}. Save or download it '
        'again.')

"""Reference layout tables, extracted from the reference implementations.

Each `<name>.json` here was written by `python -m flax_resnet.references.extract
<name>`, which builds the reference library's own model and reads its strides,
shortcuts, shapes and parameter counts. The files are data: nothing in them is
typed by hand, and tests re-extract them when the libraries are installed.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

DIRECTORY = pathlib.Path(__file__).parent
NAMES = ('torchvision', 'timm', 'gluon_v1', 'gluon_v2', 'keras', 'keras_v2',
         'paper')


class MissingEntry(ValueError):
  """Reference `name` has no entry `model`; `.entries` lists those it has."""

  def __init__(self, name: str, model: str, entries: list[str],
               fix: str = 'Pick another reference or set reference=None.'):
    self.name, self.model, self.entries = name, model, entries
    super().__init__(
        f'reference {name!r} has no entry for model {model!r}; it covers '
        f'{", ".join(entries)}. {fix}')


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
  """The whole table of reference `name`."""
  if name not in NAMES:
    raise ValueError(
        f'reference={name!r} is not known; choose one of '
        f'{", ".join(NAMES)}, or None to skip the layout check.')
  path = DIRECTORY / f'{name}.json'
  if not path.exists():
    raise ValueError(
        f'reference table {path} is missing; regenerate it with '
        f'`python -m flax_resnet.references.extract {name}`.')
  with path.open() as f:
    return json.load(f)


def lookup(name: str, model: str, input_size: int) -> dict[str, Any]:
  """The entry for `model` in reference `name`, extracted at `input_size`."""
  table = load(name)
  models = table['models']
  if model not in models:
    raise MissingEntry(name, model, sorted(models))
  entry = models[model]
  if entry['input_size'] != input_size:
    raise ValueError(
        f'reference {name!r} for {model!r} was extracted at input size '
        f'{entry["input_size"]}, but the layout was traced at {input_size}; '
        f'trace at {entry["input_size"]} to compare.')
  return entry

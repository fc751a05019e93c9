"""The one rule for dataset names, as TFDS reads them (training and prepare).

Training finds a prepared dataset with `tfds.builder(NAME, data_dir=DIR)`,
which parses NAME with TFDS's own pattern (`tfds.core.naming`: a letter, then
letters, digits and underscores; optionally `/config` and `:version`) and
looks in DIR/snake_case(NAME)/. So prepare writes a dataset only under a name
that is a bare TFDS name already in snake_case: the folder it writes is then
the folder training reads, and no name can point outside --data_dir
('../escaped' is not a TFDS name).
"""

from __future__ import annotations

from typing import Optional


def tfds_name_error(name: str) -> Optional[str]:
  """Why `tfds.builder(name)` cannot parse `name`; None if it can."""
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  if isinstance(name, str) and naming.is_valid_dataset_name(name):
    return None
  return (f'dataset name {name!r} is not one TFDS reads: it must start with a '
          'letter and hold only letters, digits and underscores (e.g. '
          'my_photos; optionally /config and :version, e.g. cifar10:3.0.2).')


def new_name_error(name: str) -> Optional[str]:
  """Why prepare must not write a dataset called `name`; None if it may."""
  from tensorflow_datasets.core import naming  # pylint: disable=g-import-not-at-top
  if not (isinstance(name, str)
          and naming.is_valid_dataset_and_class_name(name)):
    return (f'dataset name {name!r} is not one training can read: it must '
            'start with a letter and hold only letters, digits and '
            'underscores, e.g. my_photos.')
  snake = naming.camelcase_to_snakecase(name)
  if snake != name:
    return (f'dataset name {name!r}: TFDS reads names in snake_case, so '
            f'training would look for {snake!r}; use the name {snake}.')
  return None

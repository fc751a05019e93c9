"""The ImageNet-1k class names shipped with the package.

Every publisher in the registry (torchvision, timm, Gluon, Keras) trained on
ILSVRC-2012 with class index = position of the WordNet ID in sorted order, so
one list serves them all. The names are torchvision's `_IMAGENET_CATEGORIES`
(torchvision/models/_meta.py, 0.29.1): 1000 distinct short names. timm's
imagenet_synset_to_lemma.txt gives the same first lemma for 998 of them;
torchvision disambiguates the two WordNet homonyms, 134 'crane bird'
(vs 517 'crane', the machine) and 639 'maillot tank suit' (vs 638
'maillot'). Keras' decode_predictions downloads imagenet_class_index.json
at run time (keras ships no copy, so it is not compared here); it writes the
first lemmas with underscores ('great_white_shark'). MXNet ships no names.
"""

from __future__ import annotations

import functools
import importlib.resources

IMAGENET1K = 'imagenet-1k'
_FILES = {IMAGENET1K: 'imagenet1k_classes.tsv'}


@functools.lru_cache(maxsize=None)
def _read(label_set: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  if label_set not in _FILES:
    raise ValueError(f'label set {label_set!r} is not shipped; known: '
                     f'{", ".join(_FILES)}.')
  text = importlib.resources.files(__package__).joinpath(
      _FILES[label_set]).read_text(encoding='utf-8')
  rows = [line.split('\t') for line in text.splitlines()
          if line and not line.startswith('#')]
  return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def categories(label_set: str = IMAGENET1K) -> tuple[str, ...]:
  """Class names in class-index order."""
  return _read(label_set)[1]


def wordnet_ids(label_set: str = IMAGENET1K) -> tuple[str, ...]:
  """WordNet IDs ('n01440764', ...) in class-index order."""
  return _read(label_set)[0]


def imagenet_categories() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names, index i = class i."""
  return categories(IMAGENET1K)

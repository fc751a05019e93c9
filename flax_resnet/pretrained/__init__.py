"""Pretrained weights in one call: `load_pretrained(name, weights)`.

    pre = flax_resnet.load_pretrained('resnet50', 'IMAGENET1K_V2')
    x = pre.transform(PIL.Image.open(path))  # the publisher's preprocessing
    logits = pre.model.apply(pre.variables, x[None], train=False)
    pre.categories[logits.argmax()]
    model, variables = flax_resnet.load_pretrained('resnet50', 'IMAGENET1K_V2')
    model, variables = flax_resnet.load_pretrained('resnet50', 'a1_in1k',
                                                   num_classes=5)  # fresh head
    flax_resnet.load_pretrained('resnet50', 'https://host/r50.pth', sha256=...)
    flax_resnet.load_pretrained('resnet50', '/data/r50.safetensors')

Registry files are downloaded once into $FLAX_RESNET_CACHE (default
~/.cache/flax_resnet) and loaded through `flax_resnet.convert.load_weights`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
from typing import Any, Optional, Union

from flax_resnet.pretrained import download
from flax_resnet.pretrained import transforms
from flax_resnet.pretrained.categories import imagenet_categories
from flax_resnet.pretrained.download import (ChecksumMismatch, DownloadError,
                                             cache_dir, cache_path, fetch)
from flax_resnet.pretrained.registry import REGISTRY, Weights
from flax_resnet.pretrained.transforms import EvalTransform

__all__ = ['load_pretrained', 'list_pretrained', 'register', 'resolve',
           'Pretrained', 'EvalTransform', 'imagenet_categories', 'transforms',
           'Weights', 'REGISTRY', 'DownloadError', 'ChecksumMismatch',
           'cache_dir', 'cache_path', 'fetch']

_URL_SCHEMES = ('http://', 'https://', 'file://')


def register(entry: Weights, *, replace: bool = False) -> Weights:
  """Adds a checkpoint to the registry (your own weights, an internal host).

  Raises ValueError if (preset, tag) is taken, unless replace=True.
  """
  if entry.key in REGISTRY and not replace:
    raise ValueError(f'weights {entry.tag!r} for {entry.preset!r} are already '
                     'registered; pass replace=True to change them.')
  download.parse_checksum(entry.checksum)
  REGISTRY[entry.key] = entry
  return entry


def unregister(preset: str, tag: str) -> None:
  REGISTRY.pop((preset, tag), None)


def list_pretrained(name: Optional[str] = None, *,
                    publisher: Optional[str] = None) -> list[Weights]:
  """The registry (optionally one preset's / one publisher's), sorted.

  Each Weights has preset, tag, url, checksum and top1 (None where the
  publisher gives none). `python -m flax_resnet.pretrained` prints it.
  """
  return sorted((w for w in REGISTRY.values()
                 if (name is None or w.preset == name) and
                 (publisher is None or w.publisher == publisher)),
                key=lambda w: (w.publisher, w.preset, w.tag))


def format_table(entries: list[Weights]) -> str:
  """One row per checkpoint, its evaluation preprocessing on the next line."""
  rows = [('preset', 'tag', 'top-1', 'checksum', 'url')]
  rows += [(w.preset, w.tag, '-' if w.top1 is None else f'{w.top1:.3f}',
            w.checksum or '-', w.url) for w in entries]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ['  '.join(c.ljust(widths[i]) if i < 4 else c
                     for i, c in enumerate(r)).rstrip() for r in rows]
  out = lines[:1]
  for line, w in zip(lines[1:], entries):
    out.append(line)
    if w.transform is not None:
      out.append(f'    eval: {w.transform.describe()}')
  return '\n'.join(out)


def _registry_entry(name: str, tag: str) -> Optional[Weights]:
  entry = REGISTRY.get((name, tag))
  if entry is None and tag.startswith(name + '.'):
    entry = REGISTRY.get((name, tag[len(name) + 1:]))  # 'resnet50.a1_in1k'
  return entry


def resolve(name: str, weights: Union[str, os.PathLike], *,
            sha256: Optional[str] = None, progress: bool = True
            ) -> tuple[pathlib.Path, Optional[Weights]]:
  """(local file, registry entry or None) for a tag, a URL or a path.

  Downloads (once) what is not cached. `sha256` checks a URL's or a path's
  file, or replaces a registry entry's checksum.
  """
  weights_str = os.fspath(weights)
  entry = _registry_entry(name, weights_str)
  if entry is not None:
    return fetch(entry.url, checksum=sha256 or entry.checksum,
                 member=entry.member, progress=progress), entry
  if weights_str.startswith(_URL_SCHEMES):
    return fetch(weights_str, checksum=sha256, progress=progress), None
  path = pathlib.Path(os.path.expanduser(weights_str))
  if path.exists():
    download.verify(path, sha256, str(path))
    return path, None
  tags = sorted(w.tag for w in list_pretrained(name))
  close = difflib.get_close_matches(weights_str, tags, n=1)
  hint = f' Did you mean {close[0]!r}?' if close else ''
  known = (f'registered weights for {name}: {", ".join(tags)}' if tags else
           f'no weights are registered for {name} (see list_pretrained())')
  raise ValueError(
      f'weights={weights_str!r} is neither a registry tag, a URL nor an '
      f'existing file.{hint} ({known}.)')


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
  """What load_pretrained returns; unpacks as `model, variables`.

  Attributes:
    model: the flax_resnet.ResNet.
    variables: {'params': ..., 'batch_stats': ...}.
    transform: the evaluation preprocessing the weights were measured with
      (EvalTransform), or None when unknown (a file or URL that is not in the
      registry, and no transform= was given).
    categories: class names, index i = output i; None when unknown (no
      registry entry) or when the head is fresh (num_classes changed).
    entry: the registry entry, or None for a file or URL.
  """
  model: Any
  variables: Any
  transform: Optional[EvalTransform]
  categories: Optional[tuple[str, ...]]
  entry: Optional[Weights]

  def __iter__(self):
    return iter((self.model, self.variables))

  def __repr__(self) -> str:
    where = ('weights not from the registry' if self.entry is None else
             f'{self.entry.publisher} {self.entry.preset} {self.entry.tag}')
    classes = ('categories unknown' if self.categories is None else
               f'{len(self.categories)} categories')
    return (f'Pretrained({where}, num_classes={self.model.spec.num_classes}'
            f', {classes}, transform: {self.describe_transform()})')

  def describe_transform(self) -> str:
    if self.transform is None:
      return ('unknown (weights from a file or URL; pass transform= to '
              'load_pretrained)')
    return self.transform.describe()


def _named_transform(name: str, transform: Union[str, EvalTransform]
                     ) -> EvalTransform:
  """transform= of load_pretrained: itself, or a registry tag's."""
  if isinstance(transform, EvalTransform):
    return transform
  entry = _registry_entry(name, str(transform))
  if entry is None or entry.transform is None:
    tags = sorted(w.tag for w in list_pretrained(name) if w.transform)
    raise ValueError(
        f'transform={transform!r}: pass an EvalTransform or a registry tag of '
        f'{name} whose preprocessing to use ({", ".join(tags) or "none"}).')
  return entry.transform


def load_pretrained(name: str, weights: Union[str, os.PathLike], *,
                    sha256: Optional[str] = None,
                    num_classes: Optional[int] = None, skip_head: bool = False,
                    transform: Union[None, str, EvalTransform] = None,
                    progress: bool = True, **overrides: Any) -> Pretrained:
  """A model and its variables with published or your own weights.

  Args:
    name: a preset (flax_resnet.list_models()).
    weights: a registry tag ('IMAGENET1K_V2', 'a1_in1k' or 'resnet50.a1_in1k',
      'imagenet'; see list_pretrained(name)), an http(s) URL, or a local file.
    sha256: the file's sha256 (or a prefix); overrides the registry's.
    num_classes: a classifier of this size. If it differs from the
      checkpoint's, the head is fresh (initialised, not loaded): fine-tuning.
    skip_head: never load the classifier.
    transform: the evaluation preprocessing to attach: an EvalTransform, or
      a registry tag of this preset whose preprocessing to use (weights
      fine-tuned from 'IMAGENET1K_V2' and saved to a file); default: the
      registry entry's, None for a file or URL.
    progress: show a download progress bar.
    **overrides: ResNetSpec fields (dtype, bn_momentum, ...).

  Returns:
    A Pretrained: .model, .variables, .transform, .categories, .entry;
    `model, variables = load_pretrained(...)` unpacks it.

  Raises:
    DownloadError, ChecksumMismatch, ValueError (unknown tag, missing file),
    convert.StateDictMismatch (the file does not fit the preset).
  """
  from flax_resnet import convert  # pylint: disable=g-import-not-at-top
  from flax_resnet.zoo import create_model  # pylint: disable=g-import-not-at-top

  if num_classes is not None:
    overrides['num_classes'] = num_classes
  model = create_model(name, **overrides)  # a bad name fails before download
  if transform is not None:
    transform = _named_transform(name, transform)
  path, entry = resolve(name, weights, sha256=sha256, progress=progress)
  if entry is not None and model.spec.num_classes != entry.num_classes:
    skip_head = True
  try:
    variables = convert.load_weights(path, model, skip_head=skip_head)
  except convert.StateDictMismatch as e:
    if num_classes is None or skip_head or not e.head_only:
      raise
    variables = convert.load_weights(path, model, skip_head=True)
    skip_head = True
  if transform is None and entry is not None:
    transform = entry.transform
  categories = None
  if entry is not None and not skip_head:  # a fresh head has no names
    categories = entry.categories
  return Pretrained(model, variables, transform, categories, entry)

"""A derived layout held against a reference library's: check, explain, raise.

`check` looks the model up in a reference table (flax_resnet.references),
compares it (flax_resnet.layout_compare) and raises `LayoutMismatch` on any
difference, naming the preset and spec fields that explain it where a trace
confirms them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Optional

from flax_resnet import references
from flax_resnet.layout import derive_layout
from flax_resnet.layout import Layout
from flax_resnet.layout_compare import CONFIG_FIXES
from flax_resnet.layout_compare import Difference
from flax_resnet.layout_compare import differences
from flax_resnet.layout_compare import Fixes
from flax_resnet.layout_compare import format_differences
from flax_resnet.model import ResNet


# Spec fields that are not architecture: they never explain a difference.
_NOT_ARCHITECTURE = ('reference', 'num_classes', 'dtype', 'param_dtype')


def _spec_words(name: str, value) -> str:
  if name == 'conv_bias':
    return f'conv biases on {", ".join(value)}' if value else 'no conv biases'
  return f'{name} {value!r}'


def explain(layout: Layout, spec, entry_name: str, entry: dict[str, Any],
            reference_name: str, found: list[Difference]):
  """(causes of count differences by `where`, (preset, its changes) or None).

  Only what a trace confirms: the preset named like the entry is traced
  against the entry; a count difference gets a cause where that preset
  matches it, naming the spec fields that alone change this model's counts.
  """
  # Imported here: zoo presets are only needed to explain a mismatch.
  from flax_resnet import zoo  # pylint: disable=g-import-not-at-top
  if spec is None or entry_name not in zoo.PRESETS:
    return {}, None
  preset = zoo.get_spec(entry_name)
  # The entry has the preset's head (a run's class count is not architecture).
  spec = dataclasses.replace(spec, num_classes=preset.num_classes)
  fields = [f.name for f in dataclasses.fields(spec)
            if f.name not in _NOT_ARCHITECTURE
            and getattr(spec, f.name) != getattr(preset, f.name)]
  if not fields:
    return {}, None
  try:
    theirs = differences(derive_layout(ResNet(preset), layout.input_shape,
                                       entry_name), entry, reference_name)
  except (ValueError, TypeError):
    return {}, None  # the preset does not trace at this size: no claim
  changed = '; '.join(f'{_spec_words(f, getattr(preset, f))} (here '
                      f'{_spec_words(f, getattr(spec, f))})' for f in fields)
  matching = None if theirs else (entry_name, changed)
  unexplained = {(d.where, d.what) for d in theirs}
  # Of the totals, only the parameters: BN statistics move with them.
  explainable = [d.where for d in found if d.what == 'parameters'
                 and (d.where, d.what) not in unexplained]
  if not explainable:
    return {}, matching
  ours = _counts(layout)
  causes: dict[str, list[str]] = {where: [] for where in explainable}
  for name in fields:
    try:
      single = dataclasses.replace(spec, **{name: getattr(preset, name)})
      changed_counts = _counts(derive_layout(ResNet(single.validate()),
                                             layout.input_shape))
    except (ValueError, TypeError):
      continue  # this field alone makes no valid network: no claim
    for where in explainable:
      if changed_counts.get(where) != ours.get(where):
        causes[where].append(_spec_words(name, getattr(preset, name)))
  return ({where: ', '.join(c) for where, c in causes.items() if c},
          matching)


def _counts(layout: Layout) -> dict[str, int]:
  """Parameter counts by the `where` of a Difference."""
  counts = {'stem': layout.stem_params, 'total': layout.total_params}
  counts.update({f'stage {b.stage} block {b.index}': b.params
                 for b in layout.blocks})
  return counts


class LayoutMismatch(ValueError):
  """The model's layout differs from its reference; `.problems` lists rows.

  `.lines` is the grouped, aligned table of the differences.
  """

  def __init__(self, model: str, reference: str, found: list[Difference],
               fixes: Fixes = CONFIG_FIXES,
               causes: Optional[dict[str, str]] = None,
               matching: Optional[tuple[str, str]] = None):
    self.differences = found
    self.problems = [d.text for d in found]
    self.lines = format_differences(found, reference, causes)
    self.fix = '\n'.join(filter(None, [
        f'The preset {matching[0]} matches {reference}; this model differs '
        f'from it in: {matching[1]}. Try {fixes.model.format(matching[0])}.'
        if matching else '',
        f'Fix the model overrides, pick the matching reference '
        f'({fixes.reference.format("NAME")}), or {fixes.skip} to skip the '
        'reference check.']))
    lines = '\n  '.join(self.lines)
    super().__init__(
        f'{model}: layout differs from {reference} in {len(found)} '
        f'place(s):\n  {lines}\n{self.fix}')


def named_variants(model: str, entries) -> list[str]:
  """Entries that name `model` as a whole word, shortest first.

  'resnet50' is in gluon_v1 as resnet50_v1 and gluon_resnet50_v1.
  """
  word = re.compile(rf'(^|_){re.escape(model)}(_|$)')
  return sorted((e for e in entries if word.search(e)), key=len)


def check(layout: Layout, reference_name: str,
          reference_model: Optional[str] = None, *, spec=None,
          fixes: Fixes = CONFIG_FIXES) -> dict[str, Any]:
  """Raises LayoutMismatch on any difference; returns the reference entry.

  spec (the model's ResNetSpec) lets a mismatch name its likely cause;
  fixes words the way out for where the check runs (config or CLI).
  """
  entry_name = reference_model or layout.model
  try:
    entry = references.lookup(reference_name, entry_name,
                              layout.input_shape[1])
  except references.MissingEntry as e:
    close = (named_variants(e.model, e.entries) or
             difflib.get_close_matches(e.model, e.entries, n=2, cutoff=0.6))
    closest = (f' (closest: {", ".join(close)})' if close else '')
    raise references.MissingEntry(
        e.name, e.model, e.entries,
        f'Name one with {fixes.entry.format("NAME")}{closest}, pick another '
        f'reference ({fixes.reference.format("NAME")}), or {fixes.skip} to '
        'skip the check.') from None
  found = differences(layout, entry, reference_name)
  if found:
    causes, matching = explain(layout, spec, entry_name, entry,
                               reference_name, found)
    raise LayoutMismatch(layout.model, reference_name, found, fixes, causes,
                         matching)
  return entry

"""A layout held against a reference entry: its differences, and their words.

Pure data: a `Layout` (flax_resnet.layout) and a reference entry
(flax_resnet.references) in, `Difference`s and aligned text out. Tracing
is flax_resnet.layout's job; looking up the entry, explaining a difference by
a preset, and raising `LayoutMismatch` are flax_resnet.layout_check's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
  from flax_resnet.layout import Layout

# Fields compared against a reference row, with the words used for mismatches.
COMPARED_FIELDS = {
    'in_channels': 'input channels',
    'out_channels': 'output channels',
    'in_size': 'input size',
    'out_size': 'output size',
    'stride_at': 'strided conv',
    'shortcut': 'shortcut',
    'shortcut_stride': 'shortcut stride',
    'shortcut_norm': 'BN on the shortcut',
    'params': 'parameters',
}


def format_value(value) -> str:
  """3x3, 224x224 and '1x1' (a quoted string), as the tables write them."""
  if isinstance(value, (list, tuple)):
    return 'x'.join(str(v) for v in value)
  return repr(value) if isinstance(value, str) else str(value)


@dataclasses.dataclass(frozen=True)
class Fixes:
  """How a user changes the reference check where it runs: '{}' is a name."""
  reference: str
  entry: str
  skip: str
  model: str


CONFIG_FIXES = Fixes(reference='config.reference={}',
                     entry='config.reference_model={}',
                     skip='set config.reference=None',
                     model='config.model={} and no model_overrides')
CLI_FIXES = Fixes(reference='--reference {}', entry='--reference-model {}',
                  skip='pass --reference none',
                  model='python -m flax_resnet.layout {}')


@dataclasses.dataclass(frozen=True)
class Difference:
  """One difference from a reference: `text` in words, the rest for tables."""
  where: str  # 'stem', 'stage 2 block 0', 'total'
  what: str  # words of the field, e.g. 'strided conv', 'parameters'
  have: Any  # None: the block is missing here
  want: Any  # None: the block is absent in the reference
  text: str

  @property
  def counts(self) -> bool:
    return self.what in ('parameters', 'parameters and BN statistics')


def differences(layout: Layout, reference: dict[str, Any],
                reference_name: str) -> list[Difference]:
  """Every difference from a reference entry; [] means a match."""
  found = []
  stem = reference.get('stem', {})
  # An entry for a layout-only preset (e.g. resnet50_v1, which has no conv
  # biases) holds the library's real counts but says they are not ours.
  counts = reference.get('counts_compared', True)
  for key, words in (('out_channels', 'output channels'),
                     ('out_size', 'output size'), ('params', 'parameters')):
    if key == 'params' and not counts:
      continue
    want = stem.get(key)
    have = getattr(layout, f'stem_{key}')
    if want is not None and format_value(want) != format_value(have):
      found.append(Difference(
          'stem', words, have, want, f'stem: {words} {format_value(have)} here, '
          f'{format_value(want)} in {reference_name}'))
  ref_blocks = {(b['stage'], b['index']): b for b in reference['blocks']}
  ours = {(b.stage, b.index): b for b in layout.blocks}
  for key in sorted(set(ref_blocks) | set(ours)):
    where = f'stage {key[0]} block {key[1]}'
    if key not in ours:
      found.append(Difference(where, 'block', None, True, f'{where}: missing '
                              f'here, present in {reference_name}'))
      continue
    if key not in ref_blocks:
      found.append(Difference(where, 'block', True, None, f'{where}: present '
                              f'here, absent in {reference_name}'))
      continue
    row, ref = ours[key], ref_blocks[key]
    for field, words in COMPARED_FIELDS.items():
      want = ref.get(field) if counts or field != 'params' else None
      if want is None:
        continue  # the reference does not define this field comparably
      have = getattr(row, field)
      if format_value(want) != format_value(have):
        found.append(Difference(
            where, words, have, want, f'{where}: {words} is {format_value(have)} '
            f'here but {format_value(want)} in {reference_name}'))
  want_total = reference.get('total_params') if counts else None
  if want_total is not None and want_total != layout.total_params:
    found.append(Difference(
        'total', 'parameters', layout.total_params, want_total,
        f'total parameters {layout.total_params:,} here, {want_total:,} in '
        f'{reference_name}'))
  want_all = reference.get('total_variables') if counts else None
  if want_all is not None and want_all != layout.total_variables:
    found.append(Difference(
        'total', 'parameters and BN statistics', layout.total_variables,
        want_all, f'parameters and BN statistics {layout.total_variables:,} '
        f'here, {want_all:,} in {reference_name}'))
  return found


def compare(layout: Layout, reference: dict[str, Any],
            reference_name: str) -> list[str]:
  """Every difference from a reference entry, in words; [] means a match."""
  return [d.text for d in differences(layout, reference, reference_name)]


def _shown(value, counts: bool) -> str:
  if counts:
    return f'{value:,}'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  return value if isinstance(value, str) else format_value(value)


def format_differences(found: list[Difference], reference_name: str,
                       causes: Optional[dict[str, str]] = None) -> list[str]:
  """Aligned lines: layout differences first, then parameter counts."""
  causes = causes or {}
  lines = []
  for title, group in (('strides, shortcuts and shapes',
                        [d for d in found if not d.counts]),
                       ('parameter counts', [d for d in found if d.counts])):
    if not group:
      continue
    rows = []
    for d in group:
      have = 'missing' if d.have is None else _shown(d.have, d.counts)
      want = 'absent' if d.want is None else _shown(d.want, d.counts)
      if d.what == 'block':
        have, want = ('present', 'absent') if d.want is None else (
            'missing', 'present')
      note = ''
      if d.counts:
        cause = causes.get(d.where)
        note = f'({d.want - d.have:+,}{": " + cause if cause else ""})'
      rows.append((f'{d.where}:', d.what, have, want, note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    # Numbers line up on their last digit, words on their first letter.
    just = str.rjust if group[0].counts else str.ljust
    lines.append(f'{title}:')
    for where, what, have, want, note in rows:
      lines.append(
          f'  {where.ljust(widths[0])} {what.ljust(widths[1])} '
          f'{just(have, widths[2])} here vs {just(want, widths[3])} in '
          f'{reference_name}  {note}'.rstrip())
  return lines

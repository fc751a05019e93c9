"""Can this run resume that checkpoint? Field-by-field answers, never 'damaged'.

A checkpoint's metadata stores the model, the spec's repr and the whole config
(json). Comparing them with this run names every changed field, saved -> now,
and the message offers the ways out: resume with the saved values, keep the
trained weights with a fresh optimizer state, or start a new workdir.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Optional, Sequence

import jax

from flax_resnet.spec import ResNetSpec

Change = tuple[str, Any, Any]  # (field, saved, now)

# precision is reported as the config field it is, not as a spec dtype.
_SPEC_FIELDS_OWNED_BY_CONFIG = ('dtype', 'num_classes')
_SPEC_ITEM = re.compile(r'(\w+)=')


def parse_spec_repr(text: Optional[str]) -> dict[str, str]:
  """'ResNetSpec(block='basic', depths=(1, 1), ...)' -> {field: value text}."""
  if not text or '(' not in text:
    return {}
  body = text[text.index('(') + 1:text.rindex(')')]
  fields = {f.name for f in dataclasses.fields(ResNetSpec)}
  # Split only at ', name=' where name is a spec field, so values holding
  # commas or '=' (tuples, dtype reprs) stay whole.
  starts = [m for m in _SPEC_ITEM.finditer(body)
            if m.group(1) in fields and (m.start() == 0 or
                                         body[m.start() - 2:m.start()] == ', ')]
  out = {}
  for i, match in enumerate(starts):
    end = starts[i + 1].start() - 2 if i + 1 < len(starts) else len(body)
    out[match.group(1)] = body[match.end():end]
  return out


def spec_changes(saved: Optional[str], now: Optional[str]) -> list[Change]:
  old, new = parse_spec_repr(saved), parse_spec_repr(now)
  if not old or not new:
    return [] if saved == now else [('spec', saved, now)]
  defaults = {f.name: repr(f.default) for f in dataclasses.fields(ResNetSpec)
              if f.default is not dataclasses.MISSING}
  changes = []
  for field in new:
    if field in _SPEC_FIELDS_OWNED_BY_CONFIG:
      continue
    # A field added to ResNetSpec after the checkpoint was written: the
    # checkpoint was built with its default.
    before = old.get(field, defaults.get(field))
    if before != new[field]:
      changes.append((f'model_overrides.{field}', before, new[field]))
  return changes


def _flat_config(text: Optional[str]) -> dict[str, Any]:
  if not text:
    return {}
  try:
    tree = json.loads(text) if isinstance(text, str) else dict(text)
  except ValueError:
    return {}
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      for sub, sub_value in value.items():
        flat[f'{key}.{sub}'] = sub_value
    else:
      flat[key] = value
  return flat


def config_changes(saved: Optional[str], now: Optional[str]) -> list[Change]:
  old, new = _flat_config(saved), _flat_config(now)
  if not old or not new:
    return []
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if _normal(old.get(k)) != _normal(new.get(k))]


def _normal(value):
  return list(value) if isinstance(value, tuple) else value


def leaf_name(path) -> str:
  """A tree path as orbax names the saved array ('opt_state.0.trace.w')."""
  parts = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '.'.join(parts)


def structure_differences(saved: dict[str, tuple], abstract_state) -> list[str]:
  """What differs between the saved arrays and the state this run builds."""
  now = {leaf_name(p): (tuple(leaf.shape), str(leaf.dtype))
         for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  out = []
  only_saved = sorted(set(saved) - set(now))
  only_now = sorted(set(now) - set(saved))
  if only_saved:
    out.append(f'{len(only_saved)} array(s) only in the checkpoint, e.g. '
               f'{only_saved[0]}')
  if only_now:
    out.append(f'{len(only_now)} array(s) only in this run, e.g. '
               f'{only_now[0]}')
  reshaped = [k for k in sorted(set(saved) & set(now))
              if saved[k][0] != now[k][0]]
  if reshaped:
    k = reshaped[0]
    out.append(f'{len(reshaped)} array(s) of another shape, e.g. {k} '
               f'{saved[k][0]} saved, {now[k][0]} now')
  return out


def _text(value) -> str:
  return 'None' if value is None else (
      value if isinstance(value, str) else json.dumps(value))


def format_changes(changes: list[Change]) -> str:
  return ', '.join(f'{field}: {_text(old)} -> {_text(new)}'
                   for field, old, new in changes[:12]) + (
                       f' (and {len(changes) - 12} more)'
                       if len(changes) > 12 else '')


def _flag(field: str, value) -> str:
  text = _text(value)
  if field.startswith('model_overrides.'):
    # Spec values are reprs: 'B' -> B, (1, 1, 1) -> (1,1,1).
    text = text.strip("'").replace(' ', '')
  else:
    text = text.replace(' ', '')
  if field == 'model':
    text = text.strip("'")
  return f'--config.{field}={text}'


def incompatible_message(step: int, directory: pathlib.Path, what: str,
                         changes: list[Change],
                         other_changes: Sequence[Change] = ()) -> str:
  workdir = pathlib.Path(directory).parent
  named = list(changes)
  lines = [f'checkpoint step {step} in {directory} is intact, but it holds '
           f'{what}; this config cannot resume it.']
  if changes:
    lines.append('Changed since it was written (saved -> this run): ' +
                 format_changes(changes) + '.')
  else:
    lines.append('No config field differs from the saved one: it was written '
                 'by another version of this code, or without its config.')
  named_fields = {field for field, _, _ in changes}
  other = [c for c in other_changes if c[0] not in named_fields]
  if other:
    lines.append('Other changes (harmless on their own): ' +
                 format_changes(other) + '.')
  lines.append('The checkpoint is left as it is. Choose one:')
  if named:
    lines.append('  - resume it exactly: rerun with the saved value(s): ' +
                 ' '.join(_flag(f, old) for f, old, _ in named[:8]))
  if not any(f.startswith('model') for f, _, _ in named):
    skip_head = (' --config.init_from_skip_head=True'
                 if any(f == 'num_classes' for f, _, _ in named) else '')
    lines.append('  - keep its trained weights with a fresh optimizer state: '
                 f'--workdir NEW_FOLDER --config.init_from={workdir}'
                 f'{skip_head}')
  lines.append('  - start over: Use a fresh --workdir (or move '
               f'{directory} away yourself).')
  return '\n'.join(lines)

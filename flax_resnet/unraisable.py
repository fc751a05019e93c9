"""Dropping one kind of Python "Exception ignored" report, passing the rest on.

Libraries that clean up in destructors and on background threads (orbax's
abandoned concurrent reads, grain's shared-memory arrays) can report errors
that follow from one the project already handled and explained; each would
print a traceback after the project's one line.
"""

from __future__ import annotations

import sys
from typing import Callable


def drop(recognises: Callable[[object], bool]) -> None:
  """From now on, the reports `recognises(unraisable)` accepts are dropped.

  Installs one hook per predicate (a second call with it does nothing); every
  other report goes to the hook that was there before.
  """
  previous = sys.unraisablehook
  hook = previous
  while hook is not None:
    if getattr(hook, 'drops', None) is recognises:
      return
    hook = getattr(hook, 'previous', None)

  def dropping(unraisable):
    if not recognises(unraisable):
      previous(unraisable)

  dropping.drops = recognises
  dropping.previous = previous
  sys.unraisablehook = dropping

"""SIGTERM/SIGINT stop a run at any phase, saving what can be saved.

Two kinds of phase:
  * interruptible (startup, opening the dataset, waiting for a batch, compiling,
    evaluating): nothing is half-changed there, so the handler raises
    `Interrupted` at once and the loop unwinds, saving trained state that no
    checkpoint holds yet;
  * deferred (a train step running on the donated state, a checkpoint being
    written, metrics being rewritten): the handler only records the signal;
    the run leaves at the end of the phase, at the latest after the step.

Python runs a handler between bytecodes of the main thread only: a phase
spent inside one C++ call (an XLA compile, a device computation) ends before
the signal is seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Optional

from flax_resnet import unraisable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """A stop signal arrived in an interruptible phase.

  A BaseException, like KeyboardInterrupt: library code that catches
  Exception must not swallow it.
  """

  def __init__(self, signum: int, phase: str):
    super().__init__(f'signal {signum} during {phase}')
    self.signum = signum
    self.phase = phase


def _half_built_by_interruption(report) -> bool:
  """A grain object whose constructor an Interrupted cut short: its __del__
  then misses attributes ("'InterleaveDatasetIterator' object has no
  attribute '_closed'"), reported as an ignored exception after the stop."""
  owner = report.object
  return (isinstance(report.exc_value, AttributeError)
          and getattr(owner, '__name__', '') == '__del__'
          and getattr(owner, '__module__', '').startswith('grain.'))


def _importing(frame) -> bool:
  while frame is not None:
    if frame.f_code.co_filename.startswith('<frozen importlib'):
      return True
    frame = frame.f_back
  return False


class StopSignal:
  """SIGTERM/SIGINT -> Interrupted in interruptible phases, else a flag."""

  def __init__(self):
    self.received: Optional[int] = None
    self.phase = 'startup'
    self._interruptible = False
    self._previous = {}
    self._previous_unraisablehook = None
    self._cut_short = False  # an Interrupted was raised from the handler

  def __enter__(self):
    for sig in STOP_SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    if self._previous:
      self._previous_unraisablehook = sys.unraisablehook
      sys.unraisablehook = self._swallowed
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._previous_unraisablehook is not None:
      sys.unraisablehook = self._previous_unraisablehook
    if self._cut_short:  # its half-built objects may be collected later still
      unraisable.drop(_half_built_by_interruption)

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signum
    if not self._interruptible:
      return
    if _importing(frame):
      # Raised into an import, the exception can reach a C extension's
      # initialisation, which aborts the process (jaxlib's does): again
      # once the import is done.
      self._deliver_again()
      return
    self._interruptible = False  # raised once; unwinding is not interrupted
    self._cut_short = True
    unraisable.drop(_half_built_by_interruption)
    raise Interrupted(self.received, self.phase)

  def _deliver_again(self):
    # Not from the handler itself: its own lines would take it again at once.
    threading.Timer(0.05, os.kill, (os.getpid(), self.received)).start()

  def _swallowed(self, unraisable):
    """The handler ran inside a gc callback or __del__, which dropped the
    exception ("Exception ignored in ..."): deliver the signal again."""
    if not isinstance(unraisable.exc_value, Interrupted):
      self._previous_unraisablehook(unraisable)
      return
    self._interruptible = True
    self._deliver_again()

  @contextlib.contextmanager
  def interruptible(self, phase: str):
    """A phase a signal may cut short: raises Interrupted (also if pending)."""
    outer = self._interruptible, self.phase
    self.phase = phase
    if self.received is not None:
      raise Interrupted(self.received, phase)
    self._interruptible = True
    try:
      yield
    finally:
      self._interruptible, self.phase = outer

  @contextlib.contextmanager
  def deferred(self, phase: str):
    """A phase that must finish: a signal is only recorded until it ends."""
    outer = self._interruptible, self.phase
    self._interruptible, self.phase = False, phase
    try:
      yield
    except BaseException:
      self._interruptible, self.phase = outer
      raise
    self._interruptible, self.phase = outer
    if self._interruptible and self.received is not None:
      self._interruptible = False
      raise Interrupted(self.received, self.phase)

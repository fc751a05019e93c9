"""Metric sinks: WORKDIR/metrics.jsonl, TensorBoard events, and the console."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Optional

log = logging.getLogger(__name__)


class MetricWriter:
  """One JSON object per line ({"step": ..., name: value}) + TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: float(v) for k, v in metrics.items()})
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    for name, value in metrics.items():
      self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar with ETA on a terminal; plain log lines otherwise.

  The clock (rate, ETA) starts at `begin()`, called once the first step has
  compiled and run, so the ETA reflects the steady-state step time. Messages
  go through `message()`, which prints them on their own line above the bar.
  """

  # Narrower than this (or a terminal that reports 0 columns) gets log lines.
  MIN_COLUMNS = 40

  def __init__(self, total_steps: int, start_step: int, mode: str = 'auto',
               enabled: bool = True):
    self.total = total_steps
    self.use_bar = enabled and (mode == 'on' or (
        mode == 'auto' and sys.stderr.isatty()
        and _columns(sys.stderr) >= self.MIN_COLUMNS))
    self._bar = None
    self._enabled = enabled
    self._last_step = start_step
    self._start = time.time()
    self._start_step = start_step

  def begin(self, step: int):
    """Starts the clock at `step` (after compilation) and shows the bar."""
    self._start, self._start_step, self._last_step = time.time(), step, step
    if self.use_bar and self._bar is None:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      columns = _columns(sys.stderr)
      self._bar = tqdm(total=self.total, initial=step, unit='step',
                       dynamic_ncols=columns >= self.MIN_COLUMNS,
                       ncols=None if columns >= self.MIN_COLUMNS else 100,
                       file=sys.stderr)

  def update(self, step: int, metrics: Optional[dict[str, float]] = None):
    if self._bar is not None:
      if metrics:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()},
                              refresh=False)
      self._bar.update(step - self._last_step)
    elif self._enabled and metrics:
      elapsed = time.time() - self._start
      done = step - self._start_step
      eta = elapsed / done * (self.total - step) if done > 0 else math.nan
      text = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
      log.info('step %d/%d  %s  eta %s', step, self.total, text,
               _duration(eta))
    self._last_step = step

  def message(self, text: str, level: int = logging.INFO):
    """A line of its own: above the bar on a terminal, else a log line."""
    if not self._enabled:
      return
    if self._bar is not None:
      prefix = '' if level < logging.WARNING else 'warning: '
      self._bar.write(prefix + text, file=sys.stderr)
    else:
      log.log(level, '%s', text)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def _columns(stream) -> int:
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (OSError, ValueError, AttributeError):
    return 0


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

"""Metric sinks: WORKDIR/metrics.jsonl, TensorBoard events, and the console."""

from __future__ import annotations

import json
import logging
import math
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
  """A tqdm bar with ETA on a terminal; plain log lines otherwise."""

  def __init__(self, total_steps: int, start_step: int, mode: str = 'auto',
               enabled: bool = True):
    self.total = total_steps
    self.use_bar = enabled and (mode == 'on' or (
        mode == 'auto' and sys.stderr.isatty()))
    self._bar = None
    if self.use_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step',
                       dynamic_ncols=True)
    self._enabled = enabled
    self._last_step = start_step
    self._start = time.time()
    self._start_step = start_step

  def update(self, step: int, metrics: Optional[dict[str, float]] = None):
    if self._bar is not None:
      self._bar.update(step - self._last_step)
      if metrics:
        self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()},
                              refresh=False)
    elif self._enabled and metrics:
      elapsed = time.time() - self._start
      done = max(step - self._start_step, 1)
      eta = elapsed / done * (self.total - step)
      text = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
      log.info('step %d/%d  %s  eta %s', step, self.total, text,
               _duration(eta))
    self._last_step = step

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

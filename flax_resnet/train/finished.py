"""What a run says when its workdir had already trained every step.

Rerunning the same command in a finished workdir restores the last checkpoint
and has nothing left to do. Instead of a bare '== completed ... in 1.2 s ==',
it reports what the workdir holds (its evaluations in metrics.jsonl, its
checkpoints) and how to go on: train longer, start over, or score it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional


def _eval_records(metrics_path: pathlib.Path) -> list[dict[str, Any]]:
  """The evaluation records of metrics.jsonl; unreadable lines are skipped."""
  if not metrics_path.is_file():
    return []
  records = []
  for line in metrics_path.read_bytes().decode('utf-8', 'replace').splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue  # a line cut short: the loop warns about it on resume
    if isinstance(record, dict) and 'eval_top1' in record:
      records.append(record)
  return records


def _eval_words(record: dict[str, Any]) -> str:
  return (f'top1={record["eval_top1"]:.4f} '
          f'top5={record.get("eval_top5", float("nan")):.4f} '
          f'loss={record.get("eval_loss", float("nan")):.4f} '
          f'(step {record["step"]})')


def message(config, workdir: str, checkpoint_dir: pathlib.Path,
            start_step: int, total_steps: int) -> Optional[str]:
  """The summary of a run that found every step trained, else None."""
  if start_step < total_steps:
    return None
  workdir_path = pathlib.Path(workdir)
  beyond = (f' (more than the {total_steps} this config asks for)'
            if start_step > total_steps else '')
  lines = [f'\n== already completed: {workdir} was trained to step '
           f'{start_step}{beyond} by an earlier run; nothing left to train ==']
  evals = _eval_records(workdir_path / 'metrics.jsonl')
  if evals:
    final = evals[-1]
    best = max(evals, key=lambda r: r['eval_top1'])
    lines.append(f'final eval: {_eval_words(final)}')
    if best['eval_top1'] > final['eval_top1']:
      lines.append(f'best eval:  {_eval_words(best)}')
  else:
    lines.append(f'no evaluation recorded in {workdir_path / "metrics.jsonl"}')
  steps = sorted(int(p.name) for p in checkpoint_dir.iterdir()
                 if p.is_dir() and p.name.isdigit()) if \
      checkpoint_dir.is_dir() else []
  lines.append(f'checkpoints: {checkpoint_dir} (steps '
               f'{", ".join(map(str, steps)) or "none"})')
  longer = ('--config.num_train_steps' if config.num_train_steps > 0 else
            '--config.num_epochs')
  lines.append(
      f'To train longer, rerun with a larger {longer} (it resumes from step '
      f'{start_step}); to start over, pass another --workdir; to score the '
      f'weights: python -m flax_resnet.evaluate --weights {workdir}')
  return '\n'.join(lines)

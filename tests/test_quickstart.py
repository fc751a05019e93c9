"""The README's first command: the offline quickstart reaches >= 95 %."""

import pathlib

import pytest

from flax_resnet.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_95_percent_held_out(tmp_path):
  import configs.quickstart as quickstart
  config = quickstart.get_config()
  config.compilation_cache_dir = ''
  config.progress_bar = 'off'
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result.status == 'completed'
  # All 360 held-out digits are scored (the last eval batch is masked).
  assert result.eval_metrics['eval_examples'] == 360
  print(f"quickstart: eval top-1 {result.eval_metrics['eval_top1']:.4f} "
        f'in {result.seconds:.1f} s')
  assert result.eval_metrics['eval_top1'] >= 0.95

"""notebooks/05_from_gluon_and_keras.py runs from a clean kernel.

The notebook is a jupytext percent script; its cells assert what they claim
(Gluon table answer, Keras logits within 1e-5, the load call), so executing
it is the test.
"""

from __future__ import annotations

import pathlib

import jupytext
import nbclient
import pytest

NOTEBOOK = (pathlib.Path(__file__).parents[1] / 'notebooks' /
            '05_from_gluon_and_keras.py')


@pytest.mark.slow
def test_gluon_and_keras_notebook_runs_clean(tmp_path):
  notebook = jupytext.read(NOTEBOOK)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  outputs = '\n'.join(
      out.get('text', '') for cell in notebook.cells
      if cell.cell_type == 'code' for out in cell.get('outputs', []))
  assert 'max relative error' in outputs

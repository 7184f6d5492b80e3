"""notebooks/reproduce.ipynb executes headless, every cell, at its quick settings."""
import os

import nbformat
from nbclient import NotebookClient
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'reproduce.ipynb')


def test_notebook_is_saved_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv('VLPJAX_NOTEBOOK_DIR', str(tmp_path))
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # A failing cell raises CellExecutionError, naming the cell and its traceback.
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': REPO}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 1 + 2 + 4  # the scenes, the two comparison plots, a map per design

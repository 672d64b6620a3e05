"""Every notebook in notebooks/ runs top to bottom (nbclient) with small settings."""
import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
  assert len(NOTEBOOKS) >= 3
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, pydoc_data_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("METALM_DATA_DIR", pydoc_data_dir)
  monkeypatch.setenv("METALM_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("METALM_NOTEBOOK_STEPS", "8")
  monkeypatch.setenv("METALM_NOTEBOOK_NEW_TOKENS", "8")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

"""The notebooks run offline top to bottom on CPU, from the repository root, and are saved without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    names = ["01_quick_tour.ipynb", "02_gradient_coherence.ipynb", "03_activation_maps.ipynb", "04_point_clouds.ipynb",
             "05_motion_forecasting.ipynb", "06_backbone_options.ipynb", "07_learngenes.ipynb", "08_vision_language.ipynb"]
    assert [p.name for p in NOTEBOOKS] == names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, minilm_checkpoint, monkeypatch):
    # The kernel's torch threads, as conftest sets them for the tests (shared cores stall on more).
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("FROZENLM_TEST_THREADS", "1"))
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "save notebooks without outputs"
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()

"""The notebooks run offline top to bottom on CPU, from the repository root; they are saved with the outputs of
`make notebooks` (the docs site shows them), and those outputs are fresh: made from the code cells as they are."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from notebooks.execute import FIGURES, figures, sources_hash

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
STALE = "run `make notebooks` (or `python notebooks/execute.py {}`) and commit the notebook and docs/figures/notebooks/"


def test_there_are_notebooks():
    names = ["01_quick_tour.ipynb", "02_gradient_coherence.ipynb", "03_activation_maps.ipynb", "04_point_clouds.ipynb",
             "05_motion_forecasting.ipynb", "06_backbone_options.ipynb", "07_learngenes.ipynb", "08_vision_language.ipynb",
             "09_uta_masks.ipynb"]  # fmt: skip
    assert [p.name for p in NOTEBOOKS] == names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_outputs_are_fresh(path):
    """Every code cell ran, in order, without an error, from the sources as saved (the hash `make notebooks` stored)."""
    notebook = nbformat.read(path, as_version=4)
    stored = notebook.metadata.get("frozenlm", {}).get("sources_sha256")
    assert stored == sources_hash(notebook), f"{path.name}: a code cell changed since its outputs were saved: {STALE.format(path.stem)}"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{path.name}: {STALE.format(path.stem)}"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error: {errors[0].ename}: {errors[0].evalue}"


DRAWS = re.compile(r"plt\.(subplots|figure)\(|\bFigure\(|\bplot_\w+\(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_cell_that_draws_saved_its_picture(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and DRAWS.search(cell.source):
            pictures = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert pictures, f"{path.name}, cell {index} draws a figure but saved no picture: {STALE.format(path.stem)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_are_the_notebooks(path):
    """docs/figures/notebooks/<name>.png, which the guides show, is the PNG its notebook's cell drew."""
    for name, png in figures(nbformat.read(path, as_version=4)).items():
        assert png is not None, f"{path.name}: the cell of figure {name!r} has no image output: {STALE.format(path.stem)}"
        file = FIGURES / f"{name}.png"
        assert file.is_file() and file.read_bytes() == png, f"{file.relative_to(REPO)}: {STALE.format(path.stem)}"


def test_every_figure_file_has_its_cell():
    named = {name for path in NOTEBOOKS for name in figures(nbformat.read(path, as_version=4))}
    assert {p.stem for p in FIGURES.glob("*.png")} == named, "run `make notebooks`: it removes the figures no cell names"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, minilm_checkpoint, monkeypatch):
    # The kernel's torch threads, as conftest sets them for the tests (shared cores stall on more).
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("FROZENLM_TEST_THREADS", "1"))
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":  # run from scratch, not on top of the saved outputs
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()

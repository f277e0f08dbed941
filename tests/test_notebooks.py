"""Notebooks are executed, so they cannot rot; and they are kept with their outputs, so that a
reader on GitHub sees what they print and plot without running them."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_with_its_outputs(path):
    nbformat = pytest.importorskip("nbformat", reason="the `test` extra (nbformat, nbclient) is not installed")

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count and c.outputs for c in code), \
        f"execute {path.name} and save it with its outputs"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))     # one run, top to bottom
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat", reason="the `test` extra (nbformat, nbclient) is not installed")
    NotebookClient = pytest.importorskip("nbclient", reason="the `test` extra is not installed").NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

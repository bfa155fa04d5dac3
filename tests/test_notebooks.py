"""The example notebooks (``examples/*.ipynb``): committed without outputs, and every cell runs.

Each notebook is executed by nbclient in a fresh IPython kernel at tiny sizes
(``LA_IPROP_NOTEBOOK_TINY=1``: one or two small images, a few steps) on CPU, with matplotlib's
non-interactive Agg backend, in a temporary working directory (notebook 03 writes a file there).
Compilation dominates at these sizes, so the kernels share a JAX persistent compilation cache for the
session (notebooks 01 and 03 compile the same Lite0 programs).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = ["01_quickstart.ipynb", "02_your_own_model.ipynb", "03_maps_from_elsewhere.ipynb"]
CELL_TIMEOUT_S = 600


def test_examples_are_the_three_notebooks():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{name} cell {index} has outputs: clear them before committing")
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "LA_IPROP_NOTEBOOK_TINY" in source, f"{name} must read LA_IPROP_NOTEBOOK_TINY (CI runs it tiny)"


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture()
def tiny_kernel_env(tmp_path, monkeypatch, jax_cache_dir):
    """Environment of the kernel: tiny sizes, Agg, CPU, this checkout importable, this interpreter."""
    monkeypatch.setenv("LA_IPROP_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(jax_cache_dir))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    # A "python3" kernel spec that runs *this* interpreter, found before any installed one.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tiny_kernel_env):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tiny_kernel_env)}})
    client.execute()   # raises CellExecutionError (with the cell and traceback) if any cell fails
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.get("output_type") == "error"]
    assert not errors

"""The notebooks in colab/ execute top to bottom (at their tiny size), their install cell included:
it installs jaxem (--no-deps, editable) from this checkout, as it installs a clone on Colab."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
import pytest

from conftest import device_flags
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def pip_options() -> str:
    """--no-deps, plus --no-build-isolation (offline, seconds faster) when this environment's own
    setuptools can build jaxem (PEP 639 license: setuptools >= 77)."""
    try:
        builds = int(version("setuptools").split(".")[0]) >= 77
    except PackageNotFoundError:
        builds = False
    return "--no-deps --no-build-isolation" if builds else "--no-deps"


def install_environment(monkeypatch) -> None:
    """The install cell's parameters for CI: this checkout, without dependencies (all installed)."""
    monkeypatch.setenv("JAXEM_SOURCE", str(ROOT))
    monkeypatch.setenv("JAXEM_PIP_OPTIONS", pip_options())


def install_cell(notebook):
    """The notebook's first code cell: the one that installs jaxem."""
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    assert "JAXEM_SOURCE = os.environ.get(" in cell.source
    return cell


def stream_text(cell) -> str:
    """What the executed cell printed."""
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_install_cells_are_one_and_install_from_the_checkout(tmp_path, monkeypatch):
    """Every notebook has the same install cell; run alone, it pip-installs this checkout."""
    cells = [install_cell(nbformat.read(path, as_version=4)) for path in NOTEBOOKS]
    assert len({c.source for c in cells}) == 1, "the notebooks' install cells differ"
    install_environment(monkeypatch)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cells[0].source)])
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert f"installed jaxem from {ROOT}" in stream_text(notebook.cells[0])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEM_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("JAXEM_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", device_flags(2))
    install_environment(monkeypatch)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert f"installed jaxem from {ROOT}" in stream_text(install_cell(notebook))
    assert (tmp_path / "run" / "results.json").exists()


def test_there_is_a_notebook():
    assert NOTEBOOKS, "colab/ holds no notebooks"

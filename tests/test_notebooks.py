"""The teaching notebooks (notebooks/*.ipynb) run from top to bottom without an error.

Each notebook is executed in a fresh Jupyter kernel with nbclient; a cell that raises (the notebooks
check their hand-made results against qwen2np's with asserts) or runs longer than CELL_TIMEOUT fails the
test, naming the cell. The notebooks load the real test checkpoint through `resolve_model_path("test")`:
the `test_gguf` fixture's path is handed to the kernel in $QWEN2NP_TEST_CHECKPOINT, so in CI a missing
checkpoint fails these tests instead of skipping them.

The notebooks are committed without outputs (small files, readable diffs); CI makes the outputs.
"""

import re
from pathlib import Path

import pytest

from conftest import require

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Seconds per cell. A cell takes at most ~20 s on a quiet 2-core machine (loading the GGUF); the
# machines are shared, so the limit leaves a wide margin and only catches a cell that hangs.
CELL_TIMEOUT = 600


def notebook_tools():
    """(nbformat, NotebookClient), or a skip (a failure in CI) naming the missing extra."""
    try:
        import nbformat
        from nbclient import NotebookClient
        import ipykernel  # noqa: F401  (the kernel nbclient starts)
    except ImportError as e:
        require(False, f"the notebook tools are not installed ({e}); pip install 'qwen2np[test]'")
    return nbformat, NotebookClient


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_tokenizer.ipynb", "02_forward_pass.ipynb", "03_inspection.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nbformat, _ = notebook_tools()
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_listed_in_the_readme(path):
    assert path.name in (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.checkpoint
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, test_gguf, monkeypatch):
    nbformat, NotebookClient = notebook_tools()
    monkeypatch.setenv("QWEN2NP_TEST_CHECKPOINT", str(test_gguf))   # the kernel inherits the environment
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()   # raises CellExecutionError (with the cell and its traceback) on any error

    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} cell {index}: {errors[0].ename}: {errors[0].evalue}"
        if re.search(r"^\s*plt\.show\(\)", cell.source, re.MULTILINE):   # a plot, shown inline as a PNG
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
                f"{path.name} cell {index} draws a plot but shows no PNG"

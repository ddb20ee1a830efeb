"""The three notebooks run top to bottom with their default parameters (on the tiny demo versions)."""

import os
from pathlib import Path

import ipykernel  # noqa: F401  (the notebooks' kernel: a test dependency, so missing it fails)
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo_dir(tiny_demo):
    """The session's tiny demo output, shared by the three notebooks."""
    return tiny_demo


def test_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_transfer_quickstart.ipynb", "02_connectivity.ipynb",
                                           "03_finetune_and_recycle.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, demo_dir, tmp_path):
    book = nbformat.read(path, as_version=4)
    params = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'DEMO = "ftjax_demo_tiny"' in params[0].source
    assert "google.colab" in book.cells[1].source  # the install cell comes first
    params[0].source = params[0].source.replace('DEMO = "ftjax_demo_tiny"', f"DEMO = {str(demo_dir)!r}")
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors

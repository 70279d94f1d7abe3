"""Notebooks run top to bottom with the library (each asserts its own results)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, tmp_path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    import os

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["MMLLM_NOTEBOOK_DIR"] = str(tmp_path)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def _outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_01_quickstart(tmp_path):
    nb = run_notebook("01_quickstart.ipynb", tmp_path)
    assert "validation perplexity" in _outputs(nb)

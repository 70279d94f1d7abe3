"""notebooks/03_curation.ipynb runs top to bottom on the venv's python3 kernel."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "03_curation.ipynb"


@pytest.mark.slow
def test_03_curation_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_NOTEBOOK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    assert "curated documents:" in text
    assert "minhash: [None, 'near_duplicate', None]" in text
    assert any(o.get("data", {}).get("image/png") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))  # the funnel plot is displayed
    assert (tmp_path / "curated" / "report.md").exists()
    assert os.environ["MMLLM_NOTEBOOK_DIR"] == str(tmp_path)

"""notebooks/04_evaluate.ipynb runs top to bottom on SmolLM2-135M (its cells assert their results)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "04_evaluate.ipynb"


@pytest.mark.slow
def test_04_evaluate_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_NOTEBOOK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "| capitals | 20 | acc |" in out and "reference solutions pass: [True, True, True]" in out
    assert "bits/byte" in out and "lm_eval_mmllm" in out

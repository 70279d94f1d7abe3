"""notebooks/07_vision_language.ipynb runs top to bottom (its cells assert LLaVA parity)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "07_vision_language.ipynb"


@pytest.mark.slow
def test_07_vision_language(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_NOTEBOOK_DIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "stage-1 loss" in text and "max |logit difference| vs HF LLaVA" in text
    assert (tmp_path / "llava" / "config.json").is_file()

"""The numbered notebooks run top to bottom on the venv's python3 kernel (their cells assert too)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Executes ``notebooks/<name>`` with MMLLM_NOTEBOOK_DIR=tmp_path; returns the notebook."""

    def run(name: str, timeout: int = 600) -> nbformat.NotebookNode:
        monkeypatch.setenv("MMLLM_NOTEBOOK_DIR", str(tmp_path))
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
        return nb

    return run


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for o in _outputs(nb))


@pytest.mark.slow
def test_01_quickstart(run_notebook):
    assert "validation perplexity" in _text(run_notebook("01_quickstart.ipynb"))


@pytest.mark.slow
def test_03_curation(run_notebook, tmp_path):
    nb = run_notebook("03_curation.ipynb", timeout=300)
    text = _text(nb)
    assert "curated documents:" in text
    assert "minhash: [None, 'near_duplicate', None]" in text
    assert any(o.get("data", {}).get("image/png") for o in _outputs(nb))  # the funnel plot
    assert (tmp_path / "curated" / "report.md").exists()


@pytest.mark.slow
def test_04_evaluate(run_notebook):
    out = _text(run_notebook("04_evaluate.ipynb", timeout=900))
    assert "| capitals | 20 | acc |" in out and "reference solutions pass: [True, True, True]" in out
    assert "bits/byte" in out and "lm_eval_mmllm" in out


@pytest.mark.slow
def test_09_research_variant(run_notebook):
    text = _text(run_notebook("09_research_variant.ipynb", timeout=300))
    assert "Part A:" in text and "[MASK]" in text and "components.glm.module.GLMModule" in text
    assert "blank-infilling loss:" in text


@pytest.mark.slow
def test_08_tools(run_notebook):
    out = _text(run_notebook("08_tools.ipynb", timeout=300))
    assert "calls: [('calculator(400+25)', '425')]" in out and "REPORT 425 AND MONDAY." in out


@pytest.mark.slow
def test_05_sft(run_notebook):
    out = _text(run_notebook("05_sft.ipynb", timeout=300))
    assert "validation loss:" in out and "trainable parameters:" in out and "| capitals | acc |" in out


@pytest.mark.slow
def test_06_rlhf(run_notebook):
    out = _text(run_notebook("06_rlhf.ipynb", timeout=300))
    assert "K=4 ranking loss: 0.227613 over 6 pairs" in out and "held-out pair accuracy:" in out
    assert "reward " in out and "KL " in out and '"chosen": "You are wonderful."' in out

"""`mmllm pipeline` (the README's first command), shortened."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "mmllm", "pipeline", f"hydra.run.dir={run}",
                          "trainer.max_steps=60", "trainer.val_check_interval=30",
                          "data.vocab_size=512", "model.lm.dim=64", "model.lm.n_layers=2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_ppl_after"] < 0.5 * summary["val_ppl_before"]
    assert summary["train"]["steps"] == 60
    assert len(summary["samples"]) == 3 and all(s["completion"] for s in summary["samples"])
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    assert (run / "summary.md").read_text().startswith("# mmllm pipeline run")
    assert "validation perplexity" in res.stdout
    # The text came through curation: boilerplate pages in, clean documents out, with a report.
    cur = summary["curation"]
    assert cur["input_records"] > cur["output_documents"] >= 80
    assert (run / "curated" / "report.md").is_file()
    train_text = (run / "corpus" / "train.jsonl").read_text()
    assert "Sign in" not in train_text and "uses cookies to improve" not in train_text
    # And the trained model was evaluated.
    ev = summary["evaluation"]
    assert {"capitals", "capitals_3shot"} <= set(ev) and 0.0 <= ev["capitals"]["acc"] <= 1.0

"""`mmllm eval` on an HF checkpoint directory, the Python API, and the pipeline's evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmllm.eval import evaluate, format_table, pipeline_evaluation
from mmllm.eval.builtin import capitals_task


@pytest.fixture(scope="module")
def hf_dir(tiny_model, tiny_tokenizer, tmp_path_factory):
    from mmllm.models.hf import export_hf_checkpoint

    return export_hf_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "hf", tokenizer=tiny_tokenizer)


def test_mmllm_eval_command_prints_a_table_and_writes_json(hf_dir, tmp_path, tiny_model, tiny_tokenizer):
    out = tmp_path / "results.json"
    env = {**os.environ, "MMLLM_EVAL_DATA": str(tmp_path / "none")}
    cmd = [sys.executable, "-m", "mmllm.cli", "eval", f"checkpoint={hf_dir}", "eval/suite=quick",
           "limit=6", "batch_size=4", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| capitals | 6 | acc |" in proc.stdout and "| capitals_text | 6 | bits_per_byte |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(hf_dir) and report["n"] == {"capitals": 6, "capitals_text": 6}
    # The CLI's numbers are the Python API's numbers on the same weights.
    api = evaluate(tiny_model, tiny_tokenizer, [capitals_task()], limit=6, progress=False)
    assert report["results"]["capitals"]["acc"] == api["results"]["capitals"]["acc"]
    assert report["results"]["capitals"]["acc_norm"] == api["results"]["capitals"]["acc_norm"]


def test_cli_reports_missing_tasks(tmp_path):
    from mmllm.config import compose_config
    from mmllm.eval.cli import run

    cfg = compose_config("eval", ["checkpoint=x", "eval/suite=quick"], output_dir=tmp_path)
    cfg.tasks = {}
    with pytest.raises(ValueError, match="no tasks selected"):
        run(cfg)


def test_evaluate_api_writes_json_and_table(tiny_model, tiny_tokenizer, tmp_path):
    report = evaluate(tiny_model, tiny_tokenizer, {"capitals": capitals_task(limit=5)}, progress=False,
                      output_path=tmp_path / "r.json", log_samples=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"] == report["results"] and saved["n"] == {"capitals": 5}
    assert len(saved["samples"]["capitals"]) == 5
    table = format_table(report)
    assert table.splitlines()[2].startswith("| capitals | 5 | acc |")
    with pytest.raises(ValueError, match="unique"):
        evaluate(tiny_model, tiny_tokenizer, [capitals_task(), capitals_task()], progress=False)
    with pytest.raises(TypeError, match="Task objects"):
        evaluate(tiny_model, tiny_tokenizer, [{"_target_": "x"}], progress=False)


def test_pipeline_evaluation_is_small_and_serialisable(tiny_model, tiny_tokenizer):
    out = pipeline_evaluation(tiny_model, tiny_tokenizer, None, limit=4)
    assert set(out) == {"capitals", "capitals_3shot", "capitals_text"}
    assert set(out["capitals"]) == {"acc", "acc_norm"} and out["capitals_text"]["tokens"] > 0
    json.dumps(out)

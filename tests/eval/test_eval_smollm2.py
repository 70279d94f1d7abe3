"""Agreement on a real checkpoint: SmolLM2-135M-Instruct, our evaluator vs lm-eval (within 0.5 points)."""

from __future__ import annotations

import pytest
import torch

from mmllm.eval.agreement import agreement, write_lm_eval_task


@pytest.fixture(scope="module")
def smollm2():
    """The GGUF checkpoint loaded once by transformers, and our DecoderLM converted from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmllm.models.hf import from_hf_model, smollm2_gguf_path

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return from_hf_model(hf), hf, tok


@pytest.mark.slow
def test_smollm2_accuracy_agrees_with_lm_eval(smollm2, tmp_path):
    model, hf, tok = smollm2
    res = agreement(model, tok, write_lm_eval_task(tmp_path), hf_model=hf, limit=30, batch_size=16)
    ours = res["ours"]
    assert ours["acc"] > 0.7  # a real model knows most capitals (random choice: 0.25)
    for name in ("lm_eval_mmllm", "lm_eval_hf"):
        assert abs(res[name]["acc"] - ours["acc"]) <= 0.005, (name, res[name]["acc"], ours["acc"])
        assert abs(res[name]["acc_norm"] - ours["acc_norm"]) <= 0.005, name
        flat = [x for row in res[name]["loglikelihoods"] for x in row]
        assert flat == pytest.approx([x for row in ours["loglikelihoods"] for x in row], abs=2e-3), name

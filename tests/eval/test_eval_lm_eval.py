"""The lm-eval adapter: a local-file lm-eval task through simple_evaluate, and agreement with ours."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from mmllm.eval.agreement import agreement, run_lm_eval, write_lm_eval_task
from mmllm.eval.lm_eval_adapter import MMLLMEvalLM
from mmllm.eval.runner import ModelRunner


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_lm_eval_task(tmp_path_factory.mktemp("lm_eval_task"))


@pytest.fixture(scope="module")
def hf_twin(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The tiny DecoderLM exported to an HF Llama directory and loaded by transformers."""
    from transformers import AutoModelForCausalLM

    from mmllm.models.hf import export_hf_checkpoint

    out = export_hf_checkpoint(tiny_model, tmp_path_factory.mktemp("hf"), tokenizer=tiny_tokenizer)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def test_local_lm_eval_task_runs_through_the_adapter(tiny_model, tiny_tokenizer, task_dir):
    assert (task_dir / "capitals_local.yaml").read_text().count(str(task_dir / "data")) == 2
    lm = MMLLMEvalLM(model=tiny_model, tokenizer=tiny_tokenizer, batch_size=8)
    res = run_lm_eval(lm, task_dir, limit=10)
    assert len(res["loglikelihoods"]) == 10 and all(len(x) == 4 for x in res["loglikelihoods"])
    assert 0.0 <= res["acc"] <= 1.0
    # The scores are the model's: the same requests scored directly give the same numbers.
    runner = ModelRunner(tiny_model, tiny_tokenizer, progress=False)
    q = "Question: What is the capital of Switzerland?\nAnswer:"
    direct = [ll for ll, _ in runner.loglikelihood([(q, " Bern"), (q, " Rabat"), (q, " Ankara"), (q, " Vienna")])]
    assert res["loglikelihoods"][0] == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("shots", [0, 3])
def test_agreement_with_lm_eval_is_exact_on_the_tiny_model(tiny_model, tiny_tokenizer, task_dir, hf_twin, shots):
    res = agreement(tiny_model, tiny_tokenizer, task_dir, hf_model=hf_twin, num_fewshot=shots, batch_size=8)
    ours = res["ours"]
    for name in ("lm_eval_mmllm", "lm_eval_hf"):
        assert (res[name]["acc"], res[name]["acc_norm"]) == (ours["acc"], ours["acc_norm"]), name
        flat = [x for row in res[name]["loglikelihoods"] for x in row]
        assert flat == pytest.approx([x for row in ours["loglikelihoods"] for x in row], abs=1e-3), name


def test_rolling_and_generation_requests(tiny_model, tiny_tokenizer, hf_twin):
    from lm_eval.models.huggingface import HFLM

    lm = MMLLMEvalLM(model=tiny_model, tokenizer=tiny_tokenizer, max_length=16)
    ref = HFLM(pretrained=hf_twin, tokenizer=tiny_tokenizer, max_length=16, batch_size=4, device="cpu")
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts]
    ours, theirs = lm.loglikelihood_rolling(reqs, disable_tqdm=True), ref.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-3)
    gen = [Instance("generate_until", {}, ("Question: 2+2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    out = lm.generate_until(gen, disable_tqdm=True)
    expected = ModelRunner(tiny_model, tiny_tokenizer, max_length=16).generate(
        ["Question: 2+2?\nAnswer:"], max_new_tokens=6, stop=["\n", tiny_tokenizer.eos_token])
    assert out == expected and "\n" not in out[0]


def test_adapter_needs_a_model():
    with pytest.raises(ValueError, match="checkpoint"):
        MMLLMEvalLM()

"""HF Llama import/export round trips and the real SmolLM2-135M checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mmllm.models import DecoderLM
from mmllm.models.hf import export_hf_checkpoint, load_hf_checkpoint


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_and_round_trips(tmp_path, tiny_lm_kwargs, tie):
    model = DecoderLM(**{**tiny_lm_kwargs, "vocab_size": 12}, tie_embeddings=tie,
                      rope_scaling={"type": "linear", "factor": 2.0}).eval()
    out = export_hf_checkpoint(model, tmp_path / "hf", tokenizer=_tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is tie
    hf = LlamaForCausalLM.from_pretrained(str(out)).eval()
    x = torch.randint(0, 12, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=0)
    back, tok = load_hf_checkpoint(out)
    assert tok is not None and tok.eos_token == "</s>"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_missing_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def test_export_refuses_what_llama_cannot_express(tmp_path, tiny_lm_kwargs):
    with pytest.raises(ValueError, match="RoPE"):
        export_hf_checkpoint(DecoderLM(**tiny_lm_kwargs, position="alibi"), tmp_path)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_generation_match_transformers(smollm2):
    from mmllm.generation import generate_ids

    model, tok, hf = smollm2
    assert model.num_params() == 134_515_008
    ids = tok("The capital of France is a city of museums, cafés and", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    ours = generate_ids(model, [ids[0].tolist()], max_new_tokens=20, eos_token_id=None)[0]
    assert ours == ref.tolist()
    assert tok.decode(ours).startswith(" Paris")

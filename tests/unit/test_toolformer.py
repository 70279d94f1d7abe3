"""Toolformer: tokens, the filter against hand-computed losses, interrupted decoding, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.generation import generate_ids
from mmllm.models import DecoderLM
from mmllm.tools.builtin import default_registry
from mmllm.tools.registry import ToolResult
from mmllm.tools.toolformer import (
    Candidate,
    ToolformerAnnotator,
    ToolformerDecoder,
    add_toolformer_tokens,
    execute_call,
    format_call,
    loss_weights,
    parse_call,
    token_ids,
    weighted_loss,
)

TEXT = "The sum of 400 and 25 is 425. Paris is the capital of France. 7 times 6 is 42. " * 20
PROMPT = ("Your task is to add calls to a Calculator API to a piece of text.\n"
          "Input: The price is 12 and 3, 15 in total.\n"
          "Output: The price is 12 and 3, <API>calculator(12+3) → 15</API> 15 in total.\n"
          "Input: {text}\nOutput:")


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer([TEXT], vocab_size=320, show_progress=False)
    assert add_toolformer_tokens(t) == 3
    return t


@pytest.fixture(scope="module")
def registry():
    with default_registry() as r:
        yield r


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = DecoderLM(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                  max_seq_len=512)
    m.init_weights()
    return m.eval()


def test_tokens_added_once_and_never_split(tok):
    assert add_toolformer_tokens(tok) == 0
    start, end, arrow = token_ids(tok)
    ids = tok("a <API>calculator(2+3) → 5</API> b", add_special_tokens=False)["input_ids"]
    assert ids.count(start) == ids.count(end) == ids.count(arrow) == 1
    m = DecoderLM(vocab_size=300, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    add_toolformer_tokens(tok, m)
    assert m.vocab_size == len(tok)
    with pytest.raises(ValueError, match="add_toolformer_tokens"):
        token_ids(train_bpe_tokenizer(["abc abc"], vocab_size=300, show_progress=False))


def test_parse_and_execute(registry):
    assert parse_call(" calculator( 2+3 ) ") == ("calculator", "2+3")
    assert execute_call(registry, "calculator(400+25)").content == "425"
    assert execute_call(registry, 'weekday({"date": "2024-01-01"})').content == "Monday"
    assert not execute_call(registry, "no call here").ok
    assert not execute_call(registry, "nosuchtool(1)").ok
    assert format_call("calculator", "2+3", "5") == "<API>calculator(2+3) → 5</API>"


def test_weights_and_weighted_loss():
    w = loss_weights(7)
    raw = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0]
    assert w == pytest.approx([r / 3.0 for r in raw])
    assert weighted_loss([9.0, 9.0, 1.0, 2.0], start=2) == pytest.approx((1.0 * 1 + 2.0 * 0.8) / 1.8)


class FakeScorer:
    """Per-token losses by rule: text tokens cost 2.0 without a result in front, 0.5 with the
    result "5" in the sequence (every other token 0): losses computable by hand."""

    def __init__(self, tok):
        self.result_id = tok(" 5", add_special_tokens=False)["input_ids"][-1]
        self.seen: list[list[int]] = []

    def __call__(self, seqs):
        self.seen += seqs
        return [[0.5 if self.result_id in s else 2.0 for _ in s] for s in seqs]


def test_filter_against_hand_computed_losses(tok, model, registry):
    scorer = FakeScorer(tok)
    ann = ToolformerAnnotator(model=model, tokenizer=tok, registry=registry, prompts={"calculator": PROMPT},
                              scorer=scorer, tau_f=1.0)
    x = tok("2 plus 3 is five apples", add_special_tokens=False)["input_ids"]
    good = Candidate(2, "calculator(2+3)", ToolResult("calculator", True, "5"))
    bad = Candidate(2, "calculator(2*4)", ToolResult("calculator", True, "8"))
    kept = ann.filter(x, [good, bad])
    # Weights sum to 1, so a constant per-token loss is the weighted loss: L+ = 0.5, L- = 2.0.
    assert good.loss_plus == pytest.approx(0.5) and good.loss_minus == pytest.approx(2.0)
    assert bad.loss_plus == pytest.approx(2.0) and bad.gain == pytest.approx(0.0)
    assert kept == [good]
    # The three scored sequences: call+result, nothing, call with an empty result (prefixed).
    assert scorer.seen[1] == x
    assert scorer.seen[0] == ann.call_ids("calculator(2+3)", "5") + x
    assert scorer.seen[2] == ann.call_ids("calculator(2+3)", "") + x
    ann.tau_f = 1.6  # 1.5 gain is no longer enough
    assert ann.filter(x, [good]) == []


def test_training_row_masks_results(tok, model, registry):
    ann = ToolformerAnnotator(model=model, tokenizer=tok, registry=registry, prompts={"calculator": PROMPT})
    x = tok("The sum is 425.", add_special_tokens=False)["input_ids"]
    c = Candidate(3, "calculator(400+25)", ToolResult("calculator", True, "425"))
    row = ann.training_row(x, [c])
    assert row["input_ids"] == x[:3] + ann.call_ids(c.call, "425") + x[3:]
    assert "<API>calculator(400+25)→ 425</API>" in tok.decode(row["input_ids"])
    supervised = [row["input_ids"][t + 1] for t, l in enumerate(row["labels"]) if l != -100]
    # The supervised tokens are the text and the call up to the arrow; the result and </API> are not.
    call = ann.call_ids(c.call, "425")
    n_call = call.index(ann.arrow_id) + 1
    expected = x[1:3] + call[:n_call] + x[3:]
    assert supervised == expected
    assert len(row["labels"]) == len(row["input_ids"])


def _force_arrow(model, tok, prompt_ids):
    """Points the arrow's output row at the prompt's last hidden state: the first sampled token is →."""
    with torch.no_grad():
        h = model(torch.tensor([prompt_ids]), return_hidden=True).hidden[0, -1]
        model.lm_head.weight[token_ids(tok)[2]] = 50.0 * h / h.norm()


def test_interrupted_decoding_equals_full_prompt(tok, registry):
    torch.manual_seed(1)
    m = DecoderLM(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                  max_seq_len=256)
    m.init_weights()
    m.eval()
    prompt = tok("The sum of 400 and 25 is <API>calculator(400+25)", add_special_tokens=False)["input_ids"]
    _force_arrow(m, tok, prompt)
    dec = ToolformerDecoder(model=m, tokenizer=tok, registry=registry, one_call_per_sentence=False, max_calls=1)
    out = dec.generate(prompt, max_new_tokens=12, record_logits=True)
    _, end, arrow = token_ids(tok)
    assert [c for c, _ in out["calls"]] == ["calculator(400+25)"] and out["calls"][0][1].content == "425"
    result = tok(" 425", add_special_tokens=False)["input_ids"] + [end]
    assert out["tokens"][:1 + len(result)] == [arrow] + result
    cont = out["tokens"][1 + len(result):]
    # Reference: the call and its result already in the prompt, decoded without interruption.
    full = prompt + [arrow] + result
    ref = generate_ids(m, [full], max_new_tokens=len(cont), eos_token_id=tok.eos_token_id)[0]
    assert cont == ref and len(cont) > 0
    with torch.no_grad():
        ref_logits = m(torch.tensor([full + cont])).logits[0, len(full) - 1:-1]  # predicts cont
    got = torch.stack(out["logits"][1:1 + len(cont)])
    torch.testing.assert_close(got, ref_logits, atol=1e-4, rtol=1e-4)


def _overfit(tok, ids, steps=40):
    """A 1-layer model trained for a few steps on one annotated sequence: it writes that call."""
    torch.manual_seed(2)
    m = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=512)
    m.init_weights()
    ids = torch.tensor([ids])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = m(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_sampling_execution_filtering_end_to_end(tok, registry):
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    texts = [" The sum of 400 and 25 is 425.", " 7 times 6 is 42."]
    x, i = enc(texts[0]), len(enc(" The sum of 400 and 25 is"))
    call = [token_ids(tok)[0]] + enc("calculator(400+25)") + [token_ids(tok)[2]] + enc(" 425") + [token_ids(tok)[1]]
    prompt = "Add calculator calls.\nInput:{text}\nOutput:"  # short: the overfitting stays cheap
    m = _overfit(tok, enc(prompt.partition("{text}")[0]) + x[:i] + call + x[i:])
    ann = ToolformerAnnotator(model=m, tokenizer=tok, registry=registry, prompts={"calculator": prompt},
                              tau_s=0.05, top_k=2, num_samples=3, max_call_tokens=32, tau_f=-1e9,
                              prefix_calls=False)  # keeps every executed call: counts are exact
    rows = [ann.annotate(t) for t in texts]
    s = ann.stats
    assert s.texts == 2 and 1 <= s.candidates <= 4
    assert s.sampled + s.failed.get("unterminated", 0) == s.candidates * 3
    assert s.executed + s.failed.get("error", 0) == s.sampled
    assert s.executed >= 1 and s.kept >= 1 and s.kept <= s.executed and s.share_kept == s.kept / s.sampled
    (row, kept), _ = rows
    assert [c.call for c in kept] == ["calculator(400+25)"] and kept[0].result.content == "425"
    assert kept[0].loss_plus is not None and len(row["input_ids"]) == len(row["labels"])
    assert s.kept == len({c.position for c in kept} | {c.position for c in rows[1][1]})
    assert "<API>calculator(400+25)→ 425</API>" in tok.decode(row["input_ids"])
    as_dict = s.as_dict()
    assert as_dict["kept"] == s.kept and set(as_dict) >= {"candidates", "sampled", "executed", "share_kept"}


def test_default_prompts_cover_the_registry(registry, tok, model):
    from mmllm.tools.toolformer import default_prompts

    prompts = default_prompts(registry)
    assert set(prompts) == {"calculator", "today"} and all("{text}" in p for p in prompts.values())
    assert set(ToolformerAnnotator(model=model, tokenizer=tok, registry=registry).prompts) == set(prompts)


def test_one_call_per_sentence(tok, registry):
    """Right after a call, <API> is the model's favourite: refused in the same sentence, taken without the option."""
    torch.manual_seed(3)
    m = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=256)
    m.init_weights()
    m.eval()
    start, end, arrow = token_ids(tok)
    prompt = tok("The sum is <API>calculator(1+1)", add_special_tokens=False)["input_ids"]
    _force_arrow(m, tok, prompt)
    after = prompt + [arrow] + tok(" 2", add_special_tokens=False)["input_ids"] + [end]
    with torch.no_grad():
        h = m(torch.tensor([after]), return_hidden=True).hidden[0, -1]
        m.lm_head.weight[start] = 60.0 * h / h.norm()
    n = len(after) - len(prompt)
    free = ToolformerDecoder(model=m, tokenizer=tok, registry=registry, one_call_per_sentence=False)
    assert free.generate(prompt, max_new_tokens=4)["tokens"][n] == start
    once = ToolformerDecoder(model=m, tokenizer=tok, registry=registry, one_call_per_sentence=True)
    out = once.generate(prompt, max_new_tokens=4, record_logits=True)
    assert out["tokens"][:n] == after[len(prompt):] and out["tokens"][n] != start
    assert len(out["calls"]) == 1
    dot = tok(".", add_special_tokens=False)["input_ids"]
    assert not once._call_allowed([5, 6, start]) and once._call_allowed(dot + [start]) and once._call_allowed(None)


def test_cli_annotates_a_jsonl_corpus(tmp_path, capsys):
    from mmllm.models.hf import export_hf_checkpoint
    from mmllm.tools.toolformer_cli import main

    tok = train_bpe_tokenizer([TEXT], vocab_size=300, show_progress=False)  # no Toolformer tokens yet
    m = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=1024)
    m.init_weights()
    export_hf_checkpoint(m, tmp_path / "model", tokenizer=tok)
    (tmp_path / "texts.jsonl").write_text('{"text": "The sum of 400 and 25 is 425."}\n\n7 times 6 is 42.\n')
    assert main(["annotate", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "texts.jsonl"),
                 "--output", str(tmp_path / "out" / "rows.jsonl"), "--tau-s", "0", "--top-k", "1",
                 "--num-samples", "1", "--max-call-tokens", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(rows) == 2 and stats["texts"] == 2 and stats["candidates"] == 2 * 2  # 2 tools x top-1
    assert all(len(r["input_ids"]) == len(r["labels"]) and r["calls"] == [] for r in rows)


def test_rows_train_with_causal_lm_module(tok, registry, model):
    """Annotated rows pack and train as any SFT example: only the text and calls count, loss falls."""
    import numpy as np

    from mmllm.data.packing import collate_packed, pack
    from mmllm.modules.causal_lm import CausalLMModule

    ann = ToolformerAnnotator(model=model, tokenizer=tok, registry=registry, prompts={"calculator": PROMPT})
    x = tok("The sum is 425.", add_special_tokens=False)["input_ids"]
    c = Candidate(3, "calculator(400+25)", ToolResult("calculator", True, "425"))
    rows = [ann.training_row(x, [c]), ann.training_row(x, [])]
    examples = [(np.asarray(r["input_ids"]), np.asarray(r["labels"])) for r in rows]
    batch = collate_packed([[examples[i] for i in row] for row in pack(examples, 64)], pad_id=0)
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=64)
    lm.init_weights()
    module = CausalLMModule(model=lm)
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _, n = module.forward_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert int(n) == sum(sum(lab != -100 for lab in r["labels"]) for r in rows)
    assert losses[-1] < 0.5 * losses[0]

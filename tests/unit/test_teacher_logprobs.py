"""``Teacher.option_logprobs``: LocalTeacher against a hand computation from a tiny model's logits
(multi-token options summed, a prefix option ended, renormalised), the cache, OpenAITeacher
against a fake OpenAI-compatible server on 127.0.0.1 with chosen top_logprobs, and the base
class's refusal."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmllm.teacher import LocalTeacher, OpenAITeacher, Teacher, TeacherError
from mmllm.teacher.options import plan_rows

TEXT = ("Response A is better. Response B is better. It is a tie. Verdict: A. Verdict: B. "
        "The capital of France is Paris. Scores 1 2 3 4 5 6 7 8 9. ") * 20
CONVS = [[{"role": "system", "content": "You judge."}, {"role": "user", "content": "A or B?"}],
         [{"role": "user", "content": "Which is better, A or B? Answer with one letter."}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, model, tokenizer): a random 1-layer DecoderLM saved as a kit checkpoint."""
    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.models.decoder_lm import DecoderLM

    root = tmp_path_factory.mktemp("tiny_judge")
    tok = train_bpe_tokenizer([TEXT], vocab_size=320, show_progress=False)
    tok.save_pretrained(root / "tokenizer")
    config = {"vocab_size": len(tok), "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
              "hidden_dim": 64, "max_seq_len": 1024}
    torch.manual_seed(0)
    model = DecoderLM(**config).eval()
    with torch.no_grad():  # a sharper random distribution than the small init gives
        model.lm_head.weight.mul_(40.0)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": config,
                          "tokenizer": str(root / "tokenizer")}}, root / "final.ckpt")
    return root / "final.ckpt", model, tok


def hand_logprobs(model, tok, messages, options) -> dict[str, float]:
    """log P(reply = option ...) from full-sequence logits, one forward per option, renormalised."""
    from mmllm.data.chat import render_prompt

    prompt = render_prompt(messages, tok)
    ids = {o: tok(o, add_special_tokens=False)["input_ids"] for o in options}
    raw = {}
    with torch.no_grad():
        for o, oid in ids.items():
            seq = torch.tensor([prompt + oid])
            lp = torch.log_softmax(model(seq).logits[0].double(), -1)  # (T, V)
            raw[o] = sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(oid))
            longer = [q for q in ids.values() if len(q) > len(oid) and q[:len(oid)] == oid]
            if longer:  # "1" must not continue into "10": times P(next token is not "0")
                p_more = sum(lp[len(prompt) - 1 + len(oid), t].exp().item() for t in {q[len(oid)] for q in longer})
                raw[o] += math.log(1 - p_more)
    log_z = math.log(sum(math.exp(v) for v in raw.values()))
    return {o: v - log_z for o, v in raw.items()}


def test_local_option_logprobs_equal_a_hand_computation_and_are_cached(tiny, tmp_path):
    ckpt, model, tok = tiny
    options = ["A", "B", "tie", "Verdict: A", "1", "10"]
    assert len(tok("Verdict: A", add_special_tokens=False)["input_ids"]) > 1  # a multi-token option
    one, ten = (tok(o, add_special_tokens=False)["input_ids"] for o in ("1", "10"))
    assert ten[:1] == one and len(ten) == 2  # "1" is a token prefix of "10"
    kw = {"checkpoint": str(ckpt), "progress": False, "device": "cpu", "max_batch": 2,
          "cache_path": tmp_path / "c.sqlite"}
    with LocalTeacher(**kw) as teacher:
        got = teacher.option_logprobs(CONVS, options)
    for conv, g in zip(CONVS, got):
        want = hand_logprobs(model, tok, conv, options)
        assert list(g) == options and g == pytest.approx(want, abs=1e-4)
        assert sum(math.exp(v) for v in g.values()) == pytest.approx(1.0, abs=1e-6)
        assert max(g.values()) - min(g.values()) > 0.5  # not a uniform answer
    with LocalTeacher(**kw) as again:  # a rerun reads the cache: no model loaded
        assert again.option_logprobs(CONVS, options) == got and again._engine is None
        assert again.option_logprobs(CONVS, ["A", "B"]) != got[:2]  # other options: other keys
        assert again.stats["cache_hits"] == 2 and again.stats["requests"] == 2


def test_plan_shares_rows_and_bad_options_are_errors(tiny):
    plan = plan_rows([5, 6, 7], [[1], [2], [3, 4], [3, 4, 9]])
    assert plan.rows == [[5, 6, 7, 3, 4]] and plan.row_of == [0, 0, 0, 0]  # one forward row
    with pytest.raises(ValueError, match="distinct"):
        plan_rows([5], [[1], [1]])
    with pytest.raises(ValueError, match="two or more"):
        LocalTeacher(checkpoint=str(tiny[0]), progress=False).option_logprobs(CONVS, ["A"])


def test_a_teacher_without_token_probabilities_says_so():
    class TextOnly(Teacher):
        def _complete(self, messages, sampling):
            return "A"

    with pytest.raises(NotImplementedError, match="TextOnly cannot score options"):
        TextOnly(model="t", progress=False).option_logprobs(CONVS, ["A", "B"])


# ------------------------------------------------------------------ OpenAI-compatible server
def fake_server(top: list[tuple[str, float]], seen: list):
    """An OpenAI-compatible chat endpoint whose one-token answer has the given top_logprobs."""
    from aiohttp import web

    async def completions(request):
        body = await request.json()
        seen.append(body)
        tops = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
        content = [{"token": top[0][0], "logprob": top[0][1], "bytes": None, "top_logprobs": tops}]
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "length", "logprobs": {"content": content},
                         "message": {"role": "assistant", "content": top[0][0]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    return app


def test_openai_option_logprobs_from_top_logprobs(tmp_path):
    from mmllm.serve import ServerThread

    seen: list = []
    top = [("A", -0.5), (" B", -1.5), ("B", -2.0), ("The", -3.0)]  # "tie" is not listed
    with ServerThread(fake_server(top, seen)) as server:
        kw = {"model": "judge", "base_url": server.url, "progress": False, "cache_path": tmp_path / "c.sqlite"}
        got = OpenAITeacher(**kw).option_logprobs(CONVS, ["A", "B", "tie"])
        assert [b["max_tokens"] for b in seen] == [1, 1] and seen[0]["logprobs"] is True
        assert seen[0]["top_logprobs"] == 20 and sorted(map(str, (b["messages"] for b in seen))) == sorted(map(str, CONVS))
        # A: e^-0.5; B: " B" and "B" together; tie: the least listed (-3) minus the margin (1.0).
        raw = {"A": -0.5, "B": math.log(math.exp(-1.5) + math.exp(-2.0)), "tie": -4.0}
        log_z = math.log(sum(math.exp(v) for v in raw.values()))
        assert got[0] == pytest.approx({k: v - log_z for k, v in raw.items()}) and got[1] == got[0]
        again = OpenAITeacher(**kw)
        assert again.option_logprobs(CONVS, ["A", "B", "tie"]) == got and len(seen) == 2  # cached
        skip = OpenAITeacher(**{**kw, "cache_path": None}, on_error="skip")
        assert skip.option_logprobs(CONVS[:1], ["1", "2"]) == [None]  # no option among the top tokens
        assert skip.stats["failed"] == 1
        with pytest.raises(TeacherError, match="none of the options"):
            OpenAITeacher(**{**kw, "cache_path": None}).option_logprobs(CONVS[:1], ["1", "2"])
    cache_rows = [json.loads(r[0]) for r in again.cache._db.execute("SELECT request FROM responses")]
    assert cache_rows[0]["sampling"]["option_logprobs"] == ["A", "B", "tie"]


def test_the_vlm_judge_scores_with_a_tiny_local_teacher(tiny):
    """The tiny model never writes "8 6", but its digit probabilities give every answer a score."""
    from mmllm.eval.vlm_judge import VLMJudge, summarize

    items = [{"id": "q1", "question": "What is in the image?", "answer": "A cat.", "reference": "Paris.",
              "context": "A cat on a mat.", "category": "conv"}]
    with LocalTeacher(checkpoint=str(tiny[0]), progress=False, device="cpu") as teacher:
        judged = VLMJudge(teacher=teacher, scoring="logprob").judge(items)
    assert judged[0].failures == 0 and len(judged[0].explanations) == 2
    assert 1.0 <= judged[0].model_score <= 10.0 and 1.0 <= judged[0].reference_score <= 10.0
    assert summarize(judged)["all"]["n"] == 1

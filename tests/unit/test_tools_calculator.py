"""The calculator: right answers, and a table of hostile inputs it must refuse (never eval)."""

import time

import pytest

from mmllm.tools import ToolRegistry, calculate, calculator_tool
from mmllm.tools.calculator import MAX_INT_BITS, evaluate

GOOD = [
    ("1 + 2 * 3", "7"), ("(3 + 4) * 2", "14"), ("0.1 + 0.2", "0.3"), ("2 ** 10", "1024"), ("-2 ** 2", "-4"),
    ("7 // 2", "3"), ("7 % 3", "1"), ("7 / 2", "3.5"), ("sqrt(16)", "4"), ("factorial(5)", "120"),
    ("round(2.675, 2)", "2.67"), ("max(3, 9, 4)", "9"), ("2 ** -1", "0.5"), ("pi", "3.14159265358979"),
    ("gcd(12, 18)", "6"), ("comb(10, 3)", "120"), ("log10(1000)", "3"), ("2 ** 4000 // 2 ** 3999", "2"),
]


@pytest.mark.parametrize("expr,want", GOOD)
def test_calculator_values(expr, want):
    assert calculate(expr) == want


HOSTILE = [
    ("__import__('os').system('id')", "not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("9**9**9", "too large"),
    ("10**10**10", "too large"),
    ("'a'*10**9", "only numbers"),
    ("(" * 100 + "1" + ")" * 100, "nested too deeply"),
    ("-" * 600 + "1", "too long"),
    ("lambda: 1", "not allowed"),
    ("(lambda: 1)()", "not allowed"),
    ("[x for x in range(10**9)]", "not allowed"),
    ("factorial(100000)", "at most"),
    ("factorial(10**9)", "at most"),
    ("comb(10**8, 5 * 10**7)", "at most"),
    ("round(5, -10**9)", "ndigits"),
    ("2 ** 4096 * 2 ** 4096", "too large"),
    ("(2 ** 4000) * (2 ** 4000)", "too large"),
    ("x + 1", "unknown name"),
    ("open('/etc/passwd')", "not allowed"),
    ("math.sqrt(4)", "not allowed"),
    ("sqrt(x=4)", "positional"),
    ("(1, 2)[0]", "not allowed"),
    ("2 ^ 3", "write powers as"),
    ("1 if 1 else 2", "not allowed"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("exp(1000)", "range error"),
    ("1e308 * 10", "not a finite number"),
    ("(-8) ** (1/3)", "not a real number"),
    ("log(-1)", "domain error"),
    ("True + 1", "only numbers"),
    ("1 +", "cannot parse"),
    ("", "non-empty"),
    ("1 << 10000", "not allowed"),
]


@pytest.mark.parametrize("expr,reason", HOSTILE)
def test_calculator_refuses_hostile_input_fast(expr, reason):
    registry = ToolRegistry(tools=[calculator_tool()], timeout=5.0)
    start = time.process_time()
    result = registry.call("calculator", {"expression": expr})
    assert not result.ok and result.content.startswith("error: ")
    assert reason in result.content
    assert time.process_time() - start < 2.0  # refused before the cost is paid (CPU time, not wall)


def test_int_result_bound_is_exact():
    assert evaluate(f"2 ** {MAX_INT_BITS - 1}") == 2 ** (MAX_INT_BITS - 1)
    with pytest.raises(Exception, match="too large"):
        evaluate(f"2 ** {MAX_INT_BITS + 1}")


def test_calculator_never_evaluates_python(monkeypatch):
    import builtins
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval called"))
    assert calculate("3 * (4 + 5)") == "27"

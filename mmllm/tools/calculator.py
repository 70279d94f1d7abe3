"""A calculator that parses with ``ast`` and evaluates a whitelist of nodes: never ``eval``.

Only numbers (int, float), ``+ - * / // % **``, unary ``+ -``, parentheses, the constants
``pi e tau`` and calls of the math functions in :data:`FUNCTIONS` (positional arguments only)
are accepted. Everything else is refused with a reason the model can read: names, attributes
(``().__class__``), strings (``'a'*10**9``), subscripts, comprehensions, lambdas, keywords,
``^`` (with a hint to use ``**``). Costs are bounded before they are paid: the input length,
the node count and the nesting depth are capped, an integer result may have at most
``MAX_INT_BITS`` bits (checked from the operands *before* a ``**`` or ``*`` runs, so ``9**9**9``
is refused at once), and factorial/comb/perm take bounded arguments.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from mmllm.tools.registry import Tool, ToolError

MAX_CHARS = 512        # longest expression accepted
MAX_NODES = 256        # AST nodes
MAX_DEPTH = 32         # nesting depth of the AST
MAX_INT_BITS = 4096    # ~1233 decimal digits
MAX_FACTORIAL = 300    # factorial(300) has 2042 bits

Number = int | float

_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _bounded(limit: int, fn: Callable) -> Callable:
    """``fn`` refusing integer arguments above ``limit`` (their results grow too fast)."""
    def wrapped(*args):
        if any(isinstance(a, int) and abs(a) > limit for a in args):
            raise ToolError(f"{fn.__name__} arguments must be at most {limit}")
        return fn(*args)
    wrapped.__name__ = fn.__name__
    return wrapped


def _round(x: Number, ndigits: int | None = None) -> Number:
    # round(5, -10**9) would build 10**(10**9): bound the digits.
    if ndigits is not None and abs(ndigits) > 100:
        raise ToolError("round: ndigits must be between -100 and 100")
    return round(x) if ndigits is None else round(x, ndigits)


FUNCTIONS: dict[str, Callable] = {
    **{n: getattr(math, n) for n in ("sqrt", "exp", "log", "log10", "log2", "sin", "cos", "tan", "asin",
                                     "acos", "atan", "atan2", "sinh", "cosh", "tanh", "floor", "ceil",
                                     "hypot", "degrees", "radians", "gcd", "fabs", "trunc")},
    "abs": abs, "round": _round, "min": min, "max": max,
    "factorial": _bounded(MAX_FACTORIAL, math.factorial),
    "comb": _bounded(1000, math.comb), "perm": _bounded(1000, math.perm),
}


def _bits(x: Number) -> int:
    return x.bit_length() if isinstance(x, int) else 0


def _check_cost(op: type, a: Number, b: Number) -> None:
    """Refuses an integer ``**``/``*`` whose result would exceed MAX_INT_BITS, before it runs."""
    if not (isinstance(a, int) and isinstance(b, int)):
        return
    if op is ast.Pow and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > MAX_INT_BITS:
        raise ToolError(f"result too large (more than {MAX_INT_BITS} bits)")
    if op is ast.Mult and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise ToolError(f"result too large (more than {MAX_INT_BITS} bits)")


def _depth(node: ast.AST) -> int:
    children = list(ast.iter_child_nodes(node))
    return 1 + max((_depth(c) for c in children), default=0) if children else 1


def _paren_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        deepest = max(deepest, depth)
    return deepest


class _Evaluator:
    """Walks a checked expression tree; each node kind has one rule."""

    def eval(self, node: ast.AST) -> Number:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ToolError(f"only numbers are allowed, got {type(node.value).__name__} {node.value!r:.40}")
            return node.value
        if isinstance(node, ast.BinOp):
            return self._binop(node)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.eval(node.operand))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            raise ToolError(f"unknown name {node.id!r}; constants: {', '.join(CONSTANTS)}")
        if isinstance(node, ast.Call):
            return self._call(node)
        raise ToolError(f"{type(node).__name__} is not allowed in a calculator expression")

    def _binop(self, node: ast.BinOp) -> Number:
        if isinstance(node.op, ast.BitXor):
            raise ToolError("'^' is bitwise xor, not allowed; write powers as a ** b")
        if type(node.op) not in _BINARY:
            raise ToolError(f"operator {type(node.op).__name__} is not allowed")
        a, b = self.eval(node.left), self.eval(node.right)
        _check_cost(type(node.op), a, b)
        try:
            value = _BINARY[type(node.op)](a, b)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex):  # (-8) ** (1/3)
            raise ToolError("the result is not a real number")
        return value

    def _call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise ToolError(f"function {what!r} is not allowed; allowed: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ToolError("functions take plain positional arguments only")
        args = [self.eval(a) for a in node.args]
        try:
            return FUNCTIONS[node.func.id](*args)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ToolError(f"{node.func.id}: {exc}") from None


def evaluate(expression: str) -> Number:
    """The value of an arithmetic ``expression``.

    Raises:
        ToolError: the expression is refused (why is in the message) or cannot be evaluated.
    """
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string")
    if len(expression) > MAX_CHARS:
        raise ToolError(f"expression too long ({len(expression)} > {MAX_CHARS} characters)")
    if _paren_depth(expression) > MAX_DEPTH:
        raise ToolError(f"expression nested too deeply (more than {MAX_DEPTH} levels of parentheses)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ToolError(f"cannot parse expression: {getattr(exc, 'msg', exc)}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"expression too complex (more than {MAX_NODES} nodes)")
    if _depth(tree) > MAX_DEPTH:
        raise ToolError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
    try:
        value = _Evaluator().eval(tree.body)
    except OverflowError:
        raise ToolError("result too large (float overflow)") from None
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"result too large (more than {MAX_INT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result is not a finite number")
    return value


def format_number(value: Number) -> str:
    """Integers exactly; floats to 15 significant digits (``0.1 + 0.2`` -> ``0.3``)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else format(value, ".15g")
    return str(value)


def calculate(expression: str) -> str:
    """The calculator tool's function: the formatted value of ``expression``."""
    return format_number(evaluate(expression))


def calculator_tool(*, timeout: float | None = None) -> Tool:
    """The ``calculator`` tool (``{"expression": "..."}``)."""
    return Tool(
        name="calculator",
        description="Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses, "
                    f"constants pi e tau, functions {', '.join(sorted(FUNCTIONS))}.",
        parameters={"type": "object", "additionalProperties": False, "required": ["expression"],
                    "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * sqrt(2)"}}},
        fn=calculate, timeout=timeout)

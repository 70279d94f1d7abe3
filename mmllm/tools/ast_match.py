"""Gorilla's AST sub-tree matching: is the reference API call a sub-tree of the candidate code?

A candidate (a model's answer) is parsed with ``ast``; it is **correct** when one of its calls
*contains* the reference call: the same function name path (``torchvision.models.resnet50``;
dotted names compared exactly), every positional argument of the reference at the same
position and every keyword of the reference present (any order), each with an equal **value**;
extra arguments in the candidate are allowed (optional arguments). Values: literals are
compared as Python values (``1 == 1.0``, but ``True`` is not ``1``; lists and tuples alike;
strings as parsed, so quote style never matters, with surrounding whitespace stripped; as in
Gorilla's scripts, which strip the quotes and compare case-sensitively, since torchvision weight
names and Hub ids are case-sensitive), nested calls recursively by the same rule, names and
attributes by their structure. Gorilla's own scripts compare only the ``repo_or_dir``/``model``
arguments and call an answer correct when the API it matches has the question's domain; the
kit compares every reference argument and asks for the reference API itself.

Outcomes (:data:`OUTCOMES`), one per answer:

* ``correct``: the reference is a sub-tree of the candidate.
* ``wrong_api``: not the reference, but a sub-tree match of another catalog API.
* ``hallucination``: calls that match no catalog API (an invented API or invented arguments).
* ``parse_failure``: the answer tries to call something (``name(`` appears) but does not parse.
* ``abstention``: no call at all (empty, prose only, "I don't know").

Where the code is taken from: the ``<<<api_call>>>:`` field of a Gorilla-format answer when
present, else the fenced code blocks, else the whole answer; prose around code is tolerated by
parsing line by line when the whole does not parse.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

OUTCOMES = ("correct", "wrong_api", "hallucination", "parse_failure", "abstention")
_MISSING = object()
_CALL_LIKE = re.compile(r"[A-Za-z_][\w.]*\s*\(")
_FENCE = re.compile(r"```[\w+-]*\n(.*?)```", re.DOTALL)


def call_path(node: ast.Call) -> str | None:
    """``a.b.c`` for a call of ``a.b.c(...)``; None when the callee is not a dotted name."""
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if not isinstance(f, ast.Name):
        return None
    return ".".join([f.id, *reversed(parts)])


@functools.lru_cache(maxsize=4096)
def parse_call(source: str) -> ast.Call:
    """The one call in ``source`` (a reference ``api_call``; cached, do not mutate the node).

    Raises:
        ValueError: it does not parse or is not a single call.
    """
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"not a Python call: {source!r} ({exc.msg})") from None
    if not isinstance(node, ast.Call):
        raise ValueError(f"not a single call: {source!r}")  # noqa: TRY004 (a bad value, not a bad type)
    return node


def normalise_string(s: str) -> str:
    return s.strip()


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def literals_equal(a, b) -> bool:
    """Value equality for argument literals (see the module docstring)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return normalise_string(a) == normalise_string(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(literals_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(literals_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def values_equal(ref: ast.AST, cand: ast.AST) -> bool:
    r, c = _literal(ref), _literal(cand)
    if r is not _MISSING and c is not _MISSING:
        return literals_equal(r, c)
    if isinstance(ref, ast.Call) and isinstance(cand, ast.Call):
        return call_contains(cand, ref)
    return ast.dump(ref, annotate_fields=False) == ast.dump(cand, annotate_fields=False)


def call_contains(candidate: ast.Call, reference: ast.Call) -> bool:
    """True when ``reference`` is a sub-tree of ``candidate`` (same callee, its arguments present)."""
    if call_path(reference) is None or call_path(candidate) != call_path(reference):
        return False
    if len(candidate.args) < len(reference.args):
        return False
    if not all(values_equal(r, c) for r, c in zip(reference.args, candidate.args)):
        return False
    given = {k.arg: k.value for k in candidate.keywords if k.arg is not None}
    for kw in reference.keywords:
        if kw.arg is None:  # **kwargs in a reference: compare structurally
            if not any(k.arg is None and values_equal(kw.value, k.value) for k in candidate.keywords):
                return False
        elif kw.arg not in given or not values_equal(kw.value, given[kw.arg]):
            return False
    return True


def extract_code(answer: str) -> str:
    """The code part of an answer (``<<<api_call>>>`` field, fenced blocks, or all of it)."""
    m = re.search(r"<<<api_call>>>\s*:?\s*(.*?)(?=<<<|\n\s*\n|$)", answer, re.DOTALL)
    if m:
        return m.group(1).strip()
    blocks = _FENCE.findall(answer)
    return "\n".join(blocks).strip() if blocks else answer.strip()


def candidate_calls(answer: str) -> list[ast.Call] | None:
    """Every call in the answer's code; None when the code does not parse (parse failure)."""
    code = extract_code(answer)
    if not code:
        return []
    try:
        trees = [ast.parse(code)]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        trees = []  # prose around code: keep the lines that parse on their own
        for line in code.splitlines():
            try:
                trees.append(ast.parse(line.strip()))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
        calls = [n for t in trees for n in ast.walk(t) if isinstance(n, ast.Call)]
        if not calls:
            return None if _CALL_LIKE.search(code) else []
        return calls
    return [n for t in trees for n in ast.walk(t) if isinstance(n, ast.Call)]


def classify(answer: str | None, reference: str, catalog_calls: Sequence[str]) -> str:
    """The outcome (:data:`OUTCOMES`) of one answer against its reference ``api_call``."""
    calls = candidate_calls(answer or "")
    if calls is None:
        return "parse_failure"
    if not calls:
        return "abstention"
    ref = parse_call(reference)
    if any(call_contains(c, ref) for c in calls):
        return "correct"
    others = [parse_call(s) for s in catalog_calls if s.strip() != reference.strip()]
    if any(call_contains(c, o) for c in calls for o in others):
        return "wrong_api"
    return "hallucination"


@dataclass
class MatchReport:
    """Outcome counts over an evaluation set.

    Attributes:
        counts: answers per outcome (every outcome present, zeros included).
        outcomes: the outcome of each answer, in order.
    """

    counts: Counter = field(default_factory=Counter)
    outcomes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    def rate(self, outcome: str) -> float:
        return self.counts[outcome] / self.total if self.total else 0.0

    @property
    def accuracy(self) -> float:
        return self.rate("correct")

    def as_dict(self) -> dict:
        return {"total": self.total, "accuracy": self.accuracy, **{o: self.counts[o] for o in OUTCOMES},
                **{f"{o}_rate": self.rate(o) for o in OUTCOMES[1:]}}

    def summary(self) -> str:
        rows = [f"{o:<14} {self.counts[o]:>6}  {100 * self.rate(o):6.2f} %" for o in OUTCOMES]
        return f"AST match over {self.total} answers (accuracy {100 * self.accuracy:.2f} %)\n" + "\n".join(rows)


def evaluate_answers(answers: Sequence[str | None], references: Sequence[str],
                     catalog_calls: Sequence[str]) -> MatchReport:
    """Classifies every answer against its reference ``api_call`` (see :func:`classify`)."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    report = MatchReport(counts=Counter({o: 0 for o in OUTCOMES}))
    for answer, ref in zip(answers, references):
        outcome = classify(answer, ref, catalog_calls)
        report.counts[outcome] += 1
        report.outcomes.append(outcome)
    return report

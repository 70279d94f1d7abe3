"""The kit's function-call checker for BFCL's AST categories (simple, multiple, parallel, ...).

A decoded call ``(name, {param: value})`` is checked against a function document (JSON schema
in BFCL's dialect: ``dict``, ``integer``, ``float``, ``string``, ``boolean``, ``array``,
``tuple``, ``any``) and one ground-truth entry ``{name: {param: [allowed values]}}``, where
``""`` among the allowed values marks a parameter that may be left out. The rules:

* the name must be the function's (exactly; ``underscore_names`` also accepts ``a_b`` for
  ``a.b``, as OpenAI-style names cannot hold dots);
* every required parameter is given; every given parameter is in the schema *and* in the
  ground truth (an argument the answer does not expect is wrong, even if the schema has it);
* types: the value's Python type must be the declared one (``bool`` is not an integer), with
  two coercions: an integer is a valid float (at any depth of a list), a tuple is a valid
  tuple/array. A value of the type of the allowed values instead (a variable name given as a
  string for an integer parameter) is accepted and then compared exactly. ``any`` takes any type;
* values: strings are compared after removing spaces and ``,./-_*^`` and lowercasing (BFCL's
  documented normalisation), lists element by element in order, dicts key by key (a missing
  key must be optional), lists of dicts dict by dict; other values by ``==`` (``5 == 5.0``);
  ``[]`` is accepted for an optional list parameter;
* a parameter the call leaves out must be optional in the ground truth.

Parallel categories match calls to ground-truth entries order-free, as a perfect bipartite
matching (every call used once), not greedily.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
          "dict": dict}
_STRIP = re.compile(r"[ ,./\-_*^]")
_OPTIONAL = ""


@dataclass(frozen=True)
class Check:
    """The verdict on one output: ``valid``, and when not, a short ``error_type`` and message."""

    valid: bool
    error_type: str = ""
    error: str = ""


OK = Check(True)


def _fail(kind: str, message: str) -> Check:
    return Check(False, kind, message)


def standardise(s: str) -> str:
    """BFCL's string normalisation: no spaces or ``,./-_*^``, lowercase, ``'`` as ``"``."""
    return _STRIP.sub("", s).lower().replace("'", '"')


def _std(v):
    return standardise(v) if isinstance(v, str) else v


def _coerce(value, schema: Mapping):
    """Applies the int->float and tuple->list coercions the declared type allows."""
    kind = schema.get("type")
    if kind == "float" and type(value) is int:
        return float(value)
    if kind in ("array", "tuple") and isinstance(value, (list, tuple)):
        items = schema.get("items") or {}
        return [_coerce(v, items) for v in value]
    return value


def _type_ok(value, schema: Mapping) -> bool:
    kind = schema.get("type")
    if kind == "any" or kind not in _TYPES:
        return kind == "any"
    if type(value) is not _TYPES[kind]:
        return False
    if kind in ("array", "tuple") and (schema.get("items") or {}).get("type"):
        return all(_type_ok(v, schema["items"]) for v in value)
    return True


def _answer_type(allowed: Sequence) -> type | None:
    """The type of the ground truth's non-optional allowed values (None if only optional)."""
    for a in allowed:
        if a != _OPTIONAL:
            return type(a)
    return None


def _dict_ok(value: Mapping, allowed: Sequence) -> bool:
    for option in allowed:
        if not isinstance(option, Mapping):
            continue
        keys_ok = all(k in option and _std(v) in [_std(a) for a in option[k]] for k, v in value.items())
        missing_ok = all(k in value or _OPTIONAL in opts for k, opts in option.items())
        if keys_ok and missing_ok:
            return True
    return False


def check_value(param: str, value, schema: Mapping, allowed: Sequence) -> Check:
    """One argument against its schema and the allowed values (see the module docstring)."""
    value = _coerce(value, schema)
    kind = schema.get("type")
    answer_type = _answer_type(allowed)
    if not _type_ok(value, schema):
        if answer_type is not None and type(value) is answer_type and kind != "any":  # a variable
            return OK if value in allowed else _fail("value_error", f"{param}={value!r} not in {allowed}")
        return _fail("type_error", f"{param}={value!r}: expected {kind}, got {type(value).__name__}")
    if kind != "any" and answer_type is not None and answer_type is not _TYPES.get(kind) \
            and not (answer_type is int and kind == "float"):
        # The answers are variables of another type; the value has the declared type: exact match.
        return OK if value in allowed else _fail("value_error", f"{param}={value!r} not in {allowed}")
    if isinstance(value, dict):
        ok = _dict_ok(value, allowed)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        ok = any(isinstance(opt, list) and len(opt) == len(value) and all(
            _dict_ok(v, [o]) for v, o in zip(value, opt)) for opt in allowed)
    elif isinstance(value, list):  # an empty list stands for an optional list left at its default
        options = [[_std(a) for a in opt] for opt in allowed if isinstance(opt, list)]
        ok = [_std(v) for v in value] in options + ([[]] if _OPTIONAL in allowed else [])
    elif isinstance(value, str):
        ok = standardise(value) in [standardise(a) for a in allowed if isinstance(a, str)]
    else:
        ok = any(type(a) is not bool and a == value if type(value) is not bool else a is value for a in allowed)
    return OK if ok else _fail("value_error", f"{param}={value!r} not in {allowed}")


def _name_ok(given: str, expected: str, underscore_names: bool) -> bool:
    return given == expected or (underscore_names and given == expected.replace(".", "_"))


def check_call(call: tuple[str, Mapping], function: Mapping, answer: Mapping, *,
               underscore_names: bool = False) -> Check:
    """One decoded call ``(name, args)`` against a function doc and one ground-truth entry."""
    name, args = call
    (expected_name, allowed), = answer.items()
    if not _name_ok(name, expected_name, underscore_names):
        return _fail("wrong_function", f"called {name!r}, expected {expected_name!r}")
    props = function["parameters"].get("properties", {})
    for req in function["parameters"].get("required", []):
        if req not in args:
            return _fail("missing_required", f"{expected_name}: required parameter {req!r} missing")
    for param, value in args.items():
        if param not in props or param not in allowed:
            return _fail("unexpected_param", f"{expected_name}: unexpected parameter {param!r}")
        verdict = check_value(param, value, props[param], allowed[param])
        if not verdict.valid:
            return verdict
    for param, opts in allowed.items():
        if param not in args and _OPTIONAL not in opts:
            return _fail("missing_param", f"{expected_name}: parameter {param!r} must be given")
    return OK


def _function(functions: Sequence[Mapping], name: str) -> Mapping | None:
    return next((f for f in functions if f["name"] == name), None)


def check_calls(calls: Sequence[tuple[str, Mapping]], functions: Sequence[Mapping],
                ground_truth: Sequence[Mapping], *, underscore_names: bool = False) -> Check:
    """All the calls of one output against the ground truth, order-free (perfect matching)."""
    if len(calls) != len(ground_truth):
        return _fail("wrong_count", f"{len(calls)} calls, expected {len(ground_truth)}")
    fit: list[list[int]] = []
    first_error = None
    for answer in ground_truth:
        name = next(iter(answer))
        fn = _function(functions, name)
        if fn is None:
            return _fail("bad_example", f"no function doc for {name!r}")
        row, errors = [], []
        for j, call in enumerate(calls):
            verdict = check_call(call, fn, answer, underscore_names=underscore_names)
            if verdict.valid:
                row.append(j)
            else:  # report a same-name call's error before a wrong-function one
                errors.append((verdict.error_type == "wrong_function", verdict))
        if not row and first_error is None:
            first_error = min(errors, key=lambda e: e[0])[1]
        fit.append(row)
    if _perfect_matching(fit, len(calls)):
        return OK
    return first_error or _fail("no_match", "the calls cannot be matched one to one with the answers")


def _perfect_matching(fit: list[list[int]], n_calls: int) -> bool:
    """Kuhn's augmenting paths: can every answer get its own matching call?"""
    owner = [-1] * n_calls

    def place(i: int, seen: set) -> bool:
        for j in fit[i]:
            if j not in seen:
                seen.add(j)
                if owner[j] < 0 or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(fit)))

"""Berkeley Function Calling Leaderboard (BFCL): data, output decoding, the kit's own checker.

Categories: ``simple`` (one function, one call), ``multiple`` (several functions, one call),
``parallel`` (one function, several calls), ``parallel_multiple`` and ``irrelevance`` (no
function fits: the right answer is no call). The data ships in the ``bfcl-eval`` wheel, which is
**never** a dependency (it pins numpy 1.26 and dozens of API clients): :func:`fetch_bfcl_data`
runs ``pip download --no-deps bfcl-eval`` into a cache and unzips ``bfcl_eval/data/*``
(``python -m mmllm.tools.bfcl fetch``); :func:`load_bfcl` reads any directory of those files
(``BFCL_v4_simple_python.json`` ... and ``possible_answer/``; version 2026.3.23 holds v4 files).

Outputs are decoded as BFCL's prompting format, a Python list of keyword-argument calls
``[f(a=1), g.h(b='x')]`` (brackets optional), or with ``fmt="json"`` as OpenAI-style
``[{"name": ..., "arguments": {...}}]``. Each output is one of three things: **calls**;
**no call** (empty, ``[]``, prose that does not start like a call); or a **parse failure** (it
starts like a call, ``[f(`` or ``f(``, but does not parse; positional or ``**`` arguments;
values that are not literals). A parse failure is a *failure in every category, irrelevance
included*; it is not an abstention. (BFCL's own runner scores an undecodable output as correct
on irrelevance; ``irrelevance_parse_failure="no_call"`` reproduces that for comparisons.)
The checker rules are in :mod:`mmllm.tools.bfcl_checker`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmllm.errors import MissingFileError
from mmllm.tools.bfcl_checker import OK, Check, check_calls
from mmllm.tools.calculator import evaluate as safe_arithmetic
from mmllm.tools.registry import ToolError

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
_FILE_NAMES = {"simple": ("simple_python", "simple"), "multiple": ("multiple",), "parallel": ("parallel",),
               "parallel_multiple": ("parallel_multiple",), "irrelevance": ("irrelevance",)}
_STARTS_AS_CALL = re.compile(r"\[?\s*[A-Za-z_][\w.]*\(")  # "[f(" or "f(" at the start: a call attempt
FETCH_FIX = "fetch the data with `python -m mmllm.tools.bfcl fetch` and pass the directory it prints"


@dataclass(frozen=True)
class BFCLExample:
    """One BFCL test: the user turn(s), the function docs and the allowed answers (None: irrelevance)."""

    id: str
    category: str
    messages: list
    functions: list
    ground_truth: list | None


def _data_file(data_dir: Path, category: str, sub: str = "") -> Path:
    for name in _FILE_NAMES[category]:
        # Exact names only: BFCL_v*_parallel.json would also match BFCL_v4_live_parallel.json.
        pattern = re.compile(rf"BFCL_v(\d+)_{name}\.json")
        hits = [(int(m.group(1)), p) for p in (data_dir / sub).glob("BFCL_v*.json") if (m := pattern.fullmatch(p.name))]
        if hits:
            return max(hits)[1]  # the newest version
    raise MissingFileError(f"no BFCL {category!r} file (BFCL_v*_{_FILE_NAMES[category][0]}.json) in "
                           f"{data_dir / sub}", fix=FETCH_FIX)


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
    return rows


def load_bfcl(data_dir: str | Path, categories: Sequence[str] = CATEGORIES, *,
              limit: int | None = None) -> list[BFCLExample]:
    """Reads BFCL tests and their answers from ``data_dir`` (see the module docstring).

    Args:
        data_dir: a directory with ``BFCL_v*_<category>.json`` and ``possible_answer/``.
        categories: which of :data:`CATEGORIES`.
        limit: at most this many tests per category.
    """
    data_dir = Path(data_dir)
    out = []
    for cat in categories:
        if cat not in _FILE_NAMES:
            raise ValueError(f"unknown BFCL category {cat!r}; expected one of {CATEGORIES}")
        rows = _read_json_lines(_data_file(data_dir, cat))[:limit]
        answers = {}
        if cat != "irrelevance":
            answers = {r["id"]: r["ground_truth"] for r in _read_json_lines(_data_file(data_dir, cat, "possible_answer"))}
        for r in rows:
            if cat != "irrelevance" and r["id"] not in answers:
                raise ValueError(f"BFCL test {r['id']} has no possible answer")
            out.append(BFCLExample(r["id"], cat, r["question"][0], r["function"], answers.get(r["id"])))
    return out


def fetch_bfcl_data(cache_dir: str | Path | None = None, *, version: str | None = None) -> Path:
    """Downloads the ``bfcl-eval`` wheel (no dependencies) and unzips its data; returns the data dir.

    Args:
        cache_dir: where wheels and data go (default ``$MMLLM_BFCL_CACHE`` or ``~/.cache/mmllm/bfcl``).
        version: a bfcl-eval version (default: the newest pip finds); reused when already there.
    """
    cache = Path(cache_dir or os.environ.get("MMLLM_BFCL_CACHE") or Path.home() / ".cache" / "mmllm" / "bfcl")
    if version and (cache / f"bfcl_eval-{version}" / "bfcl_eval" / "data").is_dir():
        return cache / f"bfcl_eval-{version}" / "bfcl_eval" / "data"
    wheels = cache / "wheels"
    spec = f"bfcl-eval=={version}" if version else "bfcl-eval"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    wheel = max(wheels.glob(f"bfcl_eval-{version or '*'}-py3-none-any.whl"), key=lambda p: p.stat().st_mtime)
    target = cache / wheel.name.split("-py3")[0]
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            dest = (target / member).resolve()
            if member.startswith("bfcl_eval/data/") and dest.is_relative_to(target.resolve()):
                zf.extract(member, target)
    return target / "bfcl_eval" / "data"


class DecodeError(ValueError):
    """An output with call syntax that is not a list of keyword-argument calls of literals."""


def _value(node: ast.AST):
    """A call argument as a Python value: literals, names (as strings), nested calls, arithmetic."""
    if isinstance(node, ast.Constant):
        return "..." if node.value is Ellipsis else node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise DecodeError("** inside a dict literal")
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return node.id  # a variable: BFCL's answers hold such names as strings
    if isinstance(node, ast.Call):  # a nested call: its text, or {name: args} with keywords
        if not node.keywords:
            return ast.unparse(node)
        name, args = _call(node)
        return {name: args}
    if isinstance(node, ast.Subscript):
        return ast.unparse(node)
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = _value(node.left), _value(node.right)
            if isinstance(left, str) and isinstance(right, str):
                return left + right
        try:
            return safe_arithmetic(ast.unparse(node))  # never eval: the calculator's whitelist
        except ToolError as exc:
            raise DecodeError(f"argument {ast.unparse(node)!r} is not a literal: {exc}") from None
    raise DecodeError(f"unsupported argument {ast.unparse(node)!r} ({type(node).__name__})")


def _call(node: ast.Call) -> tuple[str, dict]:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if not isinstance(f, ast.Name):
        raise DecodeError(f"cannot name the function of {ast.unparse(node)!r}")
    if node.args:
        raise DecodeError(f"positional arguments in {ast.unparse(node)[:80]!r}: calls take keyword arguments")
    if any(k.arg is None for k in node.keywords):
        raise DecodeError("**kwargs in a call")
    return ".".join([f.id, *reversed(parts)]), {k.arg: _value(k.value) for k in node.keywords}


def _decode_json(text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    calls = []
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, Mapping) and "name" in item:
            args = item.get("arguments", item.get("parameters", {}))
            args = json.loads(args) if isinstance(args, str) else args
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, args), = item.items()
            item = {"name": name}
        else:
            raise DecodeError(f"not a call: {item!r:.80}")
        if not isinstance(args, Mapping):
            raise DecodeError(f"arguments of {item['name']!r} are not an object")
        calls.append((str(item["name"]), dict(args)))
    return calls


def decode_output(text: str | None, *, fmt: str = "python") -> list[tuple[str, dict]]:
    """The calls in a model output; ``[]`` when it makes no call.

    Raises:
        DecodeError: a parse failure (see the module docstring).
    """
    text = (text or "").strip()
    fenced = re.findall(r"```[\w]*\n?(.*?)```", text, re.DOTALL)
    text = (fenced[0] if fenced else text).strip().strip("`").strip()
    if not text or text == "[]":
        return []
    if fmt == "json":
        return _decode_json(text)
    if fmt != "python":
        raise ValueError(f"fmt must be 'python' or 'json', got {fmt!r}")
    body = text if text.startswith("[") else "[" + text
    body = body if body.endswith("]") else body + "]"
    try:
        node = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        if _STARTS_AS_CALL.match(text):
            raise DecodeError(f"call syntax that does not parse: {getattr(exc, 'msg', exc)}") from None
        return []  # prose: no call
    elts = node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]
    calls = [e for e in elts if isinstance(e, ast.Call)]
    if not calls:
        return []
    if len(calls) != len(elts):
        raise DecodeError("a list that mixes calls and other values")
    return [_call(c) for c in calls]


def check_output(example: BFCLExample, output: str | None, *, fmt: str = "python",
                 underscore_names: bool = False, irrelevance_parse_failure: str = "fail") -> Check:
    """The verdict on one model output (``error_type`` ``parse_failure`` / ``no_call`` / ...).

    Args:
        irrelevance_parse_failure: ``"fail"`` (the kit's rule: a parse failure is never a
            correct answer) or ``"no_call"`` (BFCL's runner: an undecodable output on an
            irrelevance test counts as no call, i.e. correct), for comparisons with published scores.
    """
    if irrelevance_parse_failure not in ("fail", "no_call"):
        raise ValueError(f"irrelevance_parse_failure must be 'fail' or 'no_call', got {irrelevance_parse_failure!r}")
    try:
        calls = decode_output(output, fmt=fmt)
    except DecodeError as exc:
        if example.category == "irrelevance" and irrelevance_parse_failure == "no_call":
            return OK
        return Check(False, "parse_failure", str(exc))
    if example.category == "irrelevance":
        return OK if not calls else Check(False, "called_irrelevant", f"made {len(calls)} call(s); expected none")
    if not calls:
        return Check(False, "no_call", "no function call in the output")
    return check_calls(calls, example.functions, example.ground_truth, underscore_names=underscore_names)


@dataclass
class BFCLReport:
    """Accuracy per category, and the error types of the failures."""

    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    errors: dict = field(default_factory=lambda: defaultdict(Counter))
    verdicts: dict = field(default_factory=dict)

    def accuracy(self, category: str | None = None) -> float:
        if category is None:  # unweighted mean over categories, as the leaderboard's summary
            cats = [c for c in self.total if self.total[c]]
            return sum(self.accuracy(c) for c in cats) / len(cats) if cats else 0.0
        return self.correct[category] / self.total[category] if self.total[category] else 0.0

    def summary(self) -> str:
        lines = [f"{c:<18} {self.correct[c]:>5}/{self.total[c]:<5} {100 * self.accuracy(c):6.2f} %  "
                 + ", ".join(f"{k}={v}" for k, v in self.errors[c].most_common()) for c in self.total]
        return "\n".join(lines + [f"{'mean':<18} {'':11} {100 * self.accuracy():6.2f} %"])


def evaluate(examples: Sequence[BFCLExample], outputs: Mapping[str, str | None], *, fmt: str = "python",
             underscore_names: bool = False, irrelevance_parse_failure: str = "fail") -> BFCLReport:
    """Checks every example's output (a missing output is a failure, ``missing_output``);
    the options are :func:`check_output`'s."""
    report = BFCLReport()
    for ex in examples:
        verdict = (Check(False, "missing_output", "no output") if ex.id not in outputs else
                   check_output(ex, outputs[ex.id], fmt=fmt, underscore_names=underscore_names,
                                irrelevance_parse_failure=irrelevance_parse_failure))
        report.total[ex.category] += 1
        report.correct[ex.category] += verdict.valid
        if not verdict.valid:
            report.errors[ex.category][verdict.error_type] += 1
        report.verdicts[ex.id] = verdict
    return report


def _pick(value, option: int):
    """A concrete value from an allowed value (dicts hold ``{key: [allowed]}`` themselves)."""
    if isinstance(value, dict):
        chosen = {k: _pick(opts[min(option, len(opts) - 1)], option) for k, opts in value.items()}
        return {k: v for k, v in chosen.items() if v != ""}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_pick(v, option) for v in value]
    return value


def reference_output(ground_truth: Sequence[Mapping], option: int = 0) -> str:
    """A model output that answers with the ground truth's ``option``-th allowed values.

    Optional parameters whose chosen option is ``""`` are left out (reference answers, tests,
    and perturbations in ``benchmarks/bfcl_agreement.py``).
    """
    calls = []
    for entry in ground_truth:
        (name, params), = entry.items()
        args = []
        for p, allowed in params.items():
            value = _pick(allowed[min(option, len(allowed) - 1)], option)
            if value != "":
                args.append(f"{p}={value!r}")
        calls.append(f"{name}({', '.join(args)})")
    return "[" + ", ".join(calls) + "]"


SYSTEM_PROMPT = ("You can call these functions (JSON schemas):\n{functions}\n\n"
                 "If one or more calls answer the request, reply with only the calls as a Python list, "
                 "keyword arguments only: [func_name(param=value, ...), other_func(param=value)]. "
                 "If no function fits, say so in words and make no call.")


def prompt_messages(example: BFCLExample) -> list[dict]:
    """The conversation a model answers: a system turn listing the functions, then the test's turns."""
    return [{"role": "system", "content": SYSTEM_PROMPT.format(functions=json.dumps(example.functions))},
            *example.messages]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmllm.tools.bfcl fetch|evaluate``."""
    ap = argparse.ArgumentParser(prog="python -m mmllm.tools.bfcl")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download bfcl-eval's data into a cache; prints the data dir")
    f.add_argument("--cache-dir")
    f.add_argument("--version")
    e = sub.add_parser("evaluate", help="score a JSONL of {id, result} outputs")
    e.add_argument("--data", required=True)
    e.add_argument("--outputs", required=True)
    e.add_argument("--categories", default=",".join(CATEGORIES))
    e.add_argument("--fmt", default="python", choices=("python", "json"))
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        print(fetch_bfcl_data(args.cache_dir, version=args.version))
        return 0
    outputs = {r["id"]: r.get("result") for r in _read_json_lines(Path(args.outputs))}
    examples = load_bfcl(args.data, args.categories.split(","))
    print(evaluate(examples, outputs, fmt=args.fmt).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

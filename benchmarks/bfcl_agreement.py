"""Agreement of the kit's BFCL checker with bfcl-eval's own AST checker, output by output.

The same model outputs are scored twice: by :mod:`mmllm.tools.bfcl` here, and by bfcl-eval's
``default_decode_ast_prompting`` + ``ast_checker`` (the functions its runner calls for the AST and
irrelevance categories) in a **separate venv** under the cache (bfcl-eval pins numpy 1.26 and is
never a dependency of the kit). Outputs, per test of simple / multiple / parallel /
parallel_multiple / irrelevance:

* ``ref0``, ``ref1``: the ground truth's first and second allowed values;
* perturbations: a value changed, a parameter dropped, an extra parameter, the function renamed,
  parallel calls reversed, integers for floats, positional arguments, cut-off syntax, prose;
  for irrelevance a call of the offered function;
* ``ngram``: samples of a tiny model, a character 6-gram model trained on the reference outputs
  and prompted with ``[<function name>(``: near-miss calls, broken syntax, stray text;
* ``model`` (``--model smollm2 --model-tests N``): a real small chat model's greedy answers to
  :func:`mmllm.tools.bfcl.prompt_messages` for the first N tests of each category (through
  :class:`mmllm.teacher.LocalTeacher`, cached in the cache dir), with its accuracy.

Prints the agreement (goal >= 99 %) under the kit's rules and under BFCL's irrelevance convention
(``irrelevance_parse_failure="no_call"``), and every disagreement with the rule behind it.

The venv gets ``bfcl-eval`` with ``--no-deps`` plus what its checker modules import (numpy 1.26,
tree-sitter for its Java/JS parsers, tenacity, filelock, python-dotenv, tqdm); its full dependency
set (torch via sentence-transformers, vLLM clients, a dozen API SDKs) is only needed for running
models. Its ``constants.model_config`` (which imports every API client) is replaced by a stub
whose only content the checker reads, ``underscore_to_dot=False`` (names compared as written).

    python benchmarks/bfcl_agreement.py [--cache-dir DIR] [--version 2026.3.23] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import venv
from collections import Counter, defaultdict
from pathlib import Path

from mmllm.tools import bfcl

CHECKER_DEPS = ["numpy==1.26.4", "tenacity", "tree_sitter==0.21.3", "tree-sitter-java==0.21.0",
                "tree-sitter-javascript==0.21.4", "filelock==3.20.0", "python-dotenv", "tqdm"]

WORKER = r'''
import json, sys, types
from dataclasses import dataclass
stub = types.ModuleType("bfcl_eval.constants.model_config")
@dataclass
class _Config:
    underscore_to_dot: bool = False
class _Mapping(dict):
    def __missing__(self, key):
        return _Config()
stub.MODEL_CONFIG_MAPPING = _Mapping()
sys.modules["bfcl_eval.constants.model_config"] = stub
from bfcl_eval.constants.enums import Language
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
from bfcl_eval.model_handler.utils import default_decode_ast_prompting
from bfcl_eval.utils import is_empty_output, is_function_calling_format_output

def verdict(row):
    # The glue of bfcl_eval.eval_checker.eval_runner (_evaluate_single_relevance_entry / _ast_entry).
    try:
        decoded = default_decode_ast_prompting(row["output"])
    except Exception as exc:
        return (row["category"] == "irrelevance"), "decode_failed"
    if row["category"] == "irrelevance":
        return is_empty_output(decoded), "irrelevance"
    if not is_function_calling_format_output(decoded):
        return False, "wrong_output_format"
    cat = "simple_python" if row["category"] == "simple" else row["category"]
    try:
        res = ast_checker(row["functions"], decoded, row["ground_truth"], Language.PYTHON, cat, "kit")
    except Exception as exc:  # a checker crash counts as invalid, like a failed entry
        return False, f"checker_exception:{type(exc).__name__}"
    return res["valid"], res.get("error_type", "")

for line in sys.stdin:
    row = json.loads(line)
    ok, kind = verdict(row)
    print(json.dumps({"key": row["key"], "valid": bool(ok), "error_type": kind}))
'''


def ensure_venv(cache: Path, version: str | None) -> tuple[Path, str]:
    """The venv with bfcl-eval (created once); returns its python and the bfcl-eval version."""
    data = bfcl.fetch_bfcl_data(cache, version=version)  # downloads the wheel (no deps)
    ver = data.parents[1].name.removeprefix("bfcl_eval-")
    env = cache / f"venv-{ver}"
    py = env / "bin" / "python"
    if not (env / ".ready").exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        wheel = next((cache / "wheels").glob(f"bfcl_eval-{ver}-*.whl"))
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *CHECKER_DEPS], check=True)
        (env / ".ready").touch()
    return py, ver


def _first_call(out: str) -> str:
    return out[1:-1].split("), ")[0].rstrip(")") + ")"


def perturbations(ex: bfcl.BFCLExample, rng: random.Random) -> dict[str, str]:
    """Variant outputs of one test (see the module docstring)."""
    if ex.ground_truth is None:
        fn = ex.functions[0]
        args = ", ".join(f"{p}=1" for p in fn["parameters"].get("required", []))
        return {"prose": "None of the functions can answer this.", "empty": "[]", "call": f"[{fn['name']}({args})]",
                "broken": f"[{fn['name']}({args}", "text_with_parens": "I cannot (sadly) do that."}
    ref = bfcl.reference_output(ex.ground_truth)
    (name, params), = ex.ground_truth[0].items()
    out = {"ref0": ref, "ref1": bfcl.reference_output(ex.ground_truth, 1),
           "renamed": ref.replace(name + "(", name + "_v2(", 1), "cut": ref[: max(3, len(ref) // 2)],
           "extra_param": ref.replace(name + "(", name + "(zz_extra=1, ", 1), "prose": "Let me think about it."}
    for p, allowed in params.items():
        if allowed[0] != "" and f"{p}=" in ref:
            old = f"{p}={allowed[0]!r}"
            v = allowed[0]
            new = repr(not v) if isinstance(v, bool) else repr(v + 1) if isinstance(v, (int, float)) else "'zzz'"
            out["value"] = ref.replace(old, f"{p}={new}", 1)
            out["dropped"] = ref.replace(old + ", ", "", 1).replace(", " + old, "", 1).replace(old, "", 1)
            out["positional"] = ref.replace(old, repr(allowed[0]), 1)
            break
    if any(a and isinstance(a[0], float) for a in params.values()):
        out["int_for_float"] = ref.replace(".0,", ",").replace(".0)", ")").replace(".0]", "]")
    if len(ex.ground_truth) > 1:
        calls = [bfcl.reference_output([g])[1:-1] for g in ex.ground_truth]
        out["reversed"] = "[" + ", ".join(reversed(calls)) + "]"
        out["one_call"] = _first_call(ref)
    return out


class CharNGram:
    """A tiny character n-gram model of the reference outputs (the benchmark's 'tiny model')."""

    def __init__(self, texts: list[str], n: int = 6) -> None:
        self.n, self.table = n, defaultdict(Counter)
        for t in texts:
            t = "\x02" * (n - 1) + t + "\x03"
            for i in range(n - 1, len(t)):
                self.table[t[i - n + 1:i]][t[i]] += 1

    def sample(self, prefix: str, rng: random.Random, max_chars: int = 300) -> str:
        text = prefix
        while len(text) < max_chars:
            ctx = ("\x02" * (self.n - 1) + text)[-(self.n - 1):]
            nxt = self.table.get(ctx)
            if not nxt:
                break
            ch = rng.choices(list(nxt), weights=list(nxt.values()))[0]
            if ch == "\x03":
                break
            text += ch
        return text


def model_outputs(examples, model: str, n_per_category: int, cache: Path) -> dict[str, str | None]:
    """Greedy answers of a kit checkpoint to the first ``n_per_category`` tests per category."""
    from mmllm.teacher import LocalTeacher

    chosen, seen = [], Counter()
    for ex in examples:
        if seen[ex.category] < n_per_category:
            chosen.append(ex)
            seen[ex.category] += 1
    with LocalTeacher(checkpoint=model, max_seq_len=4096, max_batch=8, cache_path=cache / "teacher.sqlite",
                      sampling={"temperature": 0.0, "max_tokens": 96}) as teacher:
        answers = teacher.chat_many([bfcl.prompt_messages(ex) for ex in chosen], desc=f"{model} on BFCL")
    return {ex.id: a for ex, a in zip(chosen, answers)}


def build_outputs(examples, seed: int = 0, samples: int = 2, model: dict | None = None) -> list[dict]:
    rng = random.Random(seed)
    refs = [bfcl.reference_output(e.ground_truth) for e in examples if e.ground_truth]
    ngram = CharNGram(refs)
    rows = []
    for ex in examples:
        variants = perturbations(ex, rng)
        for k in range(samples):
            variants[f"ngram{k}"] = ngram.sample(f"[{ex.functions[0]['name']}(", rng)
        if model and ex.id in model:
            variants["model"] = model[ex.id] or ""
        for name, output in variants.items():
            rows.append({"key": f"{ex.id}|{name}", "id": ex.id, "variant": name, "category": ex.category,
                         "output": output, "functions": ex.functions, "ground_truth": ex.ground_truth})
    return rows


def explain(row: dict, kit: bfcl.Check, theirs: dict) -> str:
    """The rule behind a disagreement (or 'UNEXPLAINED')."""
    if row["category"] == "irrelevance" and kit.error_type == "parse_failure" and theirs["valid"]:
        return "irrelevance: the kit fails an unparseable output; BFCL's runner counts a decode failure as no call"
    if kit.valid and theirs["error_type"] == "type_error:nested":
        return "int in a list of floats: the kit coerces int -> float at every depth, BFCL only at the top"
    if kit.valid and theirs["error_type"].endswith("cannot_find_match"):
        return "parallel: BFCL matches calls greedily; the kit finds the perfect matching"
    if kit.error_type == "parse_failure" and "positional" in kit.error:
        return "positional arguments: the kit refuses them, BFCL's decoder drops them silently"
    if kit.error_type == "parse_failure" and theirs["valid"]:
        return "decoding: the kit refuses " + kit.error
    return "UNEXPLAINED"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mmllm" / "bfcl"))
    ap.add_argument("--version", default=None)
    ap.add_argument("--limit", type=int, default=None, help="tests per category")
    ap.add_argument("--samples", type=int, default=2, help="n-gram samples per test")
    ap.add_argument("--model", default=None, help="a kit checkpoint (e.g. smollm2) whose answers join the outputs")
    ap.add_argument("--model-tests", type=int, default=20, help="tests per category the model answers")
    args = ap.parse_args()
    cache = Path(args.cache_dir)
    py, ver = ensure_venv(cache, args.version)
    data = cache / f"bfcl_eval-{ver}" / "bfcl_eval" / "data"
    examples = bfcl.load_bfcl(data, limit=args.limit)
    answers = model_outputs(examples, args.model, args.model_tests, cache) if args.model else None
    rows = build_outputs(examples, samples=args.samples, model=answers)
    proc = subprocess.run([str(py), "-c", WORKER], input="".join(json.dumps(r) + "\n" for r in rows),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    theirs = {v["key"]: v for v in map(json.loads, proc.stdout.splitlines())}
    by_id = {e.id: e for e in examples}
    agree, agree_bfcl_rule, why, per_variant = 0, 0, Counter(), defaultdict(Counter)
    disagreements = []
    for r in rows:
        kit = bfcl.check_output(by_id[r["id"]], r["output"])
        agree_bfcl_rule += theirs[r["key"]]["valid"] == bfcl.check_output(
            by_id[r["id"]], r["output"], irrelevance_parse_failure="no_call").valid
        same = kit.valid == theirs[r["key"]]["valid"]
        agree += same
        per_variant[r["variant"].rstrip("0123456789")][("agree" if same else "differ")] += 1
        per_variant[r["variant"].rstrip("0123456789")]["kit_valid"] += kit.valid
        if not same:
            reason = explain(r, kit, theirs[r["key"]])
            why[reason] += 1
            disagreements.append((r, kit, theirs[r["key"]], reason))
    print(f"bfcl-eval {ver}: {len(examples)} tests, {len(rows)} outputs")
    for variant, c in sorted(per_variant.items()):
        print(f"  {variant:<16} outputs {c['agree'] + c['differ']:>5}  differ {c['differ']:>4}  kit-valid {c['kit_valid']:>5}")
    if answers:
        scored = [e for e in examples if e.id in answers]
        print(f"{args.model} (kit checker, first {args.model_tests} tests per category):\n"
              + bfcl.evaluate(scored, answers).summary())
    print(f"agreement (kit rules): {agree}/{len(rows)} = {100 * agree / len(rows):.2f} %")
    print(f"agreement with irrelevance_parse_failure='no_call' (BFCL's convention): {agree_bfcl_rule}/{len(rows)}"
          f" = {100 * agree_bfcl_rule / len(rows):.2f} %")
    for reason, n in why.most_common():
        print(f"  {n:>4}  {reason}")
    for r, kit, th, reason in disagreements:
        print(f"- {r['key']}: kit={'pass' if kit.valid else 'fail:' + kit.error_type} "
              f"bfcl={'pass' if th['valid'] else 'fail:' + th['error_type']} [{reason}]\n    output: {r['output'][:200]!r}")
    print(json.dumps({"bfcl_eval": ver, "outputs": len(rows), "agreement": agree / len(rows),
                      "agreement_bfcl_irrelevance_rule": agree_bfcl_rule / len(rows),
                      "disagreements": dict(why)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

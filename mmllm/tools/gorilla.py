"""Gorilla (Patil et al., 2023): API-call data from API docs, retrieval-aware chats, AST evaluation.

1. :func:`generate_pairs`: self-instruct through a teacher (:mod:`mmllm.teacher`). For every API
   document the teacher sees a few <instruction, API call> examples of *other* APIs and the
   reference document, and writes ``per_api`` instructions a user might give that this API
   solves, each with its call. Answers are parsed robustly (a JSON array, JSON lines, code
   fences, a numbered list of instructions); a pair whose call does not parse or does not call
   the documented API is dropped and counted (:attr:`GenerationStats`).
2. :func:`to_chats`: ``{"messages": [user, assistant]}`` rows (SFT JSONL that
   :class:`mmllm.data.sft.SFTDataModule` reads), the user turn with or without the API document
   (``retrieval``: None, ``"oracle"`` (the reference doc, as Gorilla's retriever-aware
   training) or ``"bm25"`` (:class:`~mmllm.tools.catalog.APIRetriever`, as at test time)); the
   assistant answers in Gorilla's format (``<<<domain>>>``, ``<<<api_call>>>``, ...).
3. :func:`evaluate`: AST sub-tree matching (:mod:`mmllm.tools.ast_match`) of model answers
   against the reference calls; correct / wrong API / hallucination / parse failure /
   abstention.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mmllm.tools.ast_match import MatchReport, call_path, evaluate_answers, parse_call
from mmllm.tools.catalog import APIDoc, APIRetriever

DOC_PREFIX = "Use this API documentation for reference: "

SELF_INSTRUCT_SYSTEM = ("You write training data for a model that answers with API calls. Reply with a "
                        "JSON array only.")
SELF_INSTRUCT_PROMPT = """Here are example pairs of a user instruction and the API call that solves it:
{examples}

Here is the documentation of one API:
{doc}

Write {n} different, realistic instructions a user could give that this API solves. Do not name the
API or the model in the instruction; describe the task. Reply with a JSON array of {n} objects
{{"instruction": "...", "api_call": "..."}} where api_call calls {api_name} like the documentation does."""


class GenerationStats(Counter):
    """Counts of :func:`generate_pairs`: ``pairs``, ``no_answer``, ``unparsed``,
    ``bad_api_call`` (does not parse or calls another API), ``duplicate``, ``empty``."""


def _examples_for(doc: APIDoc, seeds: Sequence[dict], catalog: Sequence[APIDoc], n: int,
                  rng: random.Random) -> list[dict]:
    """``n`` few-shot pairs of APIs other than ``doc``: seed pairs first, then other catalog docs."""
    pool = [s for s in seeds if s["api_call"] != doc.api_call]
    chosen = rng.sample(pool, min(n, len(pool)))
    if len(chosen) < n:  # too few seeds: other docs' functionality stands in as the instruction
        rest = [{"instruction": d.functionality, "api_call": d.api_call} for d in catalog if d.api_call != doc.api_call]
        chosen += rng.sample(rest, min(n - len(chosen), len(rest)))
    return chosen


def self_instruct_messages(doc: APIDoc, examples: Sequence[dict], n: int) -> list[dict]:
    shots = "\n".join(json.dumps({"instruction": e["instruction"], "api_call": e["api_call"]}) for e in examples)
    user = SELF_INSTRUCT_PROMPT.format(examples=shots, doc=doc.doc_text(), n=n, api_name=doc.api_name)
    return [{"role": "system", "content": SELF_INSTRUCT_SYSTEM}, {"role": "user", "content": user}]


def parse_pairs(text: str | None) -> list[dict] | None:
    """``[{"instruction", "api_call" (may be None)}]`` from a teacher answer; None if nothing parses.

    Accepts a JSON array (fenced or inside prose), JSON objects one a line, or a numbered /
    bulleted list of instructions (their api_call is None: the documented call is used).
    """
    if not text or not text.strip():
        return None
    body = "\n".join(re.findall(r"```(?:json)?\n(.*?)```", text, re.DOTALL)) or text
    candidates = [body] + ([body[body.index("["):body.rindex("]") + 1]] if "[" in body and "]" in body else [])
    for cand in candidates:
        try:
            data = json.loads(cand)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            data = [data]
        if isinstance(data, list):
            return [_pair(d) for d in data if isinstance(d, (dict, str))]
    rows = []
    for line in body.splitlines():
        line = line.strip().rstrip(",")
        if line.startswith("{"):
            try:
                rows.append(_pair(json.loads(line)))
                continue
            except json.JSONDecodeError:
                pass
        m = re.match(r"^(?:\d+[.)]|[-*])\s+(.+)$", line)
        if m:
            rows.append({"instruction": m.group(1).strip().strip('"'), "api_call": None})
    return rows or None


def _pair(d: dict | str) -> dict:
    if isinstance(d, str):
        return {"instruction": d, "api_call": None}
    return {"instruction": str(d.get("instruction", "")).strip(), "api_call": d.get("api_call")}


def _valid_call(api_call: str | None, doc: APIDoc) -> str | None:
    """The pair's call if it parses and calls the documented API; the doc's call if none given."""
    if api_call is None:
        return doc.api_call
    try:
        node = parse_call(str(api_call))
    except ValueError:
        return None
    return str(api_call).strip() if call_path(node) == call_path(parse_call(doc.api_call)) else None


def generate_pairs(teacher, catalog: Sequence[APIDoc], *, per_api: int = 10,
                   seed_examples: Sequence[dict] = (), n_shots: int = 3, seed: int = 0,
                   stats: GenerationStats | None = None) -> list[dict]:
    """Self-instruct <instruction, API> pairs, ``per_api`` per document, through ``teacher``.

    Args:
        teacher: a :class:`mmllm.teacher.Teacher` (``chat_many``); answers are cached there.
        catalog: the API documents.
        per_api: instructions asked per API (at most that many kept).
        seed_examples: hand-written ``{"instruction", "api_call"}`` pairs for the few-shot part.
        n_shots: examples per prompt.
        seed: few-shot sampling seed.
        stats: a :class:`GenerationStats` to fill (the dropped pairs by reason).

    Returns:
        ``[{"instruction", "api_call", "api_name", "doc_index"}]``.
    """
    stats = stats if stats is not None else GenerationStats()
    rng = random.Random(seed)
    convs = [self_instruct_messages(d, _examples_for(d, seed_examples, catalog, n_shots, rng), per_api)
             for d in catalog]
    answers = teacher.chat_many(convs, desc="gorilla self-instruct")
    out, seen = [], set()
    for i, (doc, answer) in enumerate(zip(catalog, answers)):
        if answer is None:
            stats["no_answer"] += 1
            continue
        pairs = parse_pairs(answer)
        if pairs is None:
            stats["unparsed"] += 1
            continue
        for p in pairs[:per_api]:
            call = _valid_call(p["api_call"], doc)
            key = p["instruction"].casefold()
            reason = ("empty" if not p["instruction"] else "bad_api_call" if call is None
                      else "duplicate" if key in seen else None)
            if reason:
                stats[reason] += 1
                continue
            seen.add(key)
            out.append({"instruction": p["instruction"], "api_call": call, "api_name": doc.api_name, "doc_index": i})
            stats["pairs"] += 1
    return out


def gorilla_answer(doc: APIDoc, api_call: str) -> str:
    """The assistant turn in Gorilla's output format."""
    return (f"<<<domain>>>: {doc.domain}\n<<<api_call>>>: {api_call}\n<<<api_provider>>>: {doc.framework}\n"
            f"<<<explanation>>>: {doc.description}\n<<<code>>>: {doc.example_code}")


def user_prompt(instruction: str, doc: APIDoc | None = None) -> str:
    """The user turn: the instruction, with the API document appended when given."""
    return instruction if doc is None else f"{instruction}\n{DOC_PREFIX}{doc.doc_text()}"


def _context_doc(pair: dict, catalog: Sequence[APIDoc], retrieval: str | None,
                 retriever: APIRetriever | None) -> APIDoc | None:
    if retrieval is None:
        return None
    if retrieval == "oracle":
        return catalog[pair["doc_index"]]
    if retrieval == "bm25":
        hits = retriever.retrieve(pair["instruction"], k=1)
        return hits[0] if hits else None
    raise ValueError(f"retrieval must be None, 'oracle' or 'bm25', got {retrieval!r}")


def to_chats(pairs: Sequence[dict], catalog: Sequence[APIDoc], *, retrieval: str | None = None,
             retriever: APIRetriever | None = None) -> list[dict]:
    """SFT rows ``{"messages": [user, assistant]}`` (see the module docstring for ``retrieval``)."""
    if retrieval == "bm25" and retriever is None:
        retriever = APIRetriever(catalog)
    rows = []
    for p in pairs:
        doc = catalog[p["doc_index"]]
        context = _context_doc(p, catalog, retrieval, retriever)
        rows.append({"messages": [{"role": "user", "content": user_prompt(p["instruction"], context)},
                                  {"role": "assistant", "content": gorilla_answer(doc, p["api_call"])}]})
    return rows


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    from mmllm.data.corpora import write_jsonl as _write
    _write(rows, path)
    return Path(path)


def eval_prompts(pairs: Sequence[dict], catalog: Sequence[APIDoc], *, retrieval: str | None = None,
                 retriever: APIRetriever | None = None) -> list[list[dict]]:
    """The user turns (as one-message conversations) to generate answers for."""
    return [row["messages"][:1] for row in to_chats(pairs, catalog, retrieval=retrieval, retriever=retriever)]


def evaluate(answers: Sequence[str | None], pairs: Sequence[dict], catalog: Sequence[APIDoc]) -> MatchReport:
    """AST sub-tree matching of ``answers`` against the pairs' reference calls over ``catalog``."""
    return evaluate_answers(answers, [p["api_call"] for p in pairs], [d.api_call for d in catalog])


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmllm.tools.gorilla generate|evaluate`` (see ``--help``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmllm.tools.gorilla")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="self-instruct pairs through a teacher; writes pairs + SFT chats")
    g.add_argument("--catalog", default=None, help="API catalog JSONL (default: the shipped one)")
    g.add_argument("--teacher", default="openai", help="a mmllm/conf/teacher option (openai, local)")
    g.add_argument("--set", nargs="*", default=[], help="teacher overrides, e.g. model=gpt-4o-mini")
    g.add_argument("--per-api", type=int, default=10)
    g.add_argument("--seed-examples", default=None, help="JSONL of hand-written {instruction, api_call}")
    g.add_argument("--out", required=True, help="output directory")
    e = sub.add_parser("evaluate", help="AST-match answers ({answer} per line, in pair order) against pairs")
    e.add_argument("--catalog", default=None)
    e.add_argument("--pairs", required=True)
    e.add_argument("--answers", required=True)
    args = ap.parse_args(argv)
    from mmllm.tools.catalog import load_catalog

    catalog = load_catalog(args.catalog)
    if args.cmd == "evaluate":
        pairs, answers = _read_jsonl(args.pairs), [r.get("answer") for r in _read_jsonl(args.answers)]
        report = evaluate(answers, pairs, catalog)
        print(report.summary())
        print(json.dumps(report.as_dict()))
        return 0
    import hydra
    from omegaconf import OmegaConf

    from mmllm.config import CONF_DIR

    # The teacher's YAML plus key=value overrides (not composed: "model" would name a config group).
    cfg = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "teacher" / f"{args.teacher}.yaml"),
                          OmegaConf.from_dotlist(list(args.set)))
    seeds = _read_jsonl(args.seed_examples) if args.seed_examples else ()
    stats = GenerationStats()
    with hydra.utils.instantiate(cfg) as teacher:
        pairs = generate_pairs(teacher, catalog, per_api=args.per_api, seed_examples=seeds, stats=stats)
    out = Path(args.out)
    write_jsonl(pairs, out / "pairs.jsonl")
    retriever = APIRetriever(catalog)
    for mode in (None, "oracle", "bm25"):
        write_jsonl(to_chats(pairs, catalog, retrieval=mode, retriever=retriever), out / f"sft_{mode or 'no_doc'}.jsonl")
    print(json.dumps({"pairs": len(pairs), "stats": dict(stats), "out": str(out)}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

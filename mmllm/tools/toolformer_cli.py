"""Toolformer from the command line: annotate a corpus into fine-tuning rows, or decode with calls.

::

    python -m mmllm.tools.toolformer_cli annotate --model smollm2 --input texts.jsonl \\
        --output rows.jsonl [--search-corpus wiki.jsonl] [--tau-s 0.05 --top-k 5 --num-samples 5 --tau-f 1.0]
    python -m mmllm.tools.toolformer_cli generate --model runs/tf/last.ckpt --prompt "400+25 is"

``--input`` is JSONL with a ``text`` field (or plain text, one document per line). Each output
line is a row ``{"input_ids", "labels", "calls"}`` (:meth:`ToolformerAnnotator.annotate_many`); the
stats (candidates, sampled, executed, kept, share kept) are printed as JSON at the end. The model's
tokenizer gets the Toolformer tokens (and the model new embedding rows) when it lacks them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from mmllm.tools.builtin import default_registry
from mmllm.tools.toolformer import ToolformerAnnotator, ToolformerDecoder, add_toolformer_tokens


def read_texts(path: str | Path) -> Iterator[str]:
    """Texts of a JSONL file (``text`` field) or a plain text file (one per non-empty line)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    text = json.loads(line).get("text")
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON: {exc}") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: a JSON line needs a string 'text' field")
                yield text
            else:
                yield line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmllm.tools.toolformer_cli", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("annotate", "generate"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="a model source mmllm.checkpoint.load_model reads")
        s.add_argument("--search-corpus", help="documents for the search tool (JSONL or text)")
    a = sub.choices["annotate"]
    a.add_argument("--input", required=True)
    a.add_argument("--output", required=True)
    a.add_argument("--tau-s", type=float, default=0.05)
    a.add_argument("--top-k", type=int, default=5)
    a.add_argument("--num-samples", type=int, default=5)
    a.add_argument("--tau-f", type=float, default=1.0)
    a.add_argument("--max-call-tokens", type=int, default=32)
    g = sub.choices["generate"]
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmllm.checkpoint import load_model

    model, tokenizer = load_model(args.model)
    add_toolformer_tokens(tokenizer, model)
    model.eval()
    search = None
    if args.search_corpus:
        from mmllm.tools.search import BM25Index

        search = BM25Index.from_corpus(args.search_corpus)
    with default_registry(search=search) as registry:
        if args.command == "generate":
            out = ToolformerDecoder(model=model, tokenizer=tokenizer, registry=registry).generate_text(
                args.prompt, max_new_tokens=args.max_new_tokens)
            print(out["text"])
            for call, result in out["calls"]:
                print(f"[call] {call} -> {result.content}", file=sys.stderr)
            return 0
        ann = ToolformerAnnotator(model=model, tokenizer=tokenizer, registry=registry, tau_s=args.tau_s,
                                  top_k=args.top_k, num_samples=args.num_samples, tau_f=args.tau_f,
                                  max_call_tokens=args.max_call_tokens)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in ann.annotate_many(read_texts(args.input)))
        print(json.dumps(ann.stats.as_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Curation throughput vs datatrove, same documents, one run, one core.

Two comparisons, each on the same in-memory corpus (real Wikipedia sentences from gensim's wheel
drawn into documents of varied length, 10 % of them planted near-duplicates):

* **filter chain**: the kit's Gopher repetition + quality stages (NeMo Curator filters, run as
  the stages run inside the pipeline: ``stage.process(DocumentBatch)`` on batches of 500) vs
  datatrove's ``GopherRepetitionFilter`` + ``GopherQualityFilter``. datatrove is measured twice:
  with its default English word tokenizer (spaCy) and with a plain whitespace tokenizer, the
  tokenisation the kit uses, so the second ratio compares the filter code alone.
* **MinHash dedup** (word 5-grams, 14 bands x 8 rows): the kit's signature stage + LSH clustering
  vs datatrove's four steps (signatures -> buckets -> clusters -> filter) on local files.

Everything runs in this process, so documents per CPU-second is throughput per core (wall time is
printed too; the machine may be shared). Ratios > 1 mean the kit is faster.

Usage::

    python benchmarks/curation_throughput.py [--docs 4000] [--json out.json]

Needs the ``bench`` extra: ``pip install datatrove spacy``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pandas as pd

BATCH = 500


def build_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 12-80 real Wikipedia sentences drawn at random (paragraphs of 4), so they
    rarely overlap by chance; 10 % are near-duplicates (1 % of words dropped) of earlier ones."""
    import re

    from mmllm.curation.sample_data import wikipedia_articles

    rng = random.Random(seed)
    sentences = [s for _, blocks in wikipedia_articles(max_words=100_000) for k, t in blocks
                 if k == "p" for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 4]
    docs: list[str] = []
    while len(docs) < n_docs:
        if docs and rng.random() < 0.1:
            words = rng.choice(docs).split(" ")
            docs.append(" ".join(w for w in words if rng.random() > 0.01))
            continue
        picked = rng.sample(sentences, rng.randint(12, 80))
        docs.append("\n\n".join(" ".join(picked[i:i + 4]) for i in range(0, len(picked), 4)))
    return docs


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(cpu seconds, wall seconds, result)`` of ``fn()``."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def ours_filters(texts: list[str]) -> int:
    from nemo_curator.tasks import DocumentBatch

    from mmllm.curation.filters import GopherQualityStage, GopherRepetitionStage

    stages = [GopherRepetitionStage(), GopherQualityStage()]
    kept = 0
    for i in range(0, len(texts), BATCH):
        batch = DocumentBatch(dataset_name="bench", data=pd.DataFrame({"text": texts[i:i + BATCH]}),
                              _metadata={})
        for stage in stages:
            batch = stage.process(batch)
        kept += len(batch.data)
    return kept


def _whitespace_tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in text.split("\n") if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            spans, pos = [], 0
            for s in self.sent_tokenize(text):
                start = text.index(s, pos)
                spans.append((start, start + len(s)))
                pos = start + len(s)
            return spans

    return Whitespace("en")


def datatrove_filters(texts: list[str], tokenizer: Any = None) -> int:
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    kw = {"language": tokenizer} if tokenizer is not None else {}
    docs = (Document(text=t, id=str(i)) for i, t in enumerate(texts))
    out = GopherQualityFilter(**kw).run(GopherRepetitionFilter(**kw).run(docs))
    return sum(1 for _ in out)


def ours_minhash(texts: list[str]) -> int:
    from nemo_curator.tasks import DocumentBatch

    from mmllm.curation.dedup_minhash import MinHashDedup

    # Bands only, no signature verification: the same decision rule as datatrove.
    step = MinHashDedup(backend="cpu", jaccard_threshold=0.0)
    stage = step.signature_stage()
    sigs = []
    for i in range(0, len(texts), BATCH):
        batch = DocumentBatch(dataset_name="bench", data=pd.DataFrame({"text": texts[i:i + BATCH]}),
                              _metadata={})
        sigs.extend(stage.process(batch).data["_minhash"])
    import numpy as np

    sig = np.frombuffer(b"".join(sigs), dtype=np.uint32).reshape(len(sigs), step.num_perm)
    return sum(1 for r in step.find_duplicates(sig).reasons if r)


def _patch_datatrove_xxhash() -> None:
    """datatrove 0.10 passes ``str`` to xxhash, which xxhash >= 4 rejects; encode first (what
    older xxhash did internally), keeping datatrove's default xxhash64 shingle hashing."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    dt_xxhash.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode() if isinstance(d, str) else d)
    dt_xxhash.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode() if isinstance(d, str) else d)


def datatrove_minhash(texts: list[str]) -> int:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    with tempfile.TemporaryDirectory() as tmp:
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
        _drain(MinhashDedupSignature(output_folder=f"{tmp}/sigs", config=cfg).run(iter(docs), 0, 1))
        for b in range(cfg.num_buckets):
            _drain(MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets",
                                       config=cfg).run(None, b, cfg.num_buckets))
        _drain(MinhashDedupCluster(input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/remove",
                                   config=cfg).run(None, 0, 1))
        kept = sum(1 for _ in MinhashDedupFilter(input_folder=f"{tmp}/remove").run(iter(docs), 0, 1))
    return len(texts) - kept


def _drain(result: Any) -> None:
    if result is not None and hasattr(result, "__next__"):
        deque(result, maxlen=0)


def run(n_docs: int) -> dict[str, Any]:
    """Run every measurement once on the same corpus and return the numbers."""
    from loguru import logger

    logger.remove()  # datatrove logs every step at INFO
    texts = build_corpus(n_docs)
    words = sum(len(t.split()) for t in texts)
    cases = {
        "filters/mmllm": lambda: ours_filters(texts),
        "filters/datatrove(spacy)": lambda: datatrove_filters(texts),
        "filters/datatrove(whitespace)": lambda: datatrove_filters(texts, _whitespace_tokenizer()),
        "minhash/mmllm": lambda: ours_minhash(texts),
        "minhash/datatrove": lambda: datatrove_minhash(texts),
    }
    datatrove_filters(texts[:20])  # load spaCy before timing
    _patch_datatrove_xxhash()
    results = {}
    for name, fn in cases.items():
        cpu, wall, out = timed(fn)
        results[name] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                         "docs_per_cpu_s": round(len(texts) / cpu, 1), "result": out}
    ratio = lambda a, b: round(results[a]["docs_per_cpu_s"] / results[b]["docs_per_cpu_s"], 2)
    return {"docs": len(texts), "words": words, "results": results, "ratios": {
        "filters vs datatrove(spacy)": ratio("filters/mmllm", "filters/datatrove(spacy)"),
        "filters vs datatrove(whitespace)": ratio("filters/mmllm", "filters/datatrove(whitespace)"),
        "minhash vs datatrove": ratio("minhash/mmllm", "minhash/datatrove")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    report = run(args.docs)
    print(f"{report['docs']} documents, {report['words']} words, single process")
    print(f"{'case':32s} {'docs/cpu-s':>11s} {'cpu s':>8s} {'wall s':>8s}  result")
    for name, r in report["results"].items():
        print(f"{name:32s} {r['docs_per_cpu_s']:11.1f} {r['cpu_s']:8.2f} {r['wall_s']:8.2f}  "
              f"{'kept' if name.startswith('filters') else 'removed'} {r['result']}")
    for name, value in report["ratios"].items():
        print(f"ratio mmllm/{name}: {value:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()

"""Curation scaling: time and peak memory per step at 1x, 2x, 4x, 8x input, Ray worker scaling,
and the MinHash signature speed against datasketch.

The corpus is synthetic but made of real text: documents of 12-80 Wikipedia sentences (from
gensim's wheel) in paragraphs of 4, with planted duplicates of earlier documents: 5 % exact
copies, 8 % near copies (1 % of the words dropped, a boilerplate line added) and 7 % that quote
a passage of 60+ words from an earlier document. Every scale draws from the same generator, so a
step that is linear in its input shows a log-log slope of 1.

* **Steps** (in this process, one core): the reader on a JSONL shard, the URL filter, Gopher
  repetition + quality, the RefinedWeb line filter, fastText language ID, and each dedup step
  (URL, exact, MinHash, SimHash, substring: signature stage + global decision; substring in
  its bounded-memory mode with small groups and partitions, so their number grows with the
  input). Time is CPU
  seconds; peak memory is the largest traced allocation (``tracemalloc``, numpy included,
  native libraries such as rensa and fastText not) in a second, separate pass.
* **Ray**: the whole pipeline pass (``run_curation`` with the Ray Data executor, 8 JSONL
  shards) on 1 and 2 workers of a Ray instance started beforehand, after a warm-up run that
  starts every worker process (so Ray startup and worker imports are not timed).
* **MinHash vs datasketch** at the same banding (word 5-grams, 112 permutations, 14 bands x 8
  rows): recall and precision on the planted copies and docs per CPU-second.

Usage::

    python benchmarks/curation_scaling.py [--base-docs 500] [--scales 1 2 4 8] [--json out.json]

Needs the ``bench`` extra for datasketch (``pip install datasketch``); it is skipped without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BATCH = 500
PIPELINE_STAGES = ["url_filter", "langid", "gopher_repetition", "gopher_quality",
                   "refinedweb_lines"]


def _sentences(rng: random.Random, pool: list[str]) -> Iterator[str]:
    """Sentences of the pool in random order, without accidental repeats at any corpus size.

    The first pass yields the pool as it is; every later pass replaces every 8th word (from a
    random offset) with a random word of the pool, so no 50-token window recurs by chance. (A
    corpus that re-samples a fixed pool repeats long sentences more often the larger it gets:
    at 8x, 84 % of documents had a repeated span against 56 % at 1x, and substring dedup's work
    grew with that share rather than with the input.)
    """
    vocab = sorted({w for s in pool for w in s.split(" ")})
    for k in itertools.count():
        order = pool[:]
        rng.shuffle(order)
        for s in order:
            if k:
                words = s.split(" ")
                for i in range(rng.randrange(8), len(words), 8):
                    words[i] = rng.choice(vocab)
                s = " ".join(words)
            yield s


def build_corpus(n_docs: int, seed: int = 0) -> tuple[list[dict[str, str]], set[int]]:
    """``(documents with url and text, indexes of planted exact/near copies)``.

    The planted exact copies (5 %), near copies (8 %) and quoted passages (7 %) are the only
    repeated text, at the same rates at every size.
    """
    from mmllm.curation.sample_data import wikipedia_articles

    rng = random.Random(seed)
    pool = [s for _, blocks in wikipedia_articles(max_words=100_000) for k, t in blocks
            if k == "p" for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) >= 4]
    sentences = _sentences(rng, pool)
    docs, copies = [], set()
    while len(docs) < n_docs:
        r = rng.random()
        if docs and r < 0.05:
            text = rng.choice(docs)["text"]
            copies.add(len(docs))
        elif docs and r < 0.13:
            words = rng.choice(docs)["text"].split(" ")
            text = " ".join(w for w in words if rng.random() > 0.01) + "\nShare this page"
            copies.add(len(docs))
        else:
            picked = [next(sentences) for _ in range(rng.randint(12, 80))]
            text = "\n\n".join(" ".join(picked[i:i + 4]) for i in range(0, len(picked), 4))
            if docs and r < 0.20:  # quote a passage of an earlier document
                words = rng.choice(docs)["text"].split(" ")
                start = rng.randrange(max(1, len(words) - 80))
                text += "\n\n" + " ".join(words[start:start + rng.randint(60, 80)])
        docs.append({"url": f"https://site{len(docs) % 97}.example/page/{len(docs)}",
                     "text": text})
    return docs, copies


def _batches(texts: list[str], urls: list[str]) -> list[Any]:
    from nemo_curator.tasks import DocumentBatch

    return [DocumentBatch(dataset_name="bench", _metadata={}, data=pd.DataFrame(
        {"text": texts[i:i + BATCH], "url": urls[i:i + BATCH]}))
        for i in range(0, len(texts), BATCH)]


def step_functions(docs: list[dict[str, str]], tmp: Path) -> dict[str, Callable[[], Any]]:
    """One zero-argument callable per measured step, each on the whole corpus."""
    from nemo_curator.backends.base import WorkerMetadata

    from mmllm.curation.dedup_simhash import SimHashDedup
    from mmllm.curation.dedup_substring import SubstringDedup
    from mmllm.curation.dedup_url import SeenUrlStore
    from mmllm.curation.pipeline import build_components, load_config

    parts = build_components(load_config(["input=x", f"output={tmp}", "curation/executor=local"]))
    stages = {s.name: s for s in parts["stages"]}
    # Substring dedup in its bounded-memory mode: ~1 MB of text per group and 200k windows per
    # partition, so group and partition counts grow with the input (1x: 2 and 3; 8x: 15 and 19).
    dedup = {d.name: d for d in parts["dedup"]} | {"simhash_dedup": SimHashDedup(),
             "substring_dedup": SubstringDedup(max_chars_per_shard=1_000_000,
                                               max_windows_per_partition=200_000)}
    texts, urls = [d["text"] for d in docs], [d["url"] for d in docs]
    shard = tmp / f"corpus-{len(docs)}.jsonl"
    pd.DataFrame(docs).to_json(shard, orient="records", lines=True)

    def run_stage(name: str) -> Callable[[], int]:
        stage = stages[name]
        stage.setup(WorkerMetadata())

        def fn() -> int:
            return sum(len(stage.process(b).data) for b in _batches(texts, urls))
        return fn

    def url_dedup() -> int:
        store = SeenUrlStore(tmp / f"seen-{time.perf_counter_ns()}.sqlite")
        try:
            return sum(r is not None for r in
                       dedup["url_dedup"].find_duplicates(urls, store, "bench").reasons)
        finally:
            store.close()

    def text_step(name: str) -> Callable[[], int]:
        return lambda: sum(r is not None for r in dedup[name].deduplicate_texts(texts).reasons)

    fns: dict[str, Callable[[], Any]] = {
        "read": lambda: sum(len(b.data) for b in stages["read"].read_file(str(shard)))}
    fns |= {name: run_stage(name) for name in PIPELINE_STAGES}
    fns["url_dedup"] = url_dedup
    fns |= {name: text_step(name) for name in
            ("exact_dedup", "minhash_dedup", "simhash_dedup", "substring_dedup")}
    return fns


def measure_steps(base_docs: int, scales: list[int], memory: bool, repeats: int = 3,
                  only: list[str] | None = None) -> dict[str, Any]:
    """Per step and scale: CPU seconds (the least of ``repeats`` runs, as timeit does: the other
    runs only add noise from a shared machine), peak traced MiB, and the log-log slopes."""
    out: dict[str, Any] = {"docs": {}, "words": {}, "cpu_s": {}, "peak_mib": {}, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="curscale-") as tmp:
        for scale in scales:
            docs, _ = build_corpus(base_docs * scale, seed=scale)
            out["docs"][scale] = len(docs)
            out["words"][scale] = sum(len(d["text"].split()) for d in docs)
            fns = step_functions(docs, Path(tmp))
            if only:
                fns = {k: v for k, v in fns.items() if k in only}
            for name, fn in fns.items():
                best = math.inf
                for _ in range(max(1, repeats)):
                    c0 = time.process_time()
                    fn()
                    best = min(best, time.process_time() - c0)
                out["cpu_s"].setdefault(name, {})[scale] = round(best, 3)
            if memory:
                for name, fn in fns.items():
                    tracemalloc.start()
                    fn()
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    out["peak_mib"].setdefault(name, {})[scale] = round(peak / 2**20, 1)
            print(f"  scale {scale}x: {len(docs)} docs done", flush=True)
    x = np.log([out["words"][s] for s in scales])
    slope = lambda series: round(float(np.polyfit(x, np.log([max(series[s], 1e-3) for s in scales]),
                                                  1)[0]), 2)
    out["time_exponent"] = {k: slope(v) for k, v in out["cpu_s"].items()}
    out["memory_exponent"] = {k: slope(v) for k, v in out["peak_mib"].items()}
    return out


def measure_ray(docs_total: int, shards: int = 8) -> dict[str, Any]:
    """Pipeline-pass docs/s on 1 and 2 Ray workers (instance started before timing)."""
    import ray

    from mmllm.curation.pipeline import run_curation

    docs, _ = build_corpus(docs_total, seed=99)
    out: dict[str, Any] = {"docs": len(docs)}
    with tempfile.TemporaryDirectory(prefix="curray-") as tmp:
        files = []
        for k in range(shards):
            files.append(f"{tmp}/in/part{k}.jsonl")
            Path(files[-1]).parent.mkdir(exist_ok=True)
            pd.DataFrame(docs[k::shards]).to_json(files[-1], orient="records", lines=True)
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            try:
                # Warm-up: start (and import into) every worker process before timing.
                run_curation(files[:workers], f"{tmp}/warm{workers}", executor="ray_data")
                r = run_curation(files, f"{tmp}/out{workers}", executor="ray_data")
            finally:
                ray.shutdown()
            pass1 = r.report["seconds"]["pass1"]
            out[f"{workers}_workers"] = {"pass1_s": pass1, "total_s": r.report["seconds"]["total"],
                                         "docs_per_s": round(len(docs) / pass1, 1)}
    rate = {w: out[f"{w}_workers"]["docs_per_s"] for w in (1, 2)}
    out["speedup_2_vs_1"] = round(rate[2] / rate[1], 2)
    return out


def measure_minhash_vs_datasketch(n_docs: int) -> dict[str, Any]:
    """Docs per CPU-second and recall/precision on planted copies, both at 14 bands x 8 rows."""
    from mmllm.curation.dedup_minhash import MinHashDedup, MinHasher

    docs, copies = build_corpus(n_docs, seed=7)
    texts = [d["text"] for d in docs]

    def ours(backend: str) -> set[int]:
        step = MinHashDedup(backend="cpu", signature_backend=backend)
        stage = step.signature_stage()
        sig = b"".join(b for batch in _batches(texts, [""] * len(texts))
                       for b in stage.process(batch).data["_minhash"])
        sig = np.frombuffer(sig, dtype=np.uint32).reshape(len(texts), step.num_perm)
        return {i for i, r in enumerate(step.find_duplicates(sig).reasons) if r}

    def datasketch() -> set[int]:
        from datasketch import MinHash, MinHashLSH

        lsh, removed = MinHashLSH(num_perm=112, params=(14, 8)), set()
        for i, t in enumerate(texts):  # same normalisation and word 5-gram shingles
            w = MinHasher.normalize(t).split()
            m = MinHash(num_perm=112, seed=42)
            m.update_batch([" ".join(w[j:j + 5]).encode() for j in range(max(1, len(w) - 4))])
            if lsh.query(m):
                removed.add(i)
            else:
                lsh.insert(str(i), m)
        return removed

    cases = {"mmllm(rensa)": lambda: ours("rensa"), "mmllm(numpy)": lambda: ours("numpy")}
    try:
        import datasketch as _  # noqa: F401

        cases["datasketch"] = datasketch
    except ImportError:
        print("  datasketch not installed: pip install datasketch (bench extra)")
    out: dict[str, Any] = {"docs": len(texts), "planted_copies": len(copies)}
    for name, fn in cases.items():
        c0 = time.process_time()
        removed = fn()
        cpu = time.process_time() - c0
        out[name] = {"cpu_s": round(cpu, 3), "docs_per_cpu_s": round(len(texts) / cpu, 1),
                     "recall": round(len(removed & copies) / len(copies), 3),
                     "precision": round(len(removed & copies) / max(1, len(removed)), 3)}
    if "datasketch" in out:
        for name in ("mmllm(rensa)", "mmllm(numpy)"):
            out[f"ratio {name}/datasketch"] = round(
                out[name]["docs_per_cpu_s"] / out["datasketch"]["docs_per_cpu_s"], 2)
    return out


def print_report(r: dict[str, Any]) -> None:
    st = r["steps"]
    scales = list(st["docs"])
    sizes = ", ".join(f"{s}x={st['docs'][s]} docs/{st['words'][s]} words" for s in scales)
    print(f"\nsteps ({sizes})")
    print(f"{'step':18s}" + "".join(f"{f'{s}x cpu s':>11s}" for s in scales) + f"{'time exp':>10s}"
          + ("".join(f"{f'{s}x MiB':>9s}" for s in scales) + f"{'mem exp':>9s}" if st["peak_mib"]
             else ""))
    for name, series in st["cpu_s"].items():
        line = f"{name:18s}" + "".join(f"{series[s]:11.3f}" for s in scales)
        line += f"{st['time_exponent'][name]:10.2f}"
        if st["peak_mib"]:
            line += "".join(f"{st['peak_mib'][name][s]:9.1f}" for s in scales)
            line += f"{st['memory_exponent'][name]:9.2f}"
        print(line)
    worst = max(st["time_exponent"].items(), key=lambda kv: kv[1])
    print(f"largest time exponent: {worst[0]} {worst[1]:.2f} (target <= 1.2)")
    if "ray" in r:
        ray = r["ray"]
        print(f"\nray pipeline pass on {ray['docs']} docs: 1 worker "
              f"{ray['1_workers']['docs_per_s']} docs/s, 2 workers "
              f"{ray['2_workers']['docs_per_s']} docs/s, speedup {ray['speedup_2_vs_1']}x "
              "(target >= 1.8; the machine's cores may be shared)")
    if "minhash" in r:
        mh = r["minhash"]
        print(f"\nminhash on {mh['docs']} docs ({mh['planted_copies']} planted copies)")
        for name in ("mmllm(rensa)", "mmllm(numpy)", "datasketch"):
            if name in mh:
                m = mh[name]
                print(f"  {name:14s} {m['docs_per_cpu_s']:9.1f} docs/cpu-s  "
                      f"recall {m['recall']:.3f}  precision {m['precision']:.3f}")
        for key in [k for k in mh if k.startswith("ratio")]:
            print(f"  {key}: {mh[key]:.2f}x (target >= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-docs", type=int, default=300, help="documents at 1x")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--repeats", type=int, default=3, help="runs per step and scale (least kept)")
    parser.add_argument("--steps", nargs="+", default=None, help="measure only these steps")
    parser.add_argument("--ray-docs", type=int, default=4000,
                        help="0 skips the Ray comparison (a pass has ~1 s of fixed Ray Data overhead)")
    parser.add_argument("--minhash-docs", type=int, default=2000, help="0 skips datasketch")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()  # NeMo Curator logs every batch at INFO
    t0 = time.perf_counter()
    report: dict[str, Any] = {"steps": measure_steps(args.base_docs, args.scales,
                                                     not args.no_memory, args.repeats, args.steps)}
    if args.minhash_docs:
        report["minhash"] = measure_minhash_vs_datasketch(args.minhash_docs)
    if args.ray_docs:
        report["ray"] = measure_ray(args.ray_docs)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print_report(report)
    print(f"\nwall time {report['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""CuratedTextDataModule: web archives in, packed pretraining batches out.

``prepare_data`` (rank 0) runs the curation (:func:`mmllm.curation.run_curation`, reused when the
output directory already holds a finished run), splits the curated documents into train and
validation JSONL deterministically (by a hash of each text), and hands them to tokenisation: a
:class:`~mmllm.data.text_corpus.TextCorpusDataModule` (composed, not inherited) trains or loads
the tokenizer and writes packed token shards with ``tokenize_to_shards``. Batches then come from
:class:`~mmllm.data.pretrain.PretrainDataModule`, optionally mixed with other token sources.

Layout of ``cache_dir``::

    curated/   the curation output (data/*.jsonl, report.{json,png,md}, _work/)
    text/      train.jsonl, val.jsonl and split.json (which curation they came from)
    corpus/    tokenizer/ and shards/{train,val} (TextCorpusDataModule's cache)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import xxhash

from mmllm.data.pretrain import PretrainDataModule


class CuratedTextDataModule(PretrainDataModule):
    """Pretraining on curated web data (WARC/WET/JSONL/Parquet).

    Args:
        inputs: Raw web data to curate: path, glob, directory or list (local or fsspec).
        cache_dir: Where the curation, the splits, the tokenizer and the shards go (reused).
        curation_overrides: Hydra overrides of ``conf/curate.yaml`` (e.g. a blocklist path).
        executor: Curation executor: ``"ray_data"`` (local Ray or ``RAY_ADDRESS``) or ``"local"``.
        num_cpus: CPUs of the private local Ray instance (``None`` = all).
        val_fraction: Share of curated documents held out for validation.
        tokenizer: A tokenizer to load (path, HF dir or ``"smollm2"``); ``None`` trains a
            byte-level BPE of ``vocab_size`` on the curated training split.
        vocab_size: Size of the trained tokenizer.
        extra_sources: Other token-shard sources (``name``, ``path``, ``weight``|``epochs``) mixed
            with the curated web source.
        web_weight: Weight of the curated source when ``extra_sources`` are given (else it is
            read once per epoch).
        seq_len, batch_size, num_samples, val_samples, num_workers, seed: see
            :class:`PretrainDataModule`.
        num_proc: Tokenisation processes.
    """

    def __init__(self, *, inputs: str | list[str], cache_dir: str,
                 curation_overrides: list[str] | None = None, executor: str = "ray_data",
                 num_cpus: int | None = None, val_fraction: float = 0.05,
                 tokenizer: str | None = None, vocab_size: int = 4096,
                 extra_sources: list[dict] | None = None, web_weight: float = 1.0,
                 seq_len: int, batch_size: int, num_samples: int | None = None,
                 val_samples: int | None = None, num_workers: int = 0, seed: int = 1234,
                 num_proc: int = 1) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.cache_dir = Path(cache_dir)
        shards = self.cache_dir / "corpus" / "shards"
        web = {"name": "web", "path": str(shards / "train")}
        web.update({"weight": web_weight} if extra_sources else {"epochs": 1.0})
        super().__init__(sources=[web, *[dict(s) for s in extra_sources or []]],
                         val_sources=[{"name": "web_val", "path": str(shards / "val"),
                                       "epochs": 1.0}],
                         seq_len=seq_len, batch_size=batch_size, num_samples=num_samples,
                         val_samples=val_samples, num_workers=num_workers, seed=seed)
        self.inputs = inputs if isinstance(inputs, str) else [str(i) for i in inputs]
        self.curation_overrides = list(curation_overrides or [])
        self.executor, self.num_cpus, self.val_fraction = executor, num_cpus, val_fraction
        self.tokenizer_spec, self.vocab_size, self.num_proc = tokenizer, vocab_size, num_proc
        self.curation_report: dict[str, Any] | None = None
        self._corpus = None

    # ----------------------------------------------------------------------------- preparing
    def prepare_data(self) -> None:
        """Curate (or reuse), split, then tokenise (or reuse) into packed shards."""
        from mmllm.curation import run_curation

        result = run_curation(self.inputs, self.cache_dir / "curated", executor=self.executor,
                              num_cpus=self.num_cpus, overrides=self.curation_overrides)
        self.curation_report = result.report
        if result.num_documents < 2:
            raise ValueError(f"the curation kept {result.num_documents} document(s) of "
                             f"{self.inputs}: too few to train and validate on")
        train, val = self._split(result.shards)
        self.corpus.train_texts, self.corpus.val_texts = str(train), str(val)
        self.corpus.prepare_data()

    def _split(self, shards: Sequence[str]) -> tuple[Path, Path]:
        """Write train/val JSONL once per curation output; a new curation resets the corpus."""
        text_dir = self.cache_dir / "text"
        train, val, stamp = text_dir / "train.jsonl", text_dir / "val.jsonl", text_dir / "split.json"
        key = {"curation": _fingerprint(shards), "val_fraction": self.val_fraction}
        if stamp.is_file() and json.loads(stamp.read_text()) == key:
            return train, val
        # Shards tokenised from an earlier curation (and a tokenizer trained on it) are stale.
        shutil.rmtree(self.cache_dir / "corpus", ignore_errors=True)
        docs = pd.concat([_read(s) for s in shards], ignore_index=True)
        cut = int(self.val_fraction * 10_000)
        held = docs["text"].map(lambda t: xxhash.xxh3_64_intdigest(t.encode()) % 10_000 < cut)
        if not held.any():  # tiny corpora: still validate on one document
            held.iloc[-1] = True
        text_dir.mkdir(parents=True, exist_ok=True)
        for path, part in ((train, docs[~held]), (val, docs[held])):
            tmp = path.with_suffix(".tmp")
            part[["text"]].to_json(tmp, orient="records", lines=True, force_ascii=False)
            os.replace(tmp, path)
        stamp.write_text(json.dumps(key))
        return train, val

    @property
    def corpus(self):
        """The composed :class:`TextCorpusDataModule` that owns the tokenizer and the shards."""
        if self._corpus is None:
            from mmllm.data.text_corpus import TextCorpusDataModule

            text_dir = self.cache_dir / "text"
            self._corpus = TextCorpusDataModule(
                train_texts=str(text_dir / "train.jsonl"), val_texts=str(text_dir / "val.jsonl"),
                cache_dir=str(self.cache_dir / "corpus"), tokenizer=self.tokenizer_spec,
                vocab_size=self.vocab_size, seq_len=self.seq_len, batch_size=self.batch_size,
                num_proc=self.num_proc)
        return self._corpus

    @property
    def tokenizer(self):
        """The tokenizer of the shards (available after ``prepare_data``)."""
        return self.corpus.tokenizer


def _read(path: str) -> pd.DataFrame:
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_json(path, lines=True)


def _fingerprint(shards: Sequence[str]) -> str:
    """Identity of a curation output: its shard names and sizes."""
    items = sorted((Path(s).name, os.path.getsize(s)) for s in shards)
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()

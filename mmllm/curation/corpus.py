"""The corpus between passes: stage-1 shards, which documents survive, and the global dedup steps.

:class:`Stage1Corpus` implements the :class:`~mmllm.curation.dedup_common.CorpusView` the dedup
steps work on (column access, texts, row lookup), applies their decisions and finally writes the
surviving documents as output shards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from tqdm.auto import tqdm

from mmllm.curation.base import EXAMPLE_CHARS, new_stage_stats
from mmllm.curation.dedup_common import DedupResult, GlobalDedupStep
from mmllm.curation.writer import OutputFormat, atomic_write_bytes, public_columns, table_bytes


class Stage1Corpus:
    """All documents of the stage-1 shards, with a mask of survivors and pending text edits.

    Args:
        shards: ``(parquet path, number of documents)`` in corpus order.
        storage_options: fsspec options.
        text_field: Text column.
    """

    def __init__(self, shards: Sequence[tuple[str, int]], storage_options: dict | None = None,
                 text_field: str = "text") -> None:
        self.paths = [p for p, _ in shards]
        counts = np.array([n for _, n in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.alive = np.ones(int(self.offsets[-1]), dtype=bool)
        self.edits: dict[int, str] = {}  # global document id -> current text
        self.text_field, self.storage_options = text_field, storage_options or {}
        self._cache: tuple[int, list[str]] | None = None

    def __len__(self) -> int:
        return int(self.alive.sum())

    def _ids(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def _read(self, k: int, columns: list[str] | None) -> pd.DataFrame:
        fs, p = url_to_fs(self.paths[k], **self.storage_options)
        with fs.open(p, "rb") as fh:
            return pq.read_table(fh, columns=columns).to_pandas()

    def column(self, name: str) -> list[Any]:
        """One value per surviving document (``_chars`` reflects earlier edits)."""
        values: list[Any] = []
        for k in range(len(self.paths)):
            if self.offsets[k + 1] > self.offsets[k]:
                values.extend(self._read(k, [name])[name].tolist())
        out = [values[i] for i in self._ids()]
        if name == "_chars" and self.edits:
            ids = self._ids()
            out = [len(self.edits[g]) if g in self.edits else v for g, v in zip(ids, out)]
        return out

    def _shard_texts(self, k: int) -> list[str]:
        if self._cache is None or self._cache[0] != k:
            self._cache = (k, self._read(k, [self.text_field])[self.text_field].tolist())
        return self._cache[1]

    def texts(self, indexes: Sequence[int]) -> list[str]:
        """Current texts of surviving documents given by position among the survivors."""
        ids = self._ids()[np.asarray(indexes, dtype=np.int64)]
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return [self.edits.get(int(g), self._shard_texts(int(k))[int(g - self.offsets[k])])
                for g, k in zip(ids, shard)]

    def locate(self, path: str, rows: Sequence[int]) -> list[int | None]:
        """Positions among the survivors of ``rows`` of shard ``path`` (``None`` if removed)."""
        k = [str(PurePosixPath(p)) for p in self.paths].index(str(PurePosixPath(path)))
        pos = np.cumsum(self.alive) - 1
        return [int(pos[self.offsets[k] + r]) if self.alive[self.offsets[k] + r] else None
                for r in rows]

    def apply(self, step: GlobalDedupStep, result: DedupResult, max_examples: int = 3,
              seconds: float = 0.0) -> dict[str, Any]:
        """Remove/edit documents as ``result`` says and return the step's statistics record."""
        ids = self._ids()
        if len(result.reasons) != ids.size:
            msg = f"{step.name} returned {len(result.reasons)} reasons for {ids.size} documents"
            raise RuntimeError(msg)
        chars = np.asarray(self.column("_chars"), dtype=np.int64)
        rec = new_stage_stats(step.name)
        rec["docs_in"], rec["chars_in"], rec["seconds"] = int(ids.size), int(chars.sum()), seconds
        reasons = pd.Series(result.reasons, dtype=object)
        removed = reasons.notna().to_numpy()
        for reason, idx in reasons[removed].groupby(reasons[removed]).groups.items():
            idx = list(idx)
            rec["dropped"][reason] = {"docs": len(idx), "chars": int(chars[idx].sum())}
            rec["examples"][reason] = self._examples(idx[:max_examples], result)
        for pos, text in result.edits.items():
            self.edits[int(ids[pos])] = text
        self.alive[ids[removed]] = False
        kept = np.flatnonzero(~removed)
        after = np.array([len(result.edits[i]) if i in result.edits else chars[i] for i in kept])
        rec["docs_out"], rec["chars_out"] = int(kept.size), int(after.sum()) if kept.size else 0
        rec["docs_edited"] = sum(1 for i in result.edits if not removed[i])
        if result.cluster_sizes:
            rec["extra"]["cluster_sizes"] = {str(k): v for k, v in result.cluster_sizes.items()}
        return rec

    def _examples(self, idx: list[int], result: DedupResult) -> list[dict[str, Any]]:
        urls = self.column("url")
        texts = self.texts(idx)
        out = []
        for i, text in zip(idx, texts):
            ex = {"url": urls[i], "text": text[:EXAMPLE_CHARS]}
            if i in result.duplicate_of:
                ex["duplicate_of"] = urls[result.duplicate_of[i]]
            out.append(ex)
        return out

    def write(self, out_dir: str, fmt: OutputFormat, names: Sequence[str]) -> list[str]:
        """Write the survivors (edited texts, internal columns dropped) as one shard per stage-1
        shard; empty shards are skipped.

        Returns:
            Paths written.
        """
        ext = "jsonl" if fmt == "jsonl" else "parquet"
        written = []
        for k, name in enumerate(tqdm(names, desc="write shards", disable=len(names) < 8)):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            mask = self.alive[lo:hi]
            if not mask.any():
                continue
            df = self._read(k, None)
            edited = {g - lo: t for g, t in self.edits.items() if lo <= g < hi}
            if edited:
                df[self.text_field] = [edited.get(i, t) for i, t in enumerate(df[self.text_field])]
            path = f"{out_dir.rstrip('/')}/{name}.{ext}"
            atomic_write_bytes(path, table_bytes(public_columns(df[mask]), fmt),
                               self.storage_options)
            written.append(path)
        return written


def run_global_steps(corpus: Stage1Corpus, steps: Sequence[GlobalDedupStep],
                     context: dict[str, Any], max_examples: int = 3) -> list[dict[str, Any]]:
    """Run the dedup steps in order on the survivors of the previous ones.

    Returns:
        One statistics record per step.
    """
    records = []
    for step in steps:
        if len(corpus) == 0:
            result = DedupResult(reasons=[])
            t = 0.0
        else:
            start = time.perf_counter()
            result = step.run(corpus, context)
            t = time.perf_counter() - start
        records.append(corpus.apply(step, result, max_examples, seconds=round(t, 3)))
    return records

"""Atomic shard writing: stage-1 Parquet shards (+ statistics sidecars) and the final output.

Every file is written to a temporary name beside its target and renamed into place, so a crash
never leaves a half-written shard under its final name. A stage-1 shard counts as finished once
its ``.stats.json`` sidecar exists (written after the data), which is what lets a rerun skip it.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch, FileGroupTask

from mmllm.curation.base import STATS_KEY

OutputFormat = Literal["jsonl", "parquet"]
INTERNAL_PREFIX = "_"


def atomic_write_bytes(path: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    fs, p = url_to_fs(path, **(storage_options or {}))
    parent = p.rsplit("/", 1)[0] if "/" in p else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{p.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, p)


def table_bytes(df: pd.DataFrame, fmt: OutputFormat) -> bytes:
    """Serialise a frame as JSONL (UTF-8, one document per line) or Parquet (zstd)."""
    if fmt == "jsonl":
        return df.to_json(orient="records", lines=True, force_ascii=False).encode("utf-8") \
            if len(df) else b""
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
        return buf.getvalue()
    msg = f"Unknown output format {fmt!r}: expected 'jsonl' or 'parquet'"
    raise ValueError(msg)


def public_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Drop the kit's internal columns (``_minhash``, ``_exact_hash``, ``_chars``)."""
    return df[[c for c in df.columns if not str(c).startswith(INTERNAL_PREFIX)]]


@dataclass(kw_only=True)
class ShardWriterStage(ProcessingStage[DocumentBatch, FileGroupTask]):
    """Write each batch to ``<path>/<shard>.parquet`` and its statistics to ``<shard>.stats.json``.

    Args:
        path: Stage-1 directory (local or fsspec).
        name: Stage name.
        text_field: Text column (its length is stored as ``_chars`` for the dedup steps).
        storage_options: fsspec options.
    """

    path: str
    name: str = "write_stage1"
    text_field: str = "text"
    storage_options: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def ray_stage_spec(self) -> dict[str, Any]:
        return {RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, batch: DocumentBatch) -> FileGroupTask:
        meta = batch._metadata
        shard = meta.get("shard")
        if not shard:
            msg = "batch has no 'shard' metadata: the first stage must be CurationReaderStage"
            raise ValueError(msg)
        df = batch.to_pandas().reset_index(drop=True).copy()
        df["_chars"] = df[self.text_field].str.len().fillna(0).astype("int64") if len(df) else []
        base = f"{self.path.rstrip('/')}/{shard}"
        atomic_write_bytes(f"{base}.parquet", table_bytes(df, "parquet"), self.storage_options)
        sidecar = {"shard": shard, "source_file": meta.get("source_file"),
                   "chunk": meta.get("chunk", 0), "num_chunks": meta.get("num_chunks", 1),
                   "num_docs": len(df), STATS_KEY: meta.get(STATS_KEY, [])}
        atomic_write_bytes(f"{base}.stats.json", json.dumps(sidecar).encode(),
                           self.storage_options)
        return FileGroupTask(dataset_name=batch.dataset_name, data=[f"{base}.parquet"],
                             _metadata={"shard": shard, "num_docs": len(df)},
                             _stage_perf=batch._stage_perf)


def read_sidecars(stage1_dir: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """All statistics sidecars of a stage-1 directory (empty when it does not exist)."""
    fs, p = url_to_fs(stage1_dir, **(storage_options or {}))
    if not fs.exists(p):
        return []
    out = []
    for f in sorted(fs.glob(f"{p.rstrip('/')}/*.stats.json")):
        with fs.open(f, "rt") as fh:
            out.append(json.load(fh))
    return out


def finished_inputs(sidecars: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Input files whose every chunk has a sidecar -> their sidecars in chunk order."""
    by_file: dict[str, dict[int, dict]] = {}
    for sc in sidecars:
        by_file.setdefault(sc["source_file"], {})[int(sc["chunk"])] = sc
    done = {}
    for f, chunks in by_file.items():
        n = {int(sc["num_chunks"]) for sc in chunks.values()}
        if len(n) == 1 and set(chunks) == set(range(n.pop())):
            done[f] = [chunks[i] for i in sorted(chunks)]
    return done

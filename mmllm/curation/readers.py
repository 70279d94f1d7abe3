"""The reader stage: WARC, WET, JSONL or Parquet files -> document batches, with drop reasons.

One ``FileGroupTask`` (one input file) becomes one or more ``DocumentBatch`` chunks of at most
``records_per_batch`` documents, so two workers can share one big WARC. Each chunk carries the
name of the stage-1 shard it will be written to, so a rerun can skip files whose shards exist.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from loguru import logger
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch, FileGroupTask

from mmllm.curation.base import STATS_KEY, new_stage_stats, stats_from_reasons
from mmllm.curation.warc import iter_warc

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz", ".warc.wet.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst", ".jsonl.bz2")
PARQUET_SUFFIXES = (".parquet",)
BASE_COLUMNS = ["url", "text", "html", "source_file", "record_id", "content_type", "charset"]


class MissingTextColumnError(ValueError):
    """A JSONL/Parquet input lacks the configured text column (a configuration error)."""


def input_format(path: str) -> str:
    """``"warc"``, ``"jsonl"`` or ``"parquet"`` from a file name.

    Raises:
        ValueError: For any other extension (the run would not know how to read it).
    """
    name = path.lower()
    for fmt, suffixes in (("warc", WARC_SUFFIXES), ("jsonl", JSONL_SUFFIXES),
                          ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    msg = (f"Cannot tell the format of input {path!r}: expected one of "
           f"{WARC_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES}")
    raise ValueError(msg)


def shard_key(path: str) -> str:
    """A stable, file-system-safe shard name for an input path (stem + hash of the full path)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", PurePosixPath(path).name)[:60]
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


@dataclass(kw_only=True)
class CurationReaderStage(ProcessingStage[FileGroupTask, DocumentBatch]):
    """Read WARC/WET (HTML responses only) or JSONL/Parquet (already text) into batches.

    Args:
        name: Stage name.
        max_payload_bytes: WARC payloads above this are dropped as ``too_large``.
        drop_truncated: Drop WARC records marked ``WARC-Truncated`` by the crawler.
        records_per_batch: Documents per output batch.
        text_field: Text column of JSONL/Parquet inputs (renamed to ``text``).
        url_field: URL column of JSONL/Parquet inputs (renamed to ``url``), if present.
        storage_options: fsspec options for remote inputs.
        max_examples: Examples of dropped records kept per reason.
    """

    name: str = "read"
    max_payload_bytes: int = 2_000_000
    drop_truncated: bool = True
    records_per_batch: int = 1000
    text_field: str = "text"
    url_field: str = "url"
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 3

    def __post_init__(self) -> None:
        if self.records_per_batch < 1 or self.max_payload_bytes < 1:
            msg = "records_per_batch and max_payload_bytes must be positive"
            raise ValueError(msg)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], BASE_COLUMNS

    def ray_stage_spec(self) -> dict[str, Any]:
        # Fan-out: re-block the chunks so downstream stages spread them over workers.
        return {RayStageSpecKeys.IS_FANOUT_STAGE: True, RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, task: FileGroupTask) -> list[DocumentBatch]:
        out: list[DocumentBatch] = []
        for path in task.data:
            out.extend(self.read_file(path, task.dataset_name))
        return out

    def read_file(self, path: str, dataset_name: str = "curation") -> list[DocumentBatch]:
        """Read one file into chunks; the first carries the reader's statistics.

        Args:
            path: Input file (local or fsspec).
            dataset_name: Name given to the batches.

        Returns:
            At least one batch (possibly empty), each with ``shard``/``chunk``/``num_chunks``
            metadata.
        """
        fmt = input_format(path)
        try:
            df = self._read_warc(path) if fmt == "warc" else self._read_table(path, fmt)
        except MissingTextColumnError:
            raise
        except Exception as err:  # noqa: BLE001 - an unreadable file is reported, not fatal
            logger.error(f"Cannot read {path}: {err}")
            df = pd.DataFrame(columns=[*BASE_COLUMNS, "raw_len", "drop"])
            fmt = "unreadable"
        reasons = df.pop("drop").astype(object)
        reasons = reasons.where(reasons.notna(), None)
        raw_len = df.pop("raw_len").astype("int64")
        # Dropped records have no text: describe them in the report's examples instead.
        described = [t if isinstance(t, str) else h if isinstance(h, str) else
                     f"<{c if isinstance(c, str) else 'unknown content type'}, {n} bytes>"
                     for t, h, c, n in zip(df["text"], df["html"], df["content_type"], raw_len)]
        record = stats_from_reasons(self.name, df, reasons, raw_len, raw_len,
                                    max_examples=self.max_examples,
                                    texts_in=pd.Series(described, index=df.index, dtype=object))
        record["extra"], record["docs_edited"] = {"file_formats": {fmt: 1}}, 0
        kept = df[reasons.isna().to_numpy()].reset_index(drop=True)
        return self._chunk(kept, path, record, dataset_name)

    def _chunk(self, df: pd.DataFrame, path: str, record: dict, dataset_name: str) -> list:
        key, n = shard_key(path), max(1, -(-len(df) // self.records_per_batch))
        batches = []
        for i in range(n):
            part = df.iloc[i * self.records_per_batch:(i + 1) * self.records_per_batch]
            rec = record if i == 0 else new_stage_stats(self.name)
            meta = {"source_files": [path], "source_file": path, "shard": f"{key}-{i:04d}",
                    "chunk": i, "num_chunks": n, STATS_KEY: [rec]}
            batches.append(DocumentBatch(dataset_name=dataset_name,
                                         data=part.reset_index(drop=True), _metadata=meta))
        return batches

    def _read_warc(self, path: str) -> pd.DataFrame:
        rows = []
        for r in iter_warc(path, max_payload_bytes=self.max_payload_bytes,
                           drop_truncated=self.drop_truncated,
                           storage_options=self.storage_options):
            r.pop("error", None)
            r.pop("date", None)
            rows.append(r)
        df = pd.DataFrame(rows, columns=[*BASE_COLUMNS, "raw_len", "drop"])
        return df.astype({"raw_len": "int64"})

    def _read_table(self, path: str, fmt: str) -> pd.DataFrame:
        fs, fs_path = url_to_fs(path, **self.storage_options)
        if fmt == "parquet":
            with fs.open(fs_path, "rb") as fh:
                df = pq.read_table(fh).to_pandas()
        else:
            with fs.open(fs_path, "rb", compression="infer") as fh:
                df = pd.read_json(fh, lines=True, dtype=False)
        if self.text_field not in df:
            msg = (f"{path}: no text column {self.text_field!r} (columns: {list(df.columns)}); "
                   "set stages.read.text_field")
            raise MissingTextColumnError(msg)
        df = df.rename(columns={self.text_field: "text", self.url_field: "url"})
        for col in BASE_COLUMNS:
            if col not in df:
                df[col] = None
        df["source_file"] = path
        text = df["text"].where(df["text"].map(lambda t: isinstance(t, str)), None)
        df["text"] = text
        df["raw_len"] = text.str.len().fillna(0).astype("int64")
        df["drop"] = [None if isinstance(t, str) and t.strip() else "empty" for t in text]
        return df

"""The reader stage: WARC, WET, JSONL or Parquet slices -> document batches, with drop reasons.

:class:`~mmllm.curation.input_split.InputSplitStage` first cuts every input file into slices of
``records_per_batch`` records; the reader streams one slice (warcio record by record, JSONL line
by line, Parquet batch by batch) into one ``DocumentBatch``, so memory is bounded by the batch,
not the file, and workers share a big file. Each batch carries the name of the stage-1 shard it
will be written to, so a rerun can skip files whose shards exist.

Nothing is lost silently: every record read is kept or dropped with a reason (``invalid_json``
with its line number, ``corrupt_record`` with its byte offset, ...), and an empty or unreadable
file is counted (``extra["files"]``) with its error in the stage's ``issues``, never fatal.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import PurePosixPath
from typing import Any

import pandas as pd
from loguru import logger
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch, FileGroupTask

from mmllm.curation.base import STATS_KEY, stats_from_reasons
from mmllm.curation.input_split import (
    COMPRESSED_SUFFIXES,
    SLICE_KEY,
    InputSplitStage,
    plan_file,
)
from mmllm.curation.table_records import (
    INTERNAL,
    ReadError,
    iter_jsonl_lines,
    iter_parquet_frames,
    jsonl_row,
)
from mmllm.curation.warc import iter_warc

WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz", ".warc.wet.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst", ".jsonl.bz2")
PARQUET_SUFFIXES = (".parquet",)
BASE_COLUMNS = ["url", "text", "html", "source_file", "record_id", "content_type", "charset"]


MAX_ISSUES_PER_BATCH = 100


class MissingTextColumnError(ValueError):
    """No JSONL/Parquet input has the configured text column (a configuration error)."""


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
        records_per_batch: Records per output batch (and per input slice): the bound on the
            records a reader holds at once.
        text_field: Text field of JSONL/Parquet inputs (renamed to ``text``).
        url_field: URL field of JSONL/Parquet inputs (renamed to ``url``), if present.
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
        # Fan-out: re-block the batches so downstream stages spread them over workers.
        return {RayStageSpecKeys.IS_FANOUT_STAGE: True, RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def split_stage(self) -> InputSplitStage:
        """The planning stage that cuts inputs into this reader's slices (runs before it)."""
        return InputSplitStage(records_per_batch=self.records_per_batch,
                               storage_options=dict(self.storage_options))

    def process(self, task: FileGroupTask) -> list[DocumentBatch]:
        out: list[DocumentBatch] = []
        planned = task._metadata.get(SLICE_KEY)
        for path in task.data:
            if planned is not None and planned["path"] == path:
                out.extend(self.read_slice(planned, task.dataset_name))
            else:  # a task straight from the driver: plan here
                out.extend(self.read_file(path, task.dataset_name))
        return out

    def read_file(self, path: str, dataset_name: str = "curation") -> list[DocumentBatch]:
        """Plan and read every slice of one file (in-process use and tests).

        Returns:
            At least one batch, each with ``shard``/``chunk``/``num_chunks`` metadata.
        """
        slices = plan_file(path, input_format(path), self.records_per_batch, self.storage_options)
        return [b for s in slices for b in self.read_slice(s, dataset_name)]

    def read_slice(self, s: dict[str, Any], dataset_name: str = "curation") -> list[DocumentBatch]:
        """Stream one slice (from :func:`~mmllm.curation.input_split.plan_file`) into batches.

        Returns:
            The slice's planned number of batches (one, unless a Parquet row group or a whole
            compressed file is bigger than ``records_per_batch``); the first batch of a file's
            first slice counts the file in ``extra["files"]``.
        """
        status, issues, frames = s["status"], [], []
        if status == "ok":
            try:
                for df in self._frames(s):  # a loop, so frames read before an error stay
                    frames.append(df)  # noqa: PERF402
            except Exception as err:  # noqa: BLE001 - counted below, never fatal
                stop = err if isinstance(err, ReadError) else ReadError(
                    f"slice {s['index']} of {s['num_slices']}", err)
                logger.error(f"{s['path']}: reading stopped at {stop}")
                if s["path"].lower().endswith(COMPRESSED_SUFFIXES):
                    frames = [_unverified(df) for df in frames]
                frames.append(_lost_rest(stop))
                status = "cut_short"
        elif status == "unreadable":
            logger.error(f"Cannot read {s['path']}: {s['error']}")
            issues.append({"file": s["path"], "where": "file", "reason": "unreadable_file",
                           "error": s["error"]})
        frames = frames or [_empty_frame()]
        files = {"read": 1} if s["status"] == "ok" else {s["status"]: 1}
        if status == "cut_short":
            files["cut_short"] = 1
        frames = _fit(frames, s["chunks"])
        num_chunks = s["num_chunks"] if s["num_chunks"] is not None else len(frames)
        batches = []
        for i, df in enumerate(frames):
            first = i == 0 and s["index"] == 0
            extra = {"file_formats": {s["fmt"] if status != "unreadable" else "unreadable": 1},
                     "files": files} if first else {}
            batches.append(self._batch(df, s["path"], s["first_chunk"] + i, num_chunks, extra,
                                       issues if i == 0 else [], dataset_name))
        return batches

    def _frames(self, s: dict[str, Any]) -> Iterator[pd.DataFrame]:
        """Reader frames of exactly ``records_per_batch`` records (the last may hold fewer)."""
        n = self.records_per_batch
        if s["fmt"] == "warc":
            rows = islice(iter_warc(s["path"], max_payload_bytes=self.max_payload_bytes,
                                    drop_truncated=self.drop_truncated,
                                    storage_options=self.storage_options, start=s["start"]),
                          s["records"])
            yield from _row_frames((_warc_row(r) for r in rows), n)
        elif s["fmt"] == "jsonl":
            lines = iter_jsonl_lines(s["path"], start=s["start"], first_line=s["first_line"],
                                     max_lines=s["records"], storage_options=self.storage_options)
            rows = (jsonl_row(ln, raw, self.text_field, self.url_field) for ln, raw in lines)
            yield from _row_frames((r for r in rows if r is not None), n)
        else:
            yield from _rebatch(iter_parquet_frames(
                s["path"], row_groups=s["row_groups"], batch_size=n, text_field=self.text_field,
                url_field=self.url_field, storage_options=self.storage_options), n)

    def _batch(self, df: pd.DataFrame, path: str, chunk: int, num_chunks: int, extra: dict,
               issues: list[dict], dataset_name: str) -> DocumentBatch:
        """One output batch of the kept rows; its statistics count every row read."""
        df = df.reset_index(drop=True)
        for col in BASE_COLUMNS:
            if col not in df:
                df[col] = None
        df["source_file"] = path
        reasons = df["_drop"].astype(object)
        reasons = reasons.where(reasons.notna(), None)
        raw_len = df["_raw_len"].fillna(0).astype("int64")
        # Dropped records have no text: describe them in the report's examples instead.
        described = [x if isinstance(x, str) else t if isinstance(t, str) else h
                     if isinstance(h, str) else
                     f"<{c if isinstance(c, str) else 'unknown content type'}, {n} bytes>"
                     for x, t, h, c, n in zip(df["_example"], df["text"], df["html"],
                                              df["content_type"], raw_len)]
        record = stats_from_reasons(self.name, df, reasons, raw_len, raw_len,
                                    max_examples=self.max_examples,
                                    texts_in=pd.Series(described, index=df.index, dtype=object))
        record["extra"], record["docs_edited"] = extra, 0
        bad = df[df["_error"].notna().to_numpy()] if len(df) else df
        record["issues"] = [*issues, *({"file": path, "where": w, "reason": r, "error": e}
                                       for w, r, e in zip(bad["_where"], bad["_drop"],
                                                          bad["_error"]))][:MAX_ISSUES_PER_BATCH]
        record["issues_omitted"] = len(issues) + len(bad) - len(record["issues"])
        kept = df[reasons.isna().to_numpy()].drop(columns=INTERNAL).reset_index(drop=True)
        meta = {"source_files": [path], "source_file": path,
                "shard": f"{shard_key(path)}-{chunk:04d}", "chunk": chunk,
                "num_chunks": num_chunks, STATS_KEY: [record]}
        return DocumentBatch(dataset_name=dataset_name, data=kept, _metadata=meta)


def _warc_row(r: dict[str, Any]) -> dict[str, Any]:
    """A reader row from an :func:`iter_warc` record (its drop reason and position internal)."""
    error = r.pop("error", None)
    r.pop("date", None)
    return {**{k: r[k] for k in BASE_COLUMNS}, "_drop": r["drop"], "_raw_len": r["raw_len"],
            "_error": error, "_where": f"byte {r['offset']}", "_example": None}


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in [*BASE_COLUMNS, *INTERNAL]})


def _row_frames(rows: Iterable[dict[str, Any]], n: int) -> Iterator[pd.DataFrame]:
    """Group a stream of row dicts into frames of ``n`` rows; only one group is held at a time."""
    group: list[dict[str, Any]] = []
    try:
        for row in rows:
            group.append(row)
            if len(group) == n:
                yield pd.DataFrame(group)
                group = []
    except ReadError:
        if group:  # rows read before the error are kept
            yield pd.DataFrame(group)
        raise
    if group:
        yield pd.DataFrame(group)


def _rebatch(frames: Iterable[pd.DataFrame], n: int) -> Iterator[pd.DataFrame]:
    """Re-cut frames of any size into frames of exactly ``n`` rows (the last may hold fewer)."""
    pending: list[pd.DataFrame] = []
    size = 0
    for df in frames:
        pending.append(df)
        size += len(df)
        while size >= n:
            whole = pd.concat(pending, ignore_index=True)
            yield whole.iloc[:n].reset_index(drop=True)
            pending, size = [whole.iloc[n:]], size - n
    if size:
        yield pd.concat(pending, ignore_index=True)


def _lost_rest(err: ReadError) -> pd.DataFrame:
    """One dropped record standing for the unreadable rest of a file."""
    row = {c: None for c in BASE_COLUMNS}
    row.update(_drop="read_error", _raw_len=0, _error=f"{type(err.cause).__name__}: {err.cause}"[:300],
               _where=err.where, _example=None)
    return pd.DataFrame([row])


def _unverified(df: pd.DataFrame) -> pd.DataFrame:
    """Drop the records of a compressed stream that failed: its checksum (gzip's CRC covers a
    whole member) can no longer vouch for them, and a flipped bit would pass as text."""
    df = df.copy()
    df["_drop"] = df["_drop"].where(df["_drop"].notna(), "unverified_stream")
    return df


def _fit(frames: list[pd.DataFrame], want: int | None) -> list[pd.DataFrame]:
    """Exactly ``want`` frames (the planned chunk count): pad with empty ones or merge the tail."""
    if want is None or len(frames) == want:
        return frames
    if len(frames) < want:
        return frames + [_empty_frame() for _ in range(want - len(frames))]
    return [*frames[:want - 1], pd.concat(frames[want - 1:], ignore_index=True)]

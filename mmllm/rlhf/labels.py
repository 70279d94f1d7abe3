"""The label store: pairwise comparisons and their labels in one SQLite file, durable per answer.

One row per comparison (round, prompt, response A, response B); a label (``a``, ``b``, ``tie``,
``skip``) is committed the moment it is given, with ``synchronous=FULL`` so the commit is fsynced:
a labelling server killed with SIGKILL (or a power cut) keeps every answer it acknowledged.
WAL mode lets the web server, an AI judge and a reader (an export, a progress query) work on the
same file at once; each write is one short ``BEGIN IMMEDIATE`` transaction and waits up to
``timeout`` seconds for another writer.

Rules that keep concurrent and repeated answers well defined:

* adding a comparison twice (same round, prompt and unordered pair of responses) is a no-op;
* re-answering with the same label is a no-op (a double click, a retried POST); a different
  label replaces the old one (the labeller changed their mind);
* an AI label never replaces a human one (a judge running beside the page cannot overwrite a
  person), while a human label replaces an AI one;
* every change is also appended to ``events`` (audit trail, and what ``undo`` reads).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

LABELS = ("a", "b", "tie", "skip")
SOURCES = ("human", "ai")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,             -- sha256 of (round, prompt, sorted responses)
    round INTEGER NOT NULL,
    position INTEGER NOT NULL,       -- order of presentation within the round
    prompt TEXT NOT NULL,
    response_a TEXT NOT NULL,
    response_b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', -- JSON: reward-model scores, uncertainty, policy
    label TEXT,                      -- NULL while pending
    labeller TEXT,
    source TEXT,
    rationale TEXT,
    created_at REAL NOT NULL,
    labelled_at REAL
);
CREATE INDEX IF NOT EXISTS comparisons_round ON comparisons (round, position);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    comparison TEXT NOT NULL,
    round INTEGER NOT NULL,
    action TEXT NOT NULL,            -- label | undo
    label TEXT,
    labeller TEXT,
    source TEXT,
    at REAL NOT NULL
);
"""


def comparison_id(round: int, prompt: str, response_a: str, response_b: str) -> str:
    """The id of a comparison: the same pair in either order is the same comparison."""
    blob = json.dumps([round, prompt, *sorted([response_a, response_b])], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Comparison:
    """One row of the store (``label`` is None while pending)."""

    id: str
    round: int
    position: int
    prompt: str
    response_a: str
    response_b: str
    meta: dict
    label: str | None = None
    labeller: str | None = None
    source: str | None = None
    rationale: str | None = None
    created_at: float = 0.0
    labelled_at: float | None = None


_COLUMNS = ("id", "round", "position", "prompt", "response_a", "response_b", "meta", "label",
            "labeller", "source", "rationale", "created_at", "labelled_at")


def _row(values: tuple) -> Comparison:
    row = dict(zip(_COLUMNS, values))
    row["meta"] = json.loads(row["meta"])
    return Comparison(**row)


def _retry_locked(fn, timeout: float):
    """``fn()``, retried while SQLite says "database is locked", for up to ``timeout`` seconds.

    Switching a new file to WAL needs an exclusive lock and SQLite does not wait on the busy
    handler for it: two processes opening a fresh store at once (the round and a labeller) could
    fail at once without this.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class LabelStore:
    """Comparisons and labels in ``path`` (one connection per instance; safe across threads).

    Open one instance per process (or per thread that writes a lot); instances on the same file
    coordinate through SQLite's locks.

    Args:
        path: the database file (parents created).
        timeout: seconds a write waits for another writer's lock before raising.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves (no implicit transactions).
        self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False,
                                   isolation_level=None)
        with self._lock:
            mode = _retry_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0], timeout)
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                                   "the label store needs a local filesystem")
            self._db.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit
            _retry_locked(lambda: self._db.executescript(_SCHEMA), timeout)

    # ----------------------------------------------------------------------------- writes
    def _write(self, fn):
        """Runs ``fn(db)`` in one immediate transaction (committed, hence fsynced, on return)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def add_comparisons(self, round: int, pairs: Iterable[tuple[str, str, str] | tuple[str, str, str, dict]]) -> int:
        """Adds ``(prompt, response_a, response_b[, meta])`` comparisons to ``round``, in order.

        Returns:
            How many were new (ones already in the store, in either order, are kept as they are).
        """
        now = time.time()

        def insert(db) -> int:
            start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM comparisons WHERE round = ?",
                               (round,)).fetchone()[0]
            added = 0
            for p in pairs:
                prompt, a, b, meta = (*p, {}) if len(p) == 3 else p
                if a == b:
                    raise ValueError(f"a comparison of a response with itself (prompt {prompt[:60]!r})")
                cur = db.execute("INSERT OR IGNORE INTO comparisons (id, round, position, prompt, response_a, "
                                 "response_b, meta, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (comparison_id(round, prompt, a, b), round, start + added, prompt, a, b,
                                  json.dumps(meta, ensure_ascii=False), now))
                added += cur.rowcount
            return added

        return self._write(insert)

    def answer(self, comparison: str, label: str, *, labeller: str, source: str = "human",
               rationale: str | None = None) -> bool:
        """Stores a label (committed and fsynced before this returns).

        Returns:
            True when the stored label changed; False for a repeated answer or an AI label on a
            comparison a human already labelled.

        Raises:
            KeyError: no such comparison. ValueError: a bad label or source.
        """
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")

        def update(db) -> bool:
            row = db.execute("SELECT round, label, source FROM comparisons WHERE id = ?",
                             (comparison,)).fetchone()
            if row is None:
                raise KeyError(f"no comparison {comparison!r} in {self.path}")
            rnd, old_label, old_source = row
            if old_label == label and old_source == source:
                return False
            if old_label is not None and old_source == "human" and source == "ai":
                return False
            now = time.time()
            db.execute("UPDATE comparisons SET label = ?, labeller = ?, source = ?, rationale = ?, "
                       "labelled_at = ? WHERE id = ?", (label, labeller, source, rationale, now, comparison))
            db.execute("INSERT INTO events (comparison, round, action, label, labeller, source, at) "
                       "VALUES (?, ?, 'label', ?, ?, ?, ?)", (comparison, rnd, label, labeller, source, now))
            return True

        return self._write(update)

    def undo_last(self, round: int, *, labeller: str) -> str | None:
        """Returns ``labeller``'s most recent still-standing label in ``round`` to pending.

        Returns:
            The id of the comparison made pending again, or None when there is nothing to undo.
        """
        def undo(db) -> str | None:
            row = db.execute("SELECT c.id FROM events e JOIN comparisons c ON c.id = e.comparison "
                             "WHERE e.round = ? AND e.action = 'label' AND e.labeller = ? "
                             "AND c.labeller = ? AND c.label IS NOT NULL ORDER BY e.seq DESC LIMIT 1",
                             (round, labeller, labeller)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE comparisons SET label = NULL, labeller = NULL, source = NULL, "
                       "rationale = NULL, labelled_at = NULL WHERE id = ?", (row[0],))
            db.execute("INSERT INTO events (comparison, round, action, labeller, at) VALUES "
                       "(?, ?, 'undo', ?, ?)", (row[0], round, labeller, time.time()))
            return row[0]

        return self._write(undo)

    # ------------------------------------------------------------------------------ reads
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def comparisons(self, round: int | None = None, *, pending: bool | None = None) -> list[Comparison]:
        """The comparisons of ``round`` (None: all rounds) in presentation order.

        ``pending=True``: only unlabelled ones; ``False``: only labelled ones.
        """
        where, args = [], []
        if round is not None:
            where.append("round = ?")
            args.append(round)
        if pending is not None:
            where.append("label IS NULL" if pending else "label IS NOT NULL")
        sql = f"SELECT {', '.join(_COLUMNS)} FROM comparisons"
        sql += f" WHERE {' AND '.join(where)}" if where else ""
        return [_row(r) for r in self._query(sql + " ORDER BY round, position", tuple(args))]

    def next_pending(self, round: int) -> Comparison | None:
        """The first unlabelled comparison of ``round`` (what the page shows next)."""
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM comparisons WHERE round = ? AND "
                           "label IS NULL ORDER BY position LIMIT 1", (round,))
        return _row(rows[0]) if rows else None

    def get(self, comparison: str) -> Comparison | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM comparisons WHERE id = ?", (comparison,))
        return _row(rows[0]) if rows else None

    def progress(self, round: int) -> tuple[int, int]:
        """``(answered, total)`` comparisons of ``round``."""
        answered, total = self._query("SELECT COUNT(label), COUNT(*) FROM comparisons WHERE round = ?",
                                      (round,))[0]
        return answered, total

    def counts(self, round: int | None = None) -> dict[str, int]:
        """Labels by kind (``a``, ``b``, ``tie``, ``skip``, ``pending``) and by source (``human``, ``ai``)."""
        rows = self._query("SELECT label, source FROM comparisons" + (" WHERE round = ?" if round is not None
                                                                    else ""), () if round is None else (round,))
        out = Counter(label or "pending" for label, _ in rows)
        out.update(source for _, source in rows if source)
        return dict(out)

    def rounds(self) -> list[int]:
        return [r for (r,) in self._query("SELECT DISTINCT round FROM comparisons ORDER BY round")]

    # ----------------------------------------------------------------------------- export
    def iter_preferences(self, rounds: Iterable[int] | None = None) -> Iterator[dict]:
        """``{prompt, chosen, rejected, round, source, labeller}`` of every decisive (a/b) label.

        Ties and skips carry no preference and are left out (see :meth:`counts`).
        """
        wanted = None if rounds is None else set(rounds)
        for c in self.comparisons(pending=False):
            if c.label not in ("a", "b") or (wanted is not None and c.round not in wanted):
                continue
            chosen, rejected = (c.response_a, c.response_b) if c.label == "a" else (c.response_b, c.response_a)
            yield {"prompt": c.prompt, "chosen": chosen, "rejected": rejected, "round": c.round,
                   "source": c.source, "labeller": c.labeller}

    def export_jsonl(self, path: str | Path, rounds: Iterable[int] | None = None) -> int:
        """Writes the merged comparisons of ``rounds`` (None: all) as chosen/rejected JSONL.

        Written to a temporary file, fsynced and renamed: a reader sees the old file or the new one.

        Returns:
            The number of preference pairs written.
        """
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        n = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in self.iter_preferences(rounds):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

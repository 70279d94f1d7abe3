"""An on-disk response cache: SQLite in WAL mode, one committed row per response.

Every response is committed as soon as it arrives, so a run that crashes (or is killed) keeps all
it paid for, and a rerun pays only for what is missing. WAL lets readers (another process
inspecting the cache, a second job) proceed while a writer commits.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def request_key(model: str, messages: Sequence[Mapping], sampling: Mapping) -> str:
    """SHA-256 of the canonical JSON of (model, messages, sampling): equal requests, equal keys.

    ``sampling`` entries set to None are dropped (an unset parameter and None mean the same)."""
    canonical = json.dumps({"model": model, "messages": [dict(m) for m in messages],
                            "sampling": {k: v for k, v in sampling.items() if v is not None}},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """Responses by request key, in a SQLite file (shared by threads of one process).

    Args:
        path: the database file (parents created).
        timeout: seconds a write waits for another process's lock.
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used by every thread in turn
        self._db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a crash
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT "
                             "NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)")
            self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """``{key: response}`` for the keys present."""
        out: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(unique), 500):  # SQLite's bound-parameter limit
                chunk = unique[i:i + 500]
                rows = self._db.execute(f"SELECT key, response FROM responses WHERE key IN "
                                        f"({','.join('?' * len(chunk))})", chunk).fetchall()
                out.update(rows)
        return out

    def get(self, key: str) -> str | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, response: str, *, model: str, request: Mapping) -> None:
        """Stores one response and commits it."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (key, model, json.dumps(request, ensure_ascii=False), response, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""URL dedup across crawl dumps with a persistent on-disk store of seen URLs (SQLite).

Each normalised URL is stored once as a 64-bit xxh3 hash with the dump that first contained it.
A document is removed when its URL was stored by an *earlier* dump, or appeared earlier in the
current dump. Rerunning the same dump is therefore idempotent: its own URLs do not count against
it.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import xxhash

from mmllm.curation.dedup_common import DedupResult

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SQL_CHUNK = 500  # below SQLite's bound-parameter limit


def normalize_url(url: str) -> str:
    """Canonical form: lower-case scheme and host, no default port, no fragment, no trailing slash.

    Args:
        url: Any URL (unparsable ones are returned stripped).
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url
    netloc = host if port in (None, _DEFAULT_PORTS.get(parts.scheme.lower())) else f"{host}:{port}"
    path = parts.path.rstrip("/") if parts.path not in ("", "/") else ""
    return urlunsplit((parts.scheme.lower(), netloc, path, parts.query, ""))


def url_hash(url: str) -> int:
    """Signed 64-bit hash of the normalised URL (SQLite integers are signed)."""
    return int(np.uint64(xxhash.xxh3_64_intdigest(normalize_url(url).encode())).astype(np.int64))


class SeenUrlStore:
    """SQLite table ``seen(h INTEGER PRIMARY KEY, dump TEXT)`` of URL hashes.

    Args:
        path: Database file (created with its parent directory).
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._conn = sqlite3.connect(self.path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS seen (h INTEGER PRIMARY KEY, dump TEXT "
                           "NOT NULL) WITHOUT ROWID")

    def lookup(self, hashes: Sequence[int]) -> dict[int, str]:
        """``{hash: dump}`` for the hashes already stored."""
        found: dict[int, str] = {}
        uniq = list(dict.fromkeys(hashes))
        for i in range(0, len(uniq), _SQL_CHUNK):
            chunk = uniq[i:i + _SQL_CHUNK]
            q = f"SELECT h, dump FROM seen WHERE h IN ({','.join('?' * len(chunk))})"
            found.update(self._conn.execute(q, chunk).fetchall())
        return found

    def add(self, hashes: Sequence[int], dump: str) -> None:
        """Store hashes for ``dump`` (hashes already stored keep their first dump)."""
        with self._conn:
            self._conn.executemany("INSERT OR IGNORE INTO seen (h, dump) VALUES (?, ?)",
                                   ((h, dump) for h in dict.fromkeys(hashes)))

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def default_dump_id(inputs: Sequence[str]) -> str:
    """A dump id derived from the sorted input paths (same inputs -> same dump)."""
    return hashlib.sha1("\n".join(sorted(inputs)).encode()).hexdigest()[:16]


@dataclass(kw_only=True)
class UrlDedup:
    """Global URL dedup against a persistent store shared by crawl dumps.

    Args:
        name: Step name (funnel row).
        store_path: SQLite file; ``None`` puts it in the run's work directory (share one path
            between the runs of successive dumps to dedup across them).
        dump_id: Name of this dump; ``None`` derives it from the input paths.
    """

    name: str = "url_dedup"
    store_path: str | None = None
    dump_id: str | None = None

    def signature_stage(self) -> None:
        return None

    def columns(self) -> list[str]:
        return ["url"]

    def find_duplicates(self, urls: Sequence[str | None], store: SeenUrlStore,
                        dump_id: str) -> DedupResult:
        """Reasons per URL, then record this dump's new URLs in ``store``.

        Args:
            urls: One per document in corpus order (``None`` = no URL, kept).
            store: The seen-URL store.
            dump_id: This dump's name.
        """
        hashes = [url_hash(u) if isinstance(u, str) and u else None for u in urls]
        earlier = store.lookup([h for h in hashes if h is not None])
        first_at: dict[int, int] = {}
        reasons: list[str | None] = []
        dup_of: dict[int, int] = {}
        for i, h in enumerate(hashes):
            if h is None:
                reasons.append(None)
            elif earlier.get(h, dump_id) != dump_id:
                reasons.append("url_seen_in_earlier_dump")
            elif h in first_at:
                reasons.append("duplicate_url")
                dup_of[i] = first_at[h]
            else:
                first_at[h] = i
                reasons.append(None)
        store.add(list(first_at), dump_id)
        hist = Counter(n + 1 for n in Counter(dup_of.values()).values())
        return DedupResult(reasons=reasons, duplicate_of=dup_of, cluster_sizes=dict(hist))

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        path = self.store_path or str(Path(context["work_dir"]) / "seen_urls.sqlite")
        store = SeenUrlStore(path)
        try:
            return self.find_duplicates(corpus.column("url"), store,
                                        self.dump_id or context["dump_id"])
        finally:
            store.close()

"""RefinedWeb-style URL filtering: domain blocklist, weighted-word URL score, curated-source exclusion.

* The blocklist may hold millions of domains (UT1 ships ~4.6 M). It is kept as a sorted ``uint64``
  array of xxh3 hashes (8 bytes per domain instead of ~100 for a Python set) and a whole batch of
  hosts is looked up at once with ``np.searchsorted``; a host matches when it or any parent
  domain is listed (``a.b.example.com`` -> ``b.example.com`` -> ``example.com``).
* The URL score sums the severity weights of listed words found in the URL; a URL whose score
  reaches the threshold is dropped.
* Curated sources (Wikipedia, arXiv, ...) are dropped from the web set because they enter the
  training mixture as their own, cleaner sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import xxhash
from fsspec.core import url_to_fs

from mmllm.curation.base import CurationStage

DEFAULT_BANNED_WORDS: dict[str, float] = {
    # severity 3 = enough alone to reject at the default threshold; 1 = needs company
    "porn": 3, "xxx": 3, "sex": 1, "nude": 2, "escort": 2, "hentai": 3, "viagra": 3, "cialis": 3,
    "casino": 1, "poker": 1, "betting": 1, "slots": 1, "jackpot": 1, "bonus": 0.5, "loan": 0.5,
    "payday": 1, "pills": 1, "cheap": 0.5, "replica": 1, "torrent": 1, "warez": 2, "crack": 1,
}
DEFAULT_EXCLUDED_DOMAINS = ("wikipedia.org", "wikimedia.org", "wikibooks.org", "wikisource.org",
                            "arxiv.org", "ncbi.nlm.nih.gov", "europepmc.org", "gutenberg.org",
                            "stackexchange.com", "stackoverflow.com", "github.com",
                            "opensubtitles.org", "reddit.com")
_TOKEN = re.compile(r"[a-z0-9]+")
# Words this short only match whole URL tokens ("sex" must not hit "essex").
_MIN_SUBSTRING_WORD = 4


def url_host(url: str | None) -> str | None:
    """Lower-case host without port and ``www.``, or ``None`` for unparsable URLs."""
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url if "//" in url else f"//{url}").hostname
    except ValueError:
        return None
    return host.removeprefix("www.") if host else None


def _hash(domain: str) -> int:
    return xxhash.xxh3_64_intdigest(domain.encode("utf-8", "ignore"))


def _parents(host: str) -> list[str]:
    parts = host.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1)] or [host]


class DomainBlocklist:
    """A set of domains stored as sorted 64-bit hashes; membership covers subdomains.

    Args:
        hashes: ``uint64`` xxh3 hashes of the blocked domains (any order, duplicates allowed).
    """

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.unique(np.asarray(hashes, dtype=np.uint64))

    def __len__(self) -> int:
        return int(self.hashes.size)

    @classmethod
    def from_domains(cls, domains: Iterable[str]) -> DomainBlocklist:
        """Build from domain names (``www.`` and case are ignored; blank and ``#`` lines skipped)."""
        return cls(np.fromiter((_hash(d) for d in _clean_domains(domains)), dtype=np.uint64))

    @classmethod
    def from_paths(cls, paths: Sequence[str], categories: Sequence[str] | None = None,
                   storage_options: dict | None = None) -> DomainBlocklist:
        """Load UT1-style lists: each path is a ``domains`` file (one per line) or a directory whose
        ``<category>/domains`` files are read (all categories, or only ``categories``).

        Raises:
            FileNotFoundError: When a path holds no domain list.
        """
        domains: list[str] = []
        for path in paths:
            for f in _list_files(str(path), categories, storage_options or {}):
                fs, p = url_to_fs(f, **(storage_options or {}))
                with fs.open(p, "rt", encoding="utf-8", errors="ignore") as fh:
                    domains.extend(fh.read().splitlines())
        return cls.from_domains(domains)

    def contains(self, host: str | None) -> bool:
        """Whether ``host`` or one of its parent domains is blocked."""
        return bool(self.match([host])[0])

    def match(self, hosts: Sequence[str | None]) -> np.ndarray:
        """Vectorised membership for many hosts.

        Args:
            hosts: Hosts (``None`` never matches).

        Returns:
            Boolean array, one per host.
        """
        owner, cand = [], []
        for i, h in enumerate(hosts):
            if h:
                for d in _parents(h):
                    owner.append(i)
                    cand.append(_hash(d))
        hit = np.zeros(len(hosts), dtype=bool)
        if not cand or not self.hashes.size:
            return hit
        cand_arr = np.asarray(cand, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self.hashes, cand_arr), self.hashes.size - 1)
        found = self.hashes[pos] == cand_arr
        hit[np.asarray(owner)[found]] = True
        return hit


def _clean_domains(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        d = line.strip().lower()
        if d and not d.startswith("#"):
            yield d.removeprefix("www.")


def _list_files(path: str, categories: Sequence[str] | None, storage_options: dict) -> list[str]:
    fs, p = url_to_fs(path, **storage_options)
    if fs.isfile(p):
        return [path]
    if not fs.isdir(p):
        msg = f"Blocklist path {path!r} does not exist"
        raise FileNotFoundError(msg)
    files = sorted(fs.glob(f"{p.rstrip('/')}/**/domains"))
    if categories is not None:
        files = [f for f in files if Path(f).parent.name in set(categories)]
    if not files:
        msg = f"No '<category>/domains' files under {path!r} (categories={categories})"
        raise FileNotFoundError(msg)
    return [fs.unstrip_protocol(f) if "://" in path else f for f in files]


class UrlScorer:
    """Score a URL by the severity weights of the listed words it contains.

    Args:
        words: ``{word: weight}``; words of 4+ letters also match inside URL tokens
            (``freeporn``), shorter ones only as whole tokens.
    """

    def __init__(self, words: dict[str, float]) -> None:
        self.exact = {w.lower(): float(s) for w, s in words.items() if len(w) < _MIN_SUBSTRING_WORD}
        self.sub = {w.lower(): float(s) for w, s in words.items() if len(w) >= _MIN_SUBSTRING_WORD}

    @staticmethod
    def read_word_list(path: str) -> dict[str, float]:
        """Read ``word [weight]`` lines (weight defaults to 1; ``#`` comments allowed)."""
        fs, p = url_to_fs(path)
        out: dict[str, float] = {}
        with fs.open(p, "rt", encoding="utf-8") as fh:
            for line in fh:
                parts = line.split("#", 1)[0].split()
                if parts:
                    out[parts[0].lower()] = float(parts[1]) if len(parts) > 1 else 1.0
        return out

    def score(self, url: str) -> float:
        """Sum of weights over word occurrences in the URL (case-insensitive)."""
        tokens = _TOKEN.findall(url.lower())
        total = sum(self.exact.get(t, 0.0) for t in tokens)
        for word, weight in self.sub.items():
            total += weight * sum(t.count(word) for t in tokens)
        return total


@lru_cache(maxsize=4)
def _cached_blocklist(paths: tuple[str, ...], categories: tuple[str, ...] | None,
                      domains: tuple[str, ...]) -> DomainBlocklist:
    # Once per worker process: loading millions of domains per batch would dominate the stage.
    hashes = [DomainBlocklist.from_domains(domains).hashes]
    if paths:
        hashes.append(DomainBlocklist.from_paths(paths, categories).hashes)
    return DomainBlocklist(np.concatenate(hashes))


@dataclass(kw_only=True)
class UrlFilterStage(CurationStage):
    """Drop documents by URL: blocklisted domain, URL word score, or curated source.

    Args:
        name: Stage name.
        url_field: Column with the URL (documents without one are kept).
        blocklist_paths: UT1-style directories or plain domain-list files.
        blocklist_categories: UT1 categories to load from directories (``None`` = all).
        blocked_domains: Extra domains to block.
        banned_words: ``{word: severity weight}`` for the URL score.
        banned_words_path: Optional file of ``word weight`` lines, merged over ``banned_words``.
        url_score_threshold: URLs scoring at least this are dropped.
        excluded_domains: Curated sources kept out of the web set (subdomains included).
    """

    name: str = "url_filter"
    url_field: str = "url"
    blocklist_paths: list[str] = field(default_factory=list)
    blocklist_categories: list[str] | None = None
    blocked_domains: list[str] = field(default_factory=list)
    banned_words: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BANNED_WORDS))
    banned_words_path: str | None = None
    url_score_threshold: float = 3.0
    excluded_domains: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_DOMAINS))

    def __post_init__(self) -> None:
        if self.url_score_threshold <= 0:
            msg = f"url_score_threshold must be positive, got {self.url_score_threshold}"
            raise ValueError(msg)
        words = dict(self.banned_words)
        if self.banned_words_path:
            words.update(UrlScorer.read_word_list(self.banned_words_path))
        self._scorer = UrlScorer(words)
        self._excluded = DomainBlocklist.from_domains(self.excluded_domains)

    def required_columns(self) -> list[str]:
        return [self.url_field]

    @property
    def blocklist(self) -> DomainBlocklist:
        """The (per-process cached) domain blocklist."""
        cats = tuple(self.blocklist_categories) if self.blocklist_categories is not None else None
        return _cached_blocklist(tuple(map(str, self.blocklist_paths)), cats,
                                 tuple(self.blocked_domains))

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        urls = df[self.url_field].tolist()
        hosts = [url_host(u) for u in urls]
        blocked = self.blocklist.match(hosts)
        curated = self._excluded.match(hosts)
        reasons = []
        for url, is_blocked, is_curated in zip(urls, blocked, curated):
            if not isinstance(url, str) or not url:
                reasons.append(None)
            elif is_blocked:
                reasons.append("blocklisted_domain")
            elif self._scorer.score(url) >= self.url_score_threshold:
                reasons.append("url_score")
            elif is_curated:
                reasons.append("curated_source")
            else:
                reasons.append(None)
        return pd.Series(reasons, index=df.index, dtype=object)

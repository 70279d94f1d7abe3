"""Exact-substring dedup (Lee et al., 2022): suffix array over the tokenised corpus.

Every span of at least ``min_tokens`` tokens (default 50) that occurs earlier in the corpus is
cut out; the first occurrence stays. Documents are tokenised into words and punctuation; each
document ends with a unique separator so no match crosses a document boundary. The suffix array
and LCP come from pydivsufsort; adjacent suffixes sharing ``>= min_tokens`` tokens form groups
whose earliest position is kept and whose other positions start a duplicated window.

Memory is bounded by sharding: documents are split into consecutive groups of at most
``max_chars_per_shard`` characters, and group ``b`` is checked against itself and then against
every earlier group ``a`` with one suffix array over ``a + b`` (so at most two groups are in
memory; cost grows with the square of the number of groups).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydivsufsort import divsufsort, kasai
from tqdm.auto import tqdm

from mmllm.curation.dedup_common import DedupResult

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACES = re.compile(r"[ \t]{2,}")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")


def tokenize(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Word/punctuation tokens as 64-bit hashes with their character spans.

    Returns:
        ``(hashes, starts, ends)`` as uint64, int64, int64 arrays.
    """
    matches = list(_TOKEN.finditer(text))
    # Python's str hash is stable within a process, and the whole step runs in one process.
    hashes = np.fromiter((hash(m.group()) for m in matches), dtype=np.int64, count=len(matches))
    se = np.fromiter((x for m in matches for x in m.span()), dtype=np.int64,
                     count=2 * len(matches)).reshape(-1, 2)
    return hashes.view(np.uint64), se[:, 0], se[:, 1]


def duplicated_tokens(token_docs: Sequence[np.ndarray], target_from: int, min_tokens: int,
                      ) -> list[np.ndarray]:
    """Mark tokens of documents ``target_from..`` that repeat an earlier span of ``min_tokens``.

    Args:
        token_docs: Token hashes per document, in corpus order.
        target_from: Index of the first document whose duplicates are marked (earlier documents
            only serve as references).
        min_tokens: Minimum duplicated span length.

    Returns:
        One boolean array per target document.
    """
    lens = np.array([t.size for t in token_docs], dtype=np.int64)
    uniq, inv = np.unique(np.concatenate(token_docs) if len(token_docs) else np.empty(0, np.uint64),
                          return_inverse=True)
    # Sequence = doc0 sep0 doc1 sep1 ... with unique separator ids above the vocabulary.
    starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    seq = np.empty(int(lens.sum() + lens.size), dtype=np.int64)
    is_tok = np.ones(seq.size, dtype=bool)
    is_tok[starts + lens] = False
    seq[is_tok] = inv
    seq[~is_tok] = uniq.size + np.arange(lens.size)
    covered = _covered_positions(seq, min_tokens, int(starts[target_from]) if lens.size else 0)
    return [covered[s:s + n] for s, n in zip(starts[target_from:], lens[target_from:])]


def _covered_positions(seq: np.ndarray, min_tokens: int, target_start: int) -> np.ndarray:
    if seq.size < 2:
        return np.zeros(seq.size, dtype=bool)
    sa = divsufsort(seq).astype(np.int64)
    lcp = kasai(seq, sa).astype(np.int64)  # lcp[i] = common prefix of sa[i] and sa[i + 1]
    linked = lcp[:-1] >= min_tokens
    group = np.concatenate([[0], np.cumsum(~linked)])
    size = np.bincount(group)
    first = np.flatnonzero(np.concatenate([[True], ~linked]))
    earliest = np.minimum.reduceat(sa, first)[group]
    dup_start = sa[(size[group] >= 2) & (sa != earliest) & (sa >= target_start)]
    diff = np.zeros(seq.size + 1, dtype=np.int64)
    np.add.at(diff, dup_start, 1)
    np.add.at(diff, np.minimum(dup_start + min_tokens, seq.size), -1)
    return np.cumsum(diff)[:-1] > 0


def cut_spans(text: str, covered: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> str:
    """Remove the characters of runs of covered tokens and tidy the whitespace left behind."""
    if not covered.any():
        return text
    edges = np.diff(np.concatenate([[0], covered.astype(np.int8), [0]]))
    run_start, run_end = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    pieces, pos = [], 0
    for a, b in zip(starts[run_start], ends[run_end]):
        pieces.append(text[pos:a])
        pos = b
    pieces.append(text[pos:])
    out = _SPACES.sub(" ", "".join(pieces))
    out = "\n".join(line.strip() for line in out.split("\n"))
    return _BLANK_LINES.sub("\n\n", out).strip()


@dataclass(kw_only=True)
class SubstringDedup:
    """Global exact-substring dedup (Lee et al.): cut repeated spans, keep first occurrences.

    Args:
        name: Step name (funnel row).
        min_tokens: Minimum length of a removed span, in word/punctuation tokens.
        max_chars_per_shard: Characters per suffix-array shard (bounds memory, ~30 bytes/token).
        min_words_after: Documents left with fewer words are dropped.
    """

    name: str = "substring_dedup"
    min_tokens: int = 50
    max_chars_per_shard: int = 100_000_000
    min_words_after: int = 50

    def __post_init__(self) -> None:
        if self.min_tokens < 2 or self.max_chars_per_shard < 1:
            msg = f"{self.name}: min_tokens must be >= 2 and max_chars_per_shard >= 1"
            raise ValueError(msg)

    def signature_stage(self) -> None:
        return None

    def columns(self) -> list[str]:
        return ["_chars"]

    def deduplicate_texts(self, texts: Sequence[str]) -> DedupResult:
        """Use the step alone on a list of texts (one shard)."""
        return self._apply([list(range(len(texts)))], lambda idx: [texts[i] for i in idx])

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        chars = np.asarray(corpus.column("_chars"), dtype=np.int64)
        groups, cur, size = [], [], 0
        for i, n in enumerate(chars):
            if cur and size + n > self.max_chars_per_shard:
                groups.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += int(n)
        if cur:
            groups.append(cur)
        return self._apply(groups, corpus.texts)

    def _apply(self, groups: list[list[int]], load: Any) -> DedupResult:
        n_docs = sum(len(g) for g in groups)
        reasons: list[str | None] = [None] * n_docs
        edits: dict[int, str] = {}
        for b, group in enumerate(tqdm(groups, desc="substring dedup", disable=len(groups) < 2)):
            own = load(group)
            toks = [tokenize(t) for t in own]
            covered = [np.zeros(h.size, dtype=bool) for h, _, _ in toks]
            for a in range(b + 1):  # a == b: within the shard; a < b: against an earlier shard
                ref = [] if a == b else [tokenize(t)[0] for t in load(groups[a])]
                marks = duplicated_tokens(ref + [h for h, _, _ in toks], len(ref), self.min_tokens)
                covered = [c | m for c, m in zip(covered, marks)]
            for doc, text, (_, s, e), cov in zip(group, own, toks, covered):
                if cov.any():
                    new = cut_spans(text, cov, s, e)
                    edits[doc] = new
                    if len(new.split()) < self.min_words_after:
                        reasons[doc] = "substring_dedup_too_short"
        return DedupResult(reasons=reasons, edits=edits,
                           cluster_sizes={})

"""Exact-substring dedup (Lee et al., 2022) in near-linear time and bounded memory.

Every span of at least ``min_tokens`` (L) word/punctuation tokens that occurs earlier in the
corpus is cut out; the first occurrence stays. A span of >= L tokens repeats exactly when each
of its windows of L consecutive tokens repeats, so the step works on windows:

1. **hash** (documents in groups of at most ``max_chars_per_shard`` characters): tokenise, give
   every window of L tokens inside one document a 128-bit rolling hash (two 64-bit polynomial
   hashes over mixed token hashes) and append ``(h1, h2, global token position)`` to one of P
   partition files on disk, chosen by the hash. Equal windows land in the same partition.
2. **find** (one partition at a time): a stable sort by hash puts equal windows next to each other
   in corpus order; every window equal to its predecessor is a later occurrence, and its start is
   flagged in a disk-backed byte map over all token positions.
3. **cut** (groups again): a token is covered when a flagged window covers it; covered runs are
   removed from the text.

This is exactly the suffix-array formulation (suffixes sharing >= L tokens = equal L-windows,
earliest kept; the tests check parity with a pydivsufsort suffix array) without its cost: time is
O(N) for hashing plus a sort of N/P records per partition, and memory is one group plus one
partition (P grows with the input). Windows never cross documents, so no separators are needed.
Two distinct windows collide on all 128 bits with probability about 2**-128 per pair.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mmllm.curation.dedup_common import DedupResult, mix64

_TOKEN = re.compile(r"\w+|[^\w\s]")
_SPACES = re.compile(r"[ \t]{2,}")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_RECORD = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("pos", "<i8")])  # 24 bytes per window
_BASES = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)  # odd, so invertible modulo 2**64
_MASK64 = (1 << 64) - 1


def token_hashes(text: str) -> np.ndarray:
    """64-bit hashes of the word/punctuation tokens of ``text`` (uint64)."""
    # Python's str hash is stable within a process, and the whole step runs in one process.
    toks = _TOKEN.findall(text)
    return np.fromiter(map(hash, toks), dtype=np.int64, count=len(toks)).view(np.uint64)


def tokenize(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token hashes (as :func:`token_hashes`) with their character spans.

    Returns:
        ``(hashes, starts, ends)`` as uint64, int64, int64 arrays.
    """
    matches = list(_TOKEN.finditer(text))
    hashes = np.fromiter((hash(m.group()) for m in matches), dtype=np.int64, count=len(matches))
    se = np.fromiter((x for m in matches for x in m.span()), dtype=np.int64,
                     count=2 * len(matches)).reshape(-1, 2)
    return hashes.view(np.uint64), se[:, 0], se[:, 1]


def _powers(base: int, n: int) -> np.ndarray:
    """``base**0 .. base**(n-1)`` modulo 2**64 (uint64 arithmetic wraps)."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


def window_hashes(tokens: np.ndarray, lens: np.ndarray, width: int,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """128-bit hashes of every window of ``width`` tokens that lies inside one document.

    Args:
        tokens: ``(N,)`` uint64 token hashes of consecutive documents, concatenated.
        lens: ``(D,)`` token count of each document.
        width: Window length L.

    Returns:
        ``(h1, h2, pos)``: two uint64 hashes and the int64 start (index into ``tokens``) of each
        window, in position order.
    """
    n = tokens.size
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    # Window p is valid when p + width <= end of its document.
    ok = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ok, starts, 1)
    np.add.at(ok, np.maximum(starts + lens - width + 1, starts), -1)
    pos = np.flatnonzero(np.cumsum(ok[:n]) > 0)
    if pos.size == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint64), pos
    t = mix64(tokens)  # spread arbitrary token values over all 64 bits
    out = []
    for base in _BASES:
        inverse = pow(base, -1, 1 << 64)
        with np.errstate(over="ignore"):
            prefix = np.zeros(n + 1, dtype=np.uint64)  # prefix[i] = sum_{j<i} t_j base**j
            np.cumsum(t * _powers(base, n), dtype=np.uint64, out=prefix[1:])
            # sum_{k<L} t_{p+k} base**k = (prefix[p+L] - prefix[p]) * base**-p
            h = (prefix[pos + width] - prefix[pos]) * _powers(inverse, n)[pos]
        out.append(mix64(h))
    return out[0], out[1], pos


def later_occurrences(records: np.ndarray) -> np.ndarray:
    """Positions of windows equal to an earlier window.

    Args:
        records: ``_RECORD`` array in ascending ``pos`` order.

    Returns:
        int64 starts of every occurrence but the first of each hash.
    """
    if records.size < 2:
        return np.empty(0, np.int64)
    order = np.lexsort((records["h2"], records["h1"]))  # stable: equal keys stay in pos order
    r = records[order]
    same = (r["h1"][1:] == r["h1"][:-1]) & (r["h2"][1:] == r["h2"][:-1])
    return r["pos"][1:][same]


def covered_tokens(dup_start: np.ndarray, width: int) -> np.ndarray:
    """Tokens covered by a flagged window (``dup_start[p]`` flags window ``p..p+width-1``)."""
    n = dup_start.size
    diff = np.zeros(n + width + 1, dtype=np.int32)
    starts = np.flatnonzero(dup_start)
    diff[starts] += 1
    diff[starts + width] -= 1
    return np.cumsum(diff[:n]) > 0


def duplicated_tokens(token_docs: Sequence[np.ndarray], min_tokens: int) -> list[np.ndarray]:
    """In memory: mark tokens that belong to a span of ``min_tokens`` seen earlier.

    Args:
        token_docs: Token hashes per document, in corpus order.
        min_tokens: Minimum duplicated span length.

    Returns:
        One boolean array per document.
    """
    lens = np.array([t.size for t in token_docs], dtype=np.int64)
    tokens = np.concatenate(token_docs) if len(token_docs) else np.empty(0, np.uint64)
    h1, h2, pos = window_hashes(tokens.astype(np.uint64), lens, min_tokens)
    rec = np.empty(pos.size, dtype=_RECORD)
    rec["h1"], rec["h2"], rec["pos"] = h1, h2, pos
    flags = np.zeros(tokens.size, dtype=bool)
    flags[later_occurrences(rec)] = True
    covered = covered_tokens(flags, min_tokens)
    return np.split(covered, np.cumsum(lens)[:-1]) if lens.size else []


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
        max_chars_per_shard: Characters of text hashed or cut at once (bounds memory: about
            25 bytes per character at the peak of the hash pass; 27 MiB traced for 1 MB groups
            and 200k-window partitions in ``benchmarks/curation_scaling.py``, flat from 1x to
            8x input).
        max_windows_per_partition: Target windows per partition (24 bytes each on disk; sorting
            a partition peaks at about 3x that in memory). The partition count is derived from
            the corpus size; a partition that still comes out over twice this is split again.
        min_words_after: Documents left with fewer words are dropped.
        scratch_dir: Local directory for the partition files and the flag map (``None`` = the
            run's work directory when local, else the system temp directory).
    """

    name: str = "substring_dedup"
    min_tokens: int = 50
    max_chars_per_shard: int = 20_000_000
    max_windows_per_partition: int = 10_000_000
    min_words_after: int = 50
    scratch_dir: str | None = None

    def __post_init__(self) -> None:
        if self.min_tokens < 2 or min(self.max_chars_per_shard,
                                      self.max_windows_per_partition) < 1:
            msg = (f"{self.name}: min_tokens must be >= 2, max_chars_per_shard and "
                   "max_windows_per_partition >= 1")
            raise ValueError(msg)

    def signature_stage(self) -> None:
        return None

    def columns(self) -> list[str]:
        return ["_chars"]

    def deduplicate_texts(self, texts: Sequence[str]) -> DedupResult:
        """Use the step alone on a list of texts."""
        return self._dedup([len(t) for t in texts], lambda idx: [texts[i] for i in idx], None)

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        work = str(context.get("work_dir") or "")
        local = work if work and "://" not in work else None
        return self._dedup(corpus.column("_chars"), corpus.texts, local)

    def _dedup(self, chars: Sequence[int], load: Callable[[list[int]], list[str]],
               work_dir: str | None) -> DedupResult:
        chars = np.asarray(chars, dtype=np.int64)
        groups, cur, size = [], [], 0
        for i, n in enumerate(chars.tolist()):
            if cur and size + n > self.max_chars_per_shard:
                groups.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            groups.append(cur)
        parent = self.scratch_dir or work_dir
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        # ~4.5 characters per token in English prose; a denser corpus only makes partitions larger
        # and those are split again in the find pass.
        parts = max(1, math.ceil(int(chars.sum()) / 4 / self.max_windows_per_partition))
        with tempfile.TemporaryDirectory(prefix="substring-dedup-", dir=parent) as tmp:
            lens = self._hash_pass(groups, load, Path(tmp), parts)
            flags = self._find_pass(Path(tmp), parts, int(lens.sum()))
            return self._cut_pass(groups, load, lens, flags)

    def _hash_pass(self, groups: list[list[int]], load: Callable, tmp: Path, parts: int,
                   ) -> np.ndarray:
        """Append every window's record to its partition file; returns tokens per document."""
        lens, offset = [], 0
        files = [open(tmp / f"part{p}.bin", "wb") for p in range(parts)]  # noqa: SIM115
        try:
            for group in tqdm(groups, desc="substring dedup: hash", disable=len(groups) < 2):
                toks = [token_hashes(t) for t in load(group)]
                n = np.array([t.size for t in toks], dtype=np.int64)
                h1, h2, pos = window_hashes(np.concatenate(toks), n, self.min_tokens)
                rec = np.empty(pos.size, dtype=_RECORD)
                rec["h1"], rec["h2"], rec["pos"] = h1, h2, pos + offset
                part = (h1 >> np.uint64(40)) % np.uint64(parts)
                order = np.argsort(part, kind="stable")  # keeps position order per partition
                bounds = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
                for p in range(parts):
                    rec[order[bounds[p]:bounds[p + 1]]].tofile(files[p])
                lens.append(n)
                offset += int(n.sum())
        finally:
            for f in files:
                f.close()
        return np.concatenate(lens) if lens else np.empty(0, np.int64)

    def _find_pass(self, tmp: Path, parts: int, n_tokens: int) -> np.ndarray:
        """Flag the start of every later occurrence in a disk-backed byte map over the tokens."""
        flags = np.memmap(tmp / "flags.u8", dtype=np.uint8, mode="w+", shape=(max(n_tokens, 1),))
        pending = [(tmp / f"part{p}.bin", 0) for p in range(parts)]
        for path, depth in tqdm(pending, desc="substring dedup: find", disable=parts < 2):
            size = path.stat().st_size // _RECORD.itemsize
            if size > 2 * self.max_windows_per_partition and depth < 6:
                # Identical windows cannot be split apart: a partition of one huge cluster
                # stops splitting after a few rounds and is sorted as it is.
                pending.extend((p, depth + 1) for p in self._split(path, size, depth))
                continue  # the loop reaches the new pieces
            flags[later_occurrences(np.fromfile(path, dtype=_RECORD))] = 1
            path.unlink()
        flags.flush()
        return flags

    def _split(self, path: Path, size: int, depth: int) -> list[Path]:
        """Stream an oversized partition into pieces by other hash bits (order is kept)."""
        k = math.ceil(size / self.max_windows_per_partition)
        rec = np.memmap(path, dtype=_RECORD, mode="r")
        out = [path.with_name(f"{path.stem}.{depth}.{j}.bin") for j in range(k)]
        files = [open(p, "wb") for p in out]  # noqa: SIM115
        try:
            for lo in range(0, size, self.max_windows_per_partition):
                chunk = np.asarray(rec[lo:lo + self.max_windows_per_partition])
                sub = (chunk["h2"] >> np.uint64(8 * depth)) % np.uint64(k)
                for j in range(k):
                    chunk[sub == j].tofile(files[j])
        finally:
            for f in files:
                f.close()
        del rec
        path.unlink()
        return out

    def _cut_pass(self, groups: list[list[int]], load: Callable, lens: np.ndarray,
                  flags: np.ndarray) -> DedupResult:
        reasons: list[str | None] = [None] * lens.size
        edits: dict[int, str] = {}
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        for group in tqdm(groups, desc="substring dedup: cut", disable=len(groups) < 2):
            lo, hi = int(starts[group[0]]), int(starts[group[-1] + 1])
            covered = covered_tokens(np.asarray(flags[lo:hi]).astype(bool), self.min_tokens)
            hit = [d for d in group if covered[starts[d] - lo:starts[d + 1] - lo].any()]
            for d, text in zip(hit, load(hit) if hit else []):
                h, s, e = tokenize(text)
                if h.size != lens[d]:
                    msg = f"{self.name}: document {d} tokenised differently on the second pass"
                    raise RuntimeError(msg)
                edits[d] = new = cut_spans(text, covered[starts[d] - lo:starts[d + 1] - lo], s, e)
                if len(new.split()) < self.min_words_after:
                    reasons[d] = "substring_dedup_too_short"
        return DedupResult(reasons=reasons, edits=edits)

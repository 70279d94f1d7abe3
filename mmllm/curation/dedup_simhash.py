"""Fuzzy dedup with SimHash (Charikar, 2002) and permuted-table lookup (Manku et al., 2007).

* **Fingerprint**: the document's features are its word shingles (default: single words; the
  normalisation and 64-bit shingle hashes of :mod:`mmllm.curation.dedup_minhash`), each weighted
  by ``1 + log(count)`` (or its count, or 1). Bit ``b`` of the 64-bit SimHash is set when the
  weighted vote ``sum(w * (+1 if bit b of the feature hash else -1))`` is positive. Similar
  documents get fingerprints that differ in few bits (on Wikipedia articles with 0-4 % of
  words edited, 95 % of the copies are within 6 bits while unrelated articles are 13 or more
  apart; longer shingles make fingerprints more sensitive to edits).
* **Candidates**: fingerprints within Hamming distance ``k`` agree exactly on at least ``m - k``
  of ``m`` bit blocks (pigeonhole), so for each of the ``C(m, k)`` choices of ``m - k`` blocks the
  fingerprints are sorted by those bits and equal keys form candidate pairs, which are kept when
  ``popcount(a ^ b) <= k``. More blocks mean longer keys (fewer chance candidates) and more
  tables: the default ``k=6, m=10`` uses 210 tables with ~26-bit keys, so chance candidates
  stay rare up to ~10M documents per run (``k=3, m=6``, Manku's setting, needs only 20).
* **Clusters**: accepted pairs are merged by connected components (what union-find computes) and
  the first document of each cluster is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import Any, Literal

import numpy as np
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mmllm.curation.dedup_common import DedupResult, cluster_histogram, keep_first
from mmllm.curation.dedup_minhash import MinHasher

Weighting = Literal["log_tf", "tf", "binary"]
_ROWS_PER_BLOCK = 1 << 16  # features per vote block: 65k x 64 x 4 B = 16 MiB


def feature_bits(hashes: np.ndarray) -> np.ndarray:
    """``(n, 64)`` uint8 bits of uint64 hashes; column ``b`` is bit ``b`` (LSB first)."""
    as_bytes = np.ascontiguousarray(hashes, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")


def simhash_from_features(hashes: np.ndarray, weights: np.ndarray) -> np.uint64:
    """SimHash of one document's weighted features (a vote of ``+w``/``-w`` per bit, > 0 sets it).

    Args:
        hashes: uint64 feature hashes.
        weights: One positive weight per feature.

    Returns:
        The 64-bit fingerprint (0 for a document without features).
    """
    if hashes.size == 0:
        return np.uint64(0)
    votes = np.asarray(weights, dtype=np.float64) @ (2.0 * feature_bits(hashes) - 1.0)
    return np.packbits(votes > 0, bitorder="little").view("<u8")[0]


class SimHasher:
    """64-bit SimHash fingerprints of documents.

    Args:
        ngram_size: Words per shingle.
        char_ngrams: Character shingles instead of word shingles.
        weighting: Feature weight: ``"log_tf"`` (1 + log count), ``"tf"`` (count) or ``"binary"``.
        seed: Seed of the shingle hashes.
    """

    def __init__(self, *, ngram_size: int = 1, char_ngrams: bool = False,
                 weighting: Weighting = "log_tf", seed: int = 42) -> None:
        if weighting not in ("log_tf", "tf", "binary"):
            msg = f"weighting must be log_tf, tf or binary, got {weighting!r}"
            raise ValueError(msg)
        self.weighting = weighting
        # Same normalisation and shingle hashing as MinHash (no permutations are used).
        self._shingler = MinHasher(num_perm=1, ngram_size=ngram_size, char_ngrams=char_ngrams,
                                   seed=seed, backend="numpy")

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(unique feature hashes, weights)`` of one document."""
        h, counts = np.unique(self._shingler.shingle_hashes(text, unique=False), return_counts=True)
        if self.weighting == "log_tf":
            return h, 1.0 + np.log(counts)
        return h, counts.astype(np.float64) if self.weighting == "tf" else np.ones(h.size)

    def fingerprints(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts),)`` uint64 fingerprints, computed in blocks of features."""
        feats = [self.features(t) for t in texts]
        out = np.zeros(len(texts), dtype=np.uint64)
        start = 0
        while start < len(feats):
            stop, rows = start, 0
            while stop < len(feats) and (rows == 0
                                         or rows + feats[stop][0].size <= _ROWS_PER_BLOCK):
                rows += feats[stop][0].size
                stop += 1
            docs = [i for i in range(start, stop) if feats[i][0].size]
            if docs:
                h = np.concatenate([feats[i][0] for i in docs])
                w = np.concatenate([feats[i][1] for i in docs]).astype(np.float32)
                signed = (2 * feature_bits(h).astype(np.int8) - 1).astype(np.float32) * w[:, None]
                offsets = np.cumsum([0] + [feats[i][0].size for i in docs[:-1]])
                votes = np.add.reduceat(signed, offsets, axis=0)  # (docs, 64)
                out[docs] = np.packbits(votes > 0, axis=1, bitorder="little").view("<u8")[:, 0]
            start = stop
        return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return feature_bits(x).sum(axis=1, dtype=np.int64)


def _block_masks(blocks: int) -> list[np.uint64]:
    edges = np.linspace(0, 64, blocks + 1).round().astype(int)
    return [np.uint64(((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1)) for lo, hi in pairwise(edges)]


def _bucket_pairs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of indexes whose ``key`` is equal (every pair of each bucket)."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    src, dst = [], []
    live = np.arange(k.size - 1)
    d = 1
    while live.size:  # offset d pairs position i with i + d inside the same bucket
        live = live[(live + d < k.size)]
        live = live[k[live + d] == k[live]]
        src.append(order[live])
        dst.append(order[live + d])
        d += 1
    if not src:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(src), np.concatenate(dst)


def simhash_clusters(fp: np.ndarray, *, max_distance: int = 6, blocks: int = 10,
                     ) -> tuple[np.ndarray, int]:
    """Cluster fingerprints within ``max_distance`` bits of each other (transitively).

    Args:
        fp: ``(n,)`` uint64 fingerprints.
        max_distance: Largest Hamming distance of a linked pair (k).
        blocks: Bit blocks (m > k); ``C(m, k)`` tables with keys of ``m - k`` blocks.

    Returns:
        ``(labels, n_pairs)``: a cluster label per document and the number of linked pairs.
    """
    if not 0 <= max_distance < blocks <= 64:
        msg = f"need 0 <= max_distance < blocks <= 64, got {max_distance}, {blocks}"
        raise ValueError(msg)
    fp = np.asarray(fp, dtype=np.uint64)
    n = fp.size
    # Identical fingerprints join through their first holder; the tables see each value once.
    uniq, first, inverse = np.unique(fp, return_index=True, return_inverse=True)
    src, dst = [np.arange(n)], [first[inverse]]
    masks = _block_masks(blocks)
    for keep in combinations(range(blocks), blocks - max_distance):
        mask = np.bitwise_or.reduce(np.array([masks[i] for i in keep], dtype=np.uint64))
        a, b = _bucket_pairs(uniq & mask)
        ok = hamming(uniq[a], uniq[b]) <= max_distance
        src.append(first[a[ok]])
        dst.append(first[b[ok]])
    a, b = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    linked = a != b
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)])[:, linked], axis=1)
    return labels, int(pairs.shape[1])


@dataclass(kw_only=True)
class SimHashStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Pipeline-pass half of SimHash dedup: add each document's fingerprint (as int64).

    Args:
        name: Stage name.
        text_field: Text column.
        fingerprint_field: Output column.
        ngram_size: Words (or characters) per shingle.
        char_ngrams: Character shingles instead of word shingles.
        weighting: Feature weighting (see :class:`SimHasher`).
        seed: Shingle hash seed.
    """

    name: str = "simhash_fingerprint"
    text_field: str = "text"
    fingerprint_field: str = "_simhash"
    ngram_size: int = 1
    char_ngrams: bool = False
    weighting: Weighting = "log_tf"
    seed: int = 42

    def __post_init__(self) -> None:
        self._hasher = SimHasher(ngram_size=self.ngram_size, char_ngrams=self.char_ngrams,
                                 weighting=self.weighting, seed=self.seed)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field, self.fingerprint_field]

    def ray_stage_spec(self) -> dict[str, Any]:
        return {RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        df = batch.to_pandas().copy()
        # Parquet has no uint64 column type in every reader; the bits travel as int64.
        df[self.fingerprint_field] = self._hasher.fingerprints(df[self.text_field].tolist()
                                                                ).view(np.int64)
        return DocumentBatch(dataset_name=batch.dataset_name, data=df, _metadata=batch._metadata,
                             _stage_perf=batch._stage_perf)


@dataclass(kw_only=True)
class SimHashDedup:
    """Global SimHash near-duplicate removal (keeps the first document of each cluster).

    Args:
        name: Step name (funnel row).
        ngram_size: Words (or characters) per shingle.
        char_ngrams: Character shingles instead of word shingles.
        weighting: ``"log_tf"``, ``"tf"`` or ``"binary"`` feature weights.
        max_distance: Largest Hamming distance between near-duplicates (k).
        blocks: Bit blocks of the permuted tables (m > k; ``C(m, k)`` tables).
        seed: Shingle hash seed.
        text_field: Text column.
    """

    name: str = "simhash_dedup"
    ngram_size: int = 1
    char_ngrams: bool = False
    weighting: Weighting = "log_tf"
    max_distance: int = 6
    blocks: int = 10
    seed: int = 42
    text_field: str = "text"

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < self.blocks <= 64:
            msg = (f"{self.name}: need 0 <= max_distance < blocks <= 64, got "
                   f"{self.max_distance}, {self.blocks}")
            raise ValueError(msg)

    def signature_stage(self) -> SimHashStage:
        return SimHashStage(text_field=self.text_field, ngram_size=self.ngram_size,
                            char_ngrams=self.char_ngrams, weighting=self.weighting, seed=self.seed)

    def columns(self) -> list[str]:
        return ["_simhash"]

    def find_duplicates(self, fp: np.ndarray) -> DedupResult:
        """Cluster fingerprints and mark all but the first document of each cluster."""
        labels, _ = simhash_clusters(fp, max_distance=self.max_distance, blocks=self.blocks)
        dup, rep = keep_first(labels)
        return DedupResult(reasons=["near_duplicate" if d else None for d in dup],
                           duplicate_of={int(i): int(rep[i]) for i in np.flatnonzero(dup)},
                           cluster_sizes=cluster_histogram(labels))

    def deduplicate_texts(self, texts: Sequence[str]) -> DedupResult:
        """Use the step alone on a list of texts."""
        return self.find_duplicates(self.signature_stage()._hasher.fingerprints(list(texts)))

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        fp = np.asarray(corpus.column("_simhash"), dtype=np.int64).view(np.uint64)
        return self.find_duplicates(fp) if fp.size else DedupResult(reasons=[])

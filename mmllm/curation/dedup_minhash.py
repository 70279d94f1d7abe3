"""Fuzzy dedup: MinHash signatures + LSH banding + connected components, keep one per cluster.

CPU path:

* shingles are word n-grams (default 5, as datatrove/Gopher) or character n-grams of the
  normalised text (lower case, punctuation -> space); a shingle hash combines per-token 64-bit
  hashes with a rolling polynomial, all in numpy;
* signatures: with ``signature_backend="rensa"`` (the default when the ``rensa`` package is
  installed) the flat shingle hashes of a batch go to rensa's native ``RMinHash`` in one call;
  with ``"numpy"`` the ``num_perm`` permutations are multiply-shift hashes ``(a*h + b) >> 32``
  evaluated as one ``(shingles x num_perm)`` matrix per batch, reduced with
  ``np.minimum.reduceat``. The two give different (each self-consistent) signatures, so one run
  uses one backend for every document;
* LSH hashes each band of ``rows`` values to 64 bits, sorts per band and links equal neighbours;
  candidate pairs are verified (estimated Jaccard = share of equal signature values >=
  ``jaccard_threshold``), and ``scipy.sparse.csgraph.connected_components`` forms clusters.

The GPU path hands the stage-1 shards to NeMo Curator's ``FuzzyDeduplicationWorkflow`` when CUDA
and RAPIDS are importable (see :mod:`mmllm.curation.gpu`).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import numpy as np
import pandas as pd
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mmllm.curation.dedup_common import DedupResult, cluster_histogram, keep_first, mix64

_PUNCT = re.compile(r"[^\w\s]+")
# ASCII bytes that _PUNCT replaces, and the separators \x1c-\x1f that str.split() splits on but
# bytes.split() does not, become spaces: bytes.split() then splits ASCII text like normalize().
_ASCII_TO_SPACE = bytes(32 if c < 128 and re.match(r"[^\w\s]|[\x1c-\x1f]", chr(c)) else c
                        for c in range(256))
_MERSENNE_SHIFT = np.uint64(32)
_ROWS_PER_BLOCK = 1 << 16  # shingles per matrix block: 65k x 128 x 8 B = 64 MiB peak
_DOCS_PER_CALL = 512  # documents per rensa call (their shingles are held at once)
SignatureBackend = Literal["auto", "rensa", "numpy"]


def resolve_signature_backend(backend: str) -> str:
    """``"auto"`` -> ``"rensa"`` when the package is importable, else ``"numpy"``."""
    if backend not in ("auto", "rensa", "numpy"):
        msg = f"signature backend must be auto, rensa or numpy, got {backend!r}"
        raise ValueError(msg)
    has_rensa = importlib.util.find_spec("rensa") is not None
    if backend == "rensa" and not has_rensa:
        msg = "signature_backend='rensa' needs the rensa package (pip install rensa)"
        raise ImportError(msg)
    return "rensa" if backend == "rensa" or (backend == "auto" and has_rensa) else "numpy"


def normalized_words(text: str) -> list[bytes]:
    """``MinHasher.normalize(text).split()`` as UTF-8 bytes, without a regex pass over ASCII.

    The lower-cased text is split with ``bytes.translate`` + ``bytes.split`` (C speed); only the
    words that contain non-ASCII characters go through the Unicode-aware regex.
    """
    raw = text.lower().encode("utf-8", "surrogatepass").translate(_ASCII_TO_SPACE)
    if raw.isascii():
        return raw.split()
    out: list[bytes] = []
    for tok in raw.split():
        if tok.isascii():
            out.append(tok)
        else:
            out.extend(w.encode("utf-8", "surrogatepass") for w in
                       _PUNCT.sub(" ", tok.decode("utf-8", "surrogatepass")).split())
    return out


def word_hashes(codes: np.ndarray) -> np.ndarray:
    """64-bit hashes of the words of a normalised text given as code points (vectorised).

    Each character contributes ``mix64(code, position in word)``; a word's hash is the mixed sum,
    so no Python-level loop over words is needed (and, unlike ``hash()``, it is the same in
    every worker process).

    Args:
        codes: uint64 code points of a text whose words are separated by single spaces.

    Returns:
        One uint64 per word.
    """
    if codes.size == 0:
        return codes
    space = codes == np.uint64(32)
    starts = np.flatnonzero(~space & np.r_[True, space[:-1]])
    word = np.cumsum(space)  # characters of word k follow exactly k spaces
    pos = (np.arange(codes.size) - starts[np.minimum(word, starts.size - 1)]).astype(np.uint64)
    with np.errstate(over="ignore"):
        contrib = mix64(codes * np.uint64(0x9E3779B97F4A7C15) + pos)
    contrib[space] = 0
    return mix64(np.add.reduceat(contrib, starts))


class MinHasher:
    """Vectorised MinHash signatures.

    Args:
        num_perm: Number of hash permutations (signature length).
        ngram_size: Shingle size in tokens (words, or characters with ``char_ngrams``).
        char_ngrams: Character instead of word shingles.
        seed: Seed of the permutations (same seed -> comparable signatures).
        backend: ``"rensa"`` (native), ``"numpy"`` or ``"auto"`` (rensa when installed).
    """

    def __init__(self, *, num_perm: int = 112, ngram_size: int = 5, char_ngrams: bool = False,
                 seed: int = 42, backend: SignatureBackend = "auto") -> None:
        if num_perm < 1 or ngram_size < 1:
            msg = f"num_perm and ngram_size must be >= 1, got {num_perm}, {ngram_size}"
            raise ValueError(msg)
        self.num_perm, self.ngram_size, self.char_ngrams = num_perm, ngram_size, char_ngrams
        self.seed, self.backend = seed, resolve_signature_backend(backend)
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self._coef = mix64(np.arange(1, ngram_size + 1, dtype=np.uint64) + np.uint64(seed))

    @staticmethod
    def normalize(text: str) -> str:
        """Lower case, punctuation replaced by spaces, whitespace collapsed."""
        return " ".join(_PUNCT.sub(" ", text.lower()).split())

    def _token_hashes(self, text: str) -> np.ndarray:
        codes = np.frombuffer(self.normalize(text).encode("utf-32-le"), dtype=np.uint32)
        codes = codes.astype(np.uint64)
        return codes if self.char_ngrams else word_hashes(codes)

    def shingle_hashes(self, text: str, unique: bool = True) -> np.ndarray:
        """64-bit hashes of the document's shingles (a short text is one shingle).

        Args:
            text: Document.
            unique: Deduplicate the hashes (the minimum does not need it, set sizes do).
        """
        tok = self._token_hashes(text)
        if tok.size == 0:
            return tok
        n = min(self.ngram_size, tok.size)
        m = tok.size - n + 1
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):  # rolling polynomial over the n-gram, wrapping mod 2**64
                acc += tok[k:k + m] * self._coef[k]
        return np.unique(mix64(acc)) if unique else mix64(acc)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """Signatures of many documents.

        Args:
            texts: Documents.

        Returns:
            ``(len(texts), num_perm)`` uint32; an empty document gets all ``0xFFFFFFFF``.
        """
        if self.backend == "rensa":
            return self._rensa_signatures(texts)
        sig = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        sh = [self.shingle_hashes(t) for t in texts]
        start = 0
        while start < len(texts):
            stop, rows = start, 0
            while stop < len(texts) and (rows == 0 or rows + sh[stop].size <= _ROWS_PER_BLOCK):
                rows += sh[stop].size
                stop += 1
            self._fill(sig, sh, start, stop)
            start = stop
        return sig

    def _rensa_signatures(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) > _DOCS_PER_CALL:  # bounded memory for a long list of texts
            return np.concatenate([self._rensa_signatures(texts[i:i + _DOCS_PER_CALL])
                                   for i in range(0, len(texts), _DOCS_PER_CALL)])
        from rensa import RMinHash

        if self.char_ngrams:
            sh = [self.shingle_hashes(t, unique=False) for t in texts]
            offsets = np.zeros(len(sh) + 1, dtype=np.uint64)
            np.cumsum([s.size for s in sh], out=offsets[1:])
            flat = np.concatenate(sh) if sh else np.empty(0, np.uint64)
        else:
            flat, offsets = self._word_shingles_flat(texts)
        digest = RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, self.num_perm,
                                                               self.seed)
        sig = np.asarray(digest.to_rows(), dtype=np.uint32).reshape(len(texts), self.num_perm)
        sig[offsets[1:] == offsets[:-1]] = np.iinfo(np.uint32).max  # empty document
        return sig

    def _word_shingles_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Word n-gram hashes of a batch in one flat array, vectorised over all documents.

        Words are hashed by rensa; each document is followed by ``n - 1`` zero words so the
        rolling polynomial never mixes two documents (and a document shorter than ``n`` words is
        one shingle, as in :meth:`shingle_hashes`).

        Returns:
            ``(hashes, offsets)``: uint64 shingle hashes and ``len(texts) + 1`` row offsets.
        """
        from rensa import RMinHash

        n = self.ngram_size
        words = RMinHash.hash_token_sets([normalized_words(t) for t in texts])
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        tok = np.fromiter(chain.from_iterable(words), dtype=np.uint64, count=int(counts.sum()))
        padded_start = np.concatenate([[0], np.cumsum(counts + n - 1)[:-1]]).astype(np.int64)
        word_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        padded = np.zeros(int(counts.sum() + len(texts) * (n - 1) + n), dtype=np.uint64)
        padded[np.arange(tok.size) + np.repeat(padded_start - word_start, counts)] = tok
        m = padded.size - n + 1
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc += padded[k:k + m] * self._coef[k]
        n_sh = np.where(counts > 0, np.maximum(counts - n + 1, 1), 0)
        offsets = np.zeros(len(texts) + 1, dtype=np.uint64)
        np.cumsum(n_sh, out=offsets[1:])
        first = offsets[:-1].astype(np.int64)
        pos = np.repeat(padded_start - first, n_sh) + np.arange(int(n_sh.sum()))
        return mix64(acc[pos]), offsets

    def _fill(self, sig: np.ndarray, sh: list[np.ndarray], start: int, stop: int) -> None:
        docs = [i for i in range(start, stop) if sh[i].size]
        if not docs:
            return
        flat = np.concatenate([sh[i] for i in docs])
        offsets = np.cumsum([0] + [sh[i].size for i in docs[:-1]])
        with np.errstate(over="ignore"):
            perm = (flat[:, None] * self._a[None, :] + self._b[None, :]) >> _MERSENNE_SHIFT
        sig[docs] = np.minimum.reduceat(perm.astype(np.uint32), offsets, axis=0)


def lsh_clusters(sig: np.ndarray, *, bands: int, rows: int, jaccard_threshold: float = 0.0,
                 ) -> tuple[np.ndarray, int]:
    """Cluster documents whose signatures collide in at least one LSH band.

    Args:
        sig: ``(n, num_perm)`` signatures; ``bands * rows`` must not exceed ``num_perm``.
        bands: Number of bands.
        rows: Signature values per band.
        jaccard_threshold: Keep a candidate pair only if its estimated Jaccard reaches this
            (0 trusts the bands alone).

    Returns:
        ``(labels, n_pairs)``: a cluster label per document and the number of accepted pairs.
    """
    n, p = sig.shape
    if bands * rows > p:
        msg = f"bands * rows = {bands * rows} exceeds the signature length {p}"
        raise ValueError(msg)
    src, dst = [], []
    coef = mix64(np.arange(1, rows + 1, dtype=np.uint64))
    for b in range(bands):
        block = sig[:, b * rows:(b + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            key = mix64((block * coef[None, :]).sum(axis=1, dtype=np.uint64) + np.uint64(b))
        order = np.argsort(key, kind="stable")
        same = key[order][1:] == key[order][:-1]
        # Link each document to its predecessor in the bucket: a chain spans the bucket.
        src.append(order[1:][same])
        dst.append(order[:-1][same])
    a = np.concatenate(src) if src else np.empty(0, np.int64)
    b = np.concatenate(dst) if dst else np.empty(0, np.int64)
    if a.size:
        pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
        a, b = pairs[:, 0], pairs[:, 1]
        if jaccard_threshold > 0:
            est = (sig[a] == sig[b]).mean(axis=1)
            a, b = a[est >= jaccard_threshold], b[est >= jaccard_threshold]
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels, int(a.size)


@dataclass(kw_only=True)
class MinHashStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Pipeline-pass half of MinHash dedup: add each document's signature (uint32 bytes).

    Args:
        name: Stage name.
        text_field: Text column.
        signature_field: Output column.
        num_perm: Signature length.
        ngram_size: Shingle size.
        char_ngrams: Character shingles instead of word shingles.
        seed: Permutation seed.
        signature_backend: ``"rensa"``, ``"numpy"`` or ``"auto"`` (rensa when installed).
    """

    name: str = "minhash_signature"
    text_field: str = "text"
    signature_field: str = "_minhash"
    num_perm: int = 112
    ngram_size: int = 5
    char_ngrams: bool = False
    seed: int = 42
    signature_backend: SignatureBackend = "auto"

    def __post_init__(self) -> None:
        self._hasher = MinHasher(num_perm=self.num_perm, ngram_size=self.ngram_size,
                                 char_ngrams=self.char_ngrams, seed=self.seed,
                                 backend=self.signature_backend)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field, self.signature_field]

    def ray_stage_spec(self) -> dict[str, Any]:
        return {RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        df = batch.to_pandas().copy()
        sig = self._hasher.signatures(df[self.text_field].tolist())
        df[self.signature_field] = [row.tobytes() for row in sig]
        return DocumentBatch(dataset_name=batch.dataset_name, data=df, _metadata=batch._metadata,
                             _stage_perf=batch._stage_perf)


@dataclass(kw_only=True)
class MinHashDedup:
    """Global MinHash + LSH near-duplicate removal (keeps the first document of each cluster).

    Args:
        name: Step name (funnel row).
        ngram_size: Shingle size.
        char_ngrams: Character shingles instead of word shingles.
        num_perm: Signature length.
        bands: LSH bands.
        rows: Values per band (``bands * rows <= num_perm``).
        jaccard_threshold: Minimum estimated Jaccard of a linked pair (0 = bands only).
        seed: Permutation seed.
        backend: ``"cpu"``, ``"gpu"`` (NeMo Curator's RAPIDS workflow) or ``"auto"``.
        signature_backend: CPU signatures: ``"rensa"`` (native Rust, many times the numpy path),
            ``"numpy"`` or ``"auto"`` (rensa when installed). Resolved once here, so the
            pipeline-pass workers and the step agree.
        text_field: Text column.
    """

    name: str = "minhash_dedup"
    ngram_size: int = 5
    char_ngrams: bool = False
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    jaccard_threshold: float = 0.7
    seed: int = 42
    backend: Literal["cpu", "gpu", "auto"] = "auto"
    signature_backend: SignatureBackend = "auto"
    text_field: str = "text"

    def __post_init__(self) -> None:
        self.signature_backend = resolve_signature_backend(self.signature_backend)
        if self.bands * self.rows > self.num_perm:
            msg = f"{self.name}: bands*rows ({self.bands}*{self.rows}) exceeds num_perm {self.num_perm}"
            raise ValueError(msg)
        if self.backend not in ("cpu", "gpu", "auto"):
            msg = f"{self.name}: backend must be cpu, gpu or auto, got {self.backend!r}"
            raise ValueError(msg)

    def signature_stage(self) -> MinHashStage:
        return MinHashStage(text_field=self.text_field, num_perm=self.num_perm,
                            ngram_size=self.ngram_size, char_ngrams=self.char_ngrams,
                            seed=self.seed, signature_backend=self.signature_backend)

    def columns(self) -> list[str]:
        return ["_minhash"]

    def find_duplicates(self, sig: np.ndarray) -> DedupResult:
        """Cluster signatures and mark all but the first document of each cluster."""
        labels, _ = lsh_clusters(sig, bands=self.bands, rows=self.rows,
                                 jaccard_threshold=self.jaccard_threshold)
        dup, rep = keep_first(labels)
        return DedupResult(reasons=["near_duplicate" if d else None for d in dup],
                           duplicate_of={int(i): int(rep[i]) for i in np.flatnonzero(dup)},
                           cluster_sizes=cluster_histogram(labels))

    def deduplicate_texts(self, texts: Sequence[str]) -> DedupResult:
        """Use the step alone on a list of texts (CPU)."""
        return self.find_duplicates(self.signature_stage()._hasher.signatures(list(texts)))

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        from mmllm.curation.gpu import gpu_dedup, gpu_dedup_available

        if self.backend == "gpu" or (self.backend == "auto" and gpu_dedup_available()):
            return gpu_dedup("fuzzy", corpus, context, step=self)
        raw = corpus.column("_minhash")
        if not raw:
            return DedupResult(reasons=[])
        sig = np.frombuffer(b"".join(raw), dtype=np.uint32).reshape(len(raw), self.num_perm)
        return self.find_duplicates(sig)


def signature_frame(texts: Sequence[str], **kwargs: Any) -> pd.DataFrame:
    """Convenience for notebooks: a frame of texts and their MinHash signatures."""
    return pd.DataFrame({"text": list(texts),
                         "signature": list(MinHasher(**kwargs).signatures(list(texts)))})

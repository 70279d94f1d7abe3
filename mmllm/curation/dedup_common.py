"""What the global dedup steps share: the result type, the corpus view and the hash helpers.

Dedup needs the whole corpus, so (as in NeMo Curator's own dedup workflows) it runs as global
steps between pipeline passes: a per-document *signature stage* runs inside the Ray pass (hashes,
MinHash signatures) and the step itself then works on those columns for every surviving document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from nemo_curator.stages.base import ProcessingStage

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-mixed 64-bit hash of uint64 values (vectorised)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


@dataclass
class DedupResult:
    """Outcome of one global step over the currently surviving documents.

    Args:
        reasons: One per document (``None`` = kept), aligned with the corpus view.
        edits: ``{document index: new text}`` for steps that rewrite text (substring dedup).
        duplicate_of: ``{removed index: kept index}`` where known (for the report's examples).
        cluster_sizes: Histogram ``{cluster size: number of clusters}``.
    """

    reasons: list[str | None]
    edits: dict[int, str] = field(default_factory=dict)
    duplicate_of: dict[int, int] = field(default_factory=dict)
    cluster_sizes: dict[int, int] = field(default_factory=dict)


class CorpusView(Protocol):
    """The surviving documents of a run, in a stable global order."""

    def __len__(self) -> int: ...

    def column(self, name: str) -> list[Any]:
        """One value per document of a stage-1 column."""

    def text_groups(self, max_tokens: int, count: Callable[[str], int]) -> list[list[int]]:
        """Document indexes split into consecutive groups of at most ``max_tokens`` tokens."""

    def texts(self, indexes: Sequence[int]) -> list[str]:
        """Texts of the given documents (current version, after earlier edits)."""


class GlobalDedupStep(Protocol):
    """A corpus-wide dedup step: optional per-document stage + a global decision."""

    name: str

    def signature_stage(self) -> ProcessingStage | None:
        """Stage that adds this step's columns during the pipeline pass (or ``None``)."""

    def columns(self) -> list[str]:
        """Stage-1 columns :meth:`run` reads through the corpus view."""

    def run(self, corpus: CorpusView, context: dict[str, Any]) -> DedupResult:
        """Decide which documents to remove (or edit).

        Args:
            corpus: The surviving documents.
            context: Run information (``work_dir``, ``stage1_files``, ``dump_id``).
        """


def cluster_histogram(labels: np.ndarray) -> dict[int, int]:
    """``{cluster size: count}`` over labels, counting only clusters of two or more."""
    if labels.size == 0:
        return {}
    _, sizes = np.unique(labels, return_counts=True)
    sizes, counts = np.unique(sizes[sizes >= 2], return_counts=True)
    return {int(s): int(c) for s, c in zip(sizes, counts)}


def keep_first(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For cluster labels (one per document, in corpus order), mark all but the first of each.

    Returns:
        ``(is_duplicate, representative)``: the bool mask and, per document, the index of the
        document its cluster keeps.
    """
    n = labels.size
    order = np.lexsort((np.arange(n), labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep_sorted = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    representative = np.empty(n, dtype=np.int64)
    representative[order] = order[rep_sorted]
    return representative != np.arange(n), representative

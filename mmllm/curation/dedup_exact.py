"""Exact document dedup: a 128-bit hash per document, keep the first of each identical group.

CPU: the hash is computed in the pipeline pass (:class:`ExactHashStage`) and grouped globally with
pandas. GPU: NeMo Curator's ``ExactDeduplicationWorkflow`` when CUDA and RAPIDS are importable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import xxhash
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import DocumentBatch

from mmllm.curation.dedup_common import DedupResult, cluster_histogram, keep_first

_SPACE = re.compile(r"\s+")


def document_hash(text: str, *, normalize: bool = True) -> str:
    """Hex xxh3-128 of the text (whitespace runs collapsed and ends stripped if ``normalize``)."""
    if normalize:
        text = _SPACE.sub(" ", text).strip()
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


@dataclass(kw_only=True)
class ExactHashStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Pipeline-pass half of exact dedup: add each document's hash.

    Args:
        name: Stage name.
        text_field: Text column.
        hash_field: Output column.
        normalize: Collapse whitespace before hashing.
    """

    name: str = "exact_hash"
    text_field: str = "text"
    hash_field: str = "_exact_hash"
    normalize: bool = True

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], [self.text_field, self.hash_field]

    def ray_stage_spec(self) -> dict[str, Any]:
        return {RayStageSpecKeys.IS_ACTOR_STAGE: False}

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        df = batch.to_pandas().copy()
        df[self.hash_field] = [document_hash(t, normalize=self.normalize) for t in df[self.text_field]]
        return DocumentBatch(dataset_name=batch.dataset_name, data=df, _metadata=batch._metadata,
                             _stage_perf=batch._stage_perf)


@dataclass(kw_only=True)
class ExactDedup:
    """Global exact dedup of document texts (keeps the first occurrence).

    Args:
        name: Step name (funnel row).
        normalize: Collapse whitespace before hashing.
        backend: ``"cpu"``, ``"gpu"`` (NeMo Curator's RAPIDS workflow) or ``"auto"``.
        text_field: Text column.
    """

    name: str = "exact_dedup"
    normalize: bool = True
    backend: Literal["cpu", "gpu", "auto"] = "auto"
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.backend not in ("cpu", "gpu", "auto"):
            msg = f"{self.name}: backend must be cpu, gpu or auto, got {self.backend!r}"
            raise ValueError(msg)

    def signature_stage(self) -> ExactHashStage:
        return ExactHashStage(text_field=self.text_field, normalize=self.normalize)

    def columns(self) -> list[str]:
        return ["_exact_hash"]

    def find_duplicates(self, hashes: Sequence[str]) -> DedupResult:
        """Mark every document whose hash appeared earlier."""
        labels = pd.factorize(pd.Series(list(hashes), dtype=object))[0].astype(np.int64)
        dup, rep = keep_first(labels)
        return DedupResult(reasons=["exact_duplicate" if d else None for d in dup],
                           duplicate_of={int(i): int(rep[i]) for i in np.flatnonzero(dup)},
                           cluster_sizes=cluster_histogram(labels))

    def deduplicate_texts(self, texts: Sequence[str]) -> DedupResult:
        """Use the step alone on a list of texts."""
        return self.find_duplicates([document_hash(t, normalize=self.normalize) for t in texts])

    def run(self, corpus: Any, context: dict[str, Any]) -> DedupResult:
        from mmllm.curation.gpu import gpu_dedup, gpu_dedup_available

        if self.backend == "gpu" or (self.backend == "auto" and gpu_dedup_available()):
            return gpu_dedup("exact", corpus, context, step=self)
        return self.find_duplicates(corpus.column("_exact_hash"))

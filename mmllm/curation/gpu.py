"""GPU dedup through NeMo Curator's RAPIDS workflows (used when CUDA and cuDF are importable).

The stage-1 Parquet shards are handed to ``FuzzyDeduplicationWorkflow`` / ``ExactDeduplication
Workflow`` with one ``FileGroupTask`` per shard, so NeMo's id generator gives every shard a
contiguous id range: ``id - range_start`` is the row inside the shard, which maps the duplicate
ids back to the kit's documents. NeMo picks which member of a duplicate group survives.

This path cannot run on the CPU-only development machine; it is exercised by the ``gpu`` tests.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger

from mmllm.curation.dedup_common import DedupResult

_REASONS = {"fuzzy": "near_duplicate", "exact": "exact_duplicate"}


@lru_cache(maxsize=1)
def gpu_dedup_available() -> bool:
    """Whether a CUDA device and RAPIDS (cuDF) are importable here."""
    try:
        import cudf  # noqa: F401
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any import/driver failure means "no GPU path"
        return False


def _workflow(kind: str, out: Path, step: Any) -> tuple[Any, str, str]:
    if kind == "fuzzy":
        from nemo_curator.stages.deduplication.fuzzy.workflow import FuzzyDeduplicationWorkflow

        if not step.char_ngrams:
            logger.warning("NeMo's GPU MinHash uses character n-grams; using 24-character shingles")
        wf = FuzzyDeduplicationWorkflow(
            cache_path=str(out / "cache"), output_path=str(out), input_filetype="parquet",
            text_field=step.text_field, seed=step.seed,
            char_ngrams=step.ngram_size if step.char_ngrams else 24,
            num_bands=step.bands, minhashes_per_band=step.rows)
        return wf, "FuzzyDuplicateIds", "fuzzy_id_generator.json"
    from nemo_curator.stages.deduplication.exact.workflow import ExactDeduplicationWorkflow

    wf = ExactDeduplicationWorkflow(output_path=str(out), input_filetype="parquet",
                                    text_field=step.text_field, assign_id=True,
                                    normalize_text=step.normalize)
    return wf, "ExactDuplicateIds", "exact_id_generator.json"


def gpu_dedup(kind: str, corpus: Any, context: dict[str, Any], *, step: Any) -> DedupResult:
    """Run NeMo Curator's GPU dedup workflow over the stage-1 shards.

    Args:
        kind: ``"fuzzy"`` or ``"exact"``.
        corpus: The corpus view (maps shard rows to surviving documents).
        context: Run context with ``work_dir`` and ``stage1_files``.
        step: The CPU step whose parameters are reused.

    Returns:
        Reasons for the surviving documents (documents removed earlier are ignored).
    """
    from nemo_curator.stages.deduplication.id_generator import (
        CURATOR_DEDUP_ID_STR,
        IdGeneratorBase,
    )
    from nemo_curator.tasks import FileGroupTask

    from mmllm.curation.executors import ray_session

    out = Path(context["work_dir"]) / f"gpu_{kind}_dedup"
    files = [os.path.abspath(f) for f in context["stage1_files"]]
    tasks = [FileGroupTask(dataset_name="stage1", data=[f], _metadata={"source_files": [f]})
             for f in files]
    wf, subdir, id_file = _workflow(kind, out, step)
    with ray_session(address=context.get("ray_address"), num_cpus=context.get("num_cpus")):
        wf.run(initial_tasks=tasks)
    ids_dir = out / subdir
    ids = (pd.read_parquet(ids_dir)[CURATOR_DEDUP_ID_STR].to_numpy(dtype=np.int64)
           if ids_dir.exists() else np.empty(0, np.int64))
    gen = IdGeneratorBase.from_disk(str(out / id_file))
    reasons: list[str | None] = [None] * len(corpus)
    for f in files:
        lo, hi = gen.get_batch_range([f], None)
        rows = (ids[(ids >= lo) & (ids <= hi)] - lo).tolist()
        for doc in corpus.locate(f, rows):
            if doc is not None:
                reasons[doc] = _REASONS[kind]
    return DedupResult(reasons=reasons)

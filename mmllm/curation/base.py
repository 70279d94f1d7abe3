"""Shared pieces of the curation stages: per-stage drop statistics and the stage base classes.

Every curation stage is a NeMo Curator ``ProcessingStage[DocumentBatch, DocumentBatch]``. Instead
of silently dropping rows, a stage returns one *reason* per document (``None`` = kept) and the
base class records, in ``batch._metadata["curation_stats"]``, how many documents and characters
came in, went out and were dropped for each reason, plus a few examples of removed text. The
statistics travel with the batch through Ray and are summed by :mod:`mmllm.curation.report`
into the funnel.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from nemo_curator.backends.utils import RayStageSpecKeys
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.text.filters.doc_filter import DocumentFilter
from nemo_curator.tasks import DocumentBatch

STATS_KEY = "curation_stats"
EXAMPLE_CHARS = 300
MAX_ISSUES = 1000  # unparseable records listed by file and position per stage (all are counted)


def new_stage_stats(stage: str) -> dict[str, Any]:
    """An empty statistics record for one stage (plain dicts so it pickles and JSON-dumps).

    Args:
        stage: Stage name.

    Returns:
        ``{"stage", "docs_in", "chars_in", "docs_out", "chars_out", "docs_edited", "dropped",
        "examples", "extra", "issues", "issues_omitted"}`` (``docs_edited``: kept documents whose
        text the stage changed) where ``dropped`` maps reason -> ``{"docs", "chars"}``,
        ``examples`` maps reason -> list of ``{"url", "text"}``, ``extra`` maps a histogram name
        -> ``{key: count}`` and ``issues`` lists records or files that could not be parsed
        (``{"file", "where", "reason", "error"}``, at most :data:`MAX_ISSUES`; the rest are
        counted in ``issues_omitted``).
    """
    return {"stage": stage, "docs_in": 0, "chars_in": 0, "docs_out": 0, "chars_out": 0,
            "docs_edited": 0, "dropped": {}, "examples": {}, "extra": {}, "issues": [],
            "issues_omitted": 0}


def merge_stage_stats(into: dict[str, Any], other: dict[str, Any], max_examples: int = 3) -> None:
    """Add ``other`` into ``into`` (same stage), in place.

    Args:
        into: Accumulator record (modified).
        other: Record to add.
        max_examples: Examples kept per reason.
    """
    for key in ("docs_in", "chars_in", "docs_out", "chars_out", "docs_edited"):
        into[key] += other.get(key, 0)
    if "seconds" in other:
        into["seconds"] = round(into.get("seconds", 0.0) + other["seconds"], 3)
    for reason, d in other["dropped"].items():
        acc = into["dropped"].setdefault(reason, {"docs": 0, "chars": 0})
        acc["docs"] += d["docs"]
        acc["chars"] += d["chars"]
    for reason, exs in other["examples"].items():
        acc = into["examples"].setdefault(reason, [])
        acc.extend(exs[: max(0, max_examples - len(acc))])
    issues = other.get("issues", [])
    room = max(0, MAX_ISSUES - len(into.setdefault("issues", [])))
    into["issues"].extend(issues[:room])
    into["issues_omitted"] = (into.get("issues_omitted", 0) + other.get("issues_omitted", 0)
                              + max(0, len(issues) - room))
    for hist, counts in other["extra"].items():
        acc = into["extra"].setdefault(hist, {})
        for k, v in counts.items():
            acc[str(k)] = acc.get(str(k), 0) + v


def merge_stats_lists(lists: Iterable[Sequence[dict[str, Any]]], max_examples: int = 3) -> list[dict]:
    """Sum per-stage records from many batches, keeping the order stages first appear in.

    Args:
        lists: One list of stage records per batch/shard.
        max_examples: Examples kept per reason.

    Returns:
        One merged record per stage.
    """
    merged: dict[str, dict[str, Any]] = {}
    for records in lists:
        for rec in records:
            acc = merged.setdefault(rec["stage"], new_stage_stats(rec["stage"]))
            merge_stage_stats(acc, rec, max_examples)
    return list(merged.values())


def doc_chars(df: pd.DataFrame, text_field: str = "text") -> pd.Series:
    """Characters per document: the text when present, else the raw HTML (before extraction)."""
    if len(df) == 0:
        return pd.Series([], dtype="int64")
    n = df[text_field].str.len() if text_field in df else pd.Series(float("nan"), index=df.index)
    if "html" in df:
        n = n.fillna(df["html"].str.len())
    return n.fillna(0).astype("int64")


def stats_from_reasons(stage: str, df: pd.DataFrame, reasons: pd.Series, chars_in: pd.Series,
                       chars_out: pd.Series, *, max_examples: int = 3,
                       text_field: str = "text", texts_in: pd.Series | None = None) -> dict:
    """Build the statistics record of one batch from its per-document drop reasons.

    Args:
        stage: Stage name.
        df: Documents that entered the stage (for URLs).
        reasons: One reason per document, ``None`` for kept documents.
        chars_in: Characters per document before the stage.
        chars_out: Characters per document after the stage (only kept rows are summed).
        max_examples: Examples of removed text kept per reason.
        text_field: Text column used for examples.
        texts_in: Texts before the stage modified them (defaults to ``df[text_field]``).

    Returns:
        A record as made by :func:`new_stage_stats`.
    """
    rec = new_stage_stats(stage)
    kept = reasons.isna().to_numpy()
    rec["docs_in"], rec["chars_in"] = len(df), int(chars_in.sum())
    rec["docs_out"], rec["chars_out"] = int(kept.sum()), int(chars_out[kept].sum())
    if texts_in is not None and text_field in df:
        rec["docs_edited"] = sum(1 for a, b, k in zip(texts_in, df[text_field], kept)
                                 if k and isinstance(a, str) and a != b)
    if kept.all():
        return rec
    texts = texts_in if texts_in is not None else df.get(text_field)
    urls = df["url"] if "url" in df else pd.Series([None] * len(df), index=df.index)
    for reason, idx in reasons[~kept].groupby(reasons[~kept]).groups.items():
        rec["dropped"][str(reason)] = {"docs": len(idx), "chars": int(chars_in[idx].sum())}
        examples = []
        for i in list(idx)[:max_examples]:
            text = texts[i] if texts is not None and isinstance(texts[i], str) else None
            if text is None and "html" in df and isinstance(df["html"][i], str):
                text = df["html"][i]
            examples.append({"url": None if pd.isna(urls[i]) else str(urls[i]),
                             "text": (text or "")[:EXAMPLE_CHARS]})
        rec["examples"][str(reason)] = examples
    return rec


def append_stats(batch: DocumentBatch, record: dict) -> dict:
    """Return a copy of the batch metadata with ``record`` appended to its statistics."""
    meta = dict(batch._metadata)
    meta[STATS_KEY] = [*meta.get(STATS_KEY, []), record]
    return meta


@dataclass(kw_only=True)
class CurationStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Base of the kit's document stages: subclasses return one drop reason per document.

    Subclasses implement :meth:`drop_reasons`, which may also rewrite ``df[text_field]`` in place
    (line-level filters do). Kept rows flow on; dropped ones are counted by reason.

    Args:
        name: Stage name (the funnel's row label).
        text_field: Column holding the document text.
        max_examples: Examples of removed text kept per reason in the report.
    """

    name: str = "curation_stage"
    text_field: str = "text"
    max_examples: int = 3

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], self.required_columns()

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], self.required_columns()

    def required_columns(self) -> list[str]:
        """Columns the stage reads."""
        return [self.text_field]

    def ray_stage_spec(self) -> dict[str, Any]:
        # Task (not actor) stages: on a 2-core node one actor per stage would hold every CPU and
        # starve the rest; models and lists are cached per worker process instead.
        return {RayStageSpecKeys.IS_ACTOR_STAGE: False}

    @abstractmethod
    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        """Return one reason per row (``None`` keeps the row); may modify ``df`` in place.

        Args:
            df: The batch's documents (a private copy, index 0..n-1).

        Returns:
            Series of ``str | None`` aligned with ``df.index``.
        """

    def histograms(self, df: pd.DataFrame, reasons: pd.Series) -> dict[str, dict[str, int]]:
        """Extra histograms for the report (e.g. detected languages); none by default."""
        return {}

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        """Apply :meth:`drop_reasons`, record statistics and keep the surviving rows."""
        df = batch.to_pandas().reset_index(drop=True).copy()
        chars_in = doc_chars(df, self.text_field)
        texts_in = df[self.text_field].copy() if self.text_field in df else None
        reasons = (self.drop_reasons(df) if len(df)
                   else pd.Series([], dtype=object))
        reasons = pd.Series(reasons, index=df.index, dtype=object)
        record = stats_from_reasons(self.name, df, reasons, chars_in, doc_chars(df, self.text_field),
                                    max_examples=self.max_examples, text_field=self.text_field,
                                    texts_in=texts_in)
        record["extra"] = self.histograms(df, reasons) if len(df) else {}
        out = df[reasons.isna().to_numpy()].reset_index(drop=True)
        return DocumentBatch(dataset_name=batch.dataset_name, data=out,
                             _metadata=append_stats(batch, record), _stage_perf=batch._stage_perf)


@dataclass(kw_only=True)
class FilterChainStage(CurationStage):
    """Apply NeMo Curator ``DocumentFilter`` objects in order; the first that rejects names the reason.

    Unlike NeMo's ``ScoreFilter`` this keeps the name of the failing filter, so the report can say
    why each document left. Subclasses build their filters from simple thresholds in
    :meth:`build_filters`; :class:`DocumentFilterStage` takes ready-made filter objects.

    Args:
        reason_prefix: Prefix of the recorded reasons (``"<prefix>:<filter name>"``).
    """

    reason_prefix: str = ""

    def __post_init__(self) -> None:
        self._filters: list[DocumentFilter] = list(self.build_filters())

    def build_filters(self) -> Sequence[DocumentFilter]:
        """The filters, in the order they are tried."""
        raise NotImplementedError

    def _reason(self, f: DocumentFilter) -> str:
        return f"{self.reason_prefix}:{f.name}" if self.reason_prefix else f.name

    def prepare(self, text: str) -> None:
        """Hook: precompute shared views of the text (lines, n-grams) on the filters."""

    def reset(self) -> None:
        """Hook: forget what :meth:`prepare` cached, so a filter used alone later is not stale."""

    def first_failure(self, text: str) -> str | None:
        """Reason of the first filter that rejects ``text``, else ``None``."""
        if not isinstance(text, str) or not text.strip():
            return "empty_text"
        self.prepare(text)
        try:
            for f in self._filters:
                if not f.keep_document(f.score_document(text)):
                    return self._reason(f)
            return None
        finally:
            self.reset()

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        return pd.Series([self.first_failure(t) for t in df[self.text_field]], index=df.index,
                         dtype=object)


@dataclass(kw_only=True)
class DocumentFilterStage(FilterChainStage):
    """Run any NeMo Curator ``DocumentFilter`` objects as a stage that records drop reasons.

    Args:
        filters: The filters, tried in order.
    """

    name: str = "document_filters"
    filters: list[DocumentFilter] = field(default_factory=list)

    def build_filters(self) -> Sequence[DocumentFilter]:
        return self.filters

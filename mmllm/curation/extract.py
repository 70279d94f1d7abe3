"""HTML -> text with NeMo Curator's extractors (trafilatura by default, jusText, resiliparse).

After extraction URLs are removed and runs of newlines are cut to two, both with NeMo Curator's
modifiers (``UrlRemover``, ``NewlineNormalizer``). Documents that arrive as text already (WET,
JSONL, Parquet) skip extraction but get the same clean-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import pandas as pd
from nemo_curator.stages.text.download.html_extractors.base import HTMLExtractorAlgorithm
from nemo_curator.stages.text.download.html_extractors.justext import JusTextExtractor
from nemo_curator.stages.text.download.html_extractors.trafilatura import TrafilaturaExtractor
from nemo_curator.stages.text.download.html_extractors.utils import get_stop_list_dict
from nemo_curator.stages.text.download.utils import lang_detect
from nemo_curator.stages.text.modifiers.string.newline_normalizer import NewlineNormalizer
from nemo_curator.stages.text.modifiers.string.url_remover import UrlRemover
from nemo_curator.tasks import DocumentBatch

from mmllm.curation.base import CurationStage

_TRAILING_SPACE = re.compile(r"[ \t]+\n")


def default_extractor() -> HTMLExtractorAlgorithm:
    """Plain trafilatura as RefinedWeb used it.

    NeMo's per-paragraph stop-word density filter is off (``required_stopword_density=0``) and so
    is trafilatura's ``deduplicate``: its cache of seen paragraphs is global to the worker process,
    which would make the output depend on which worker saw which page first.
    """
    return TrafilaturaExtractor(required_stopword_density=0.0, deduplicate=False)


@lru_cache(maxsize=1)
def _stop_lists() -> dict[str, frozenset[str]]:
    return get_stop_list_dict()


@dataclass(kw_only=True)
class TextExtractionStage(CurationStage):
    """Extract main text from the ``html`` column, then remove URLs and extra newlines.

    Args:
        name: Stage name.
        extractor: A NeMo Curator ``HTMLExtractorAlgorithm`` (``TrafilaturaExtractor``,
            ``JusTextExtractor``, ``ResiliparseExtractor``); defaults to :func:`default_extractor`.
        html_field: Column with decoded HTML (``None`` for rows that already have text).
        remove_urls: Remove ``http(s)://`` and ``www.`` URLs from the text.
        paragraph_separator: Joins the extractor's paragraphs.
    """

    name: str = "extract"
    extractor: HTMLExtractorAlgorithm = field(default_factory=default_extractor)
    html_field: str = "html"
    remove_urls: bool = True
    paragraph_separator: str = "\n\n"

    def __post_init__(self) -> None:
        if not isinstance(self.extractor, HTMLExtractorAlgorithm):
            msg = f"extractor must be a NeMo Curator HTMLExtractorAlgorithm, got {self.extractor!r}"
            raise TypeError(msg)
        self._url_remover, self._newlines = UrlRemover(), NewlineNormalizer()

    def required_columns(self) -> list[str]:
        return [self.text_field]

    def _needs_stop_words(self) -> bool:
        return isinstance(self.extractor, JusTextExtractor) or bool(
            getattr(self.extractor, "required_stopword_density", 0))

    def extract(self, html: str) -> str | None:
        """Main text of one page (``None`` when the extractor finds nothing)."""
        stop_words, language = frozenset(), "ENGLISH"
        if self._needs_stop_words():
            # jusText and the stop-word density filter need the page's language (NeMo uses CLD2).
            language = lang_detect(html)
            stop_words = _stop_lists().get(language, frozenset())
        paragraphs = self.extractor.extract_text(html, stop_words, language)
        if not paragraphs:
            return None
        return self.paragraph_separator.join(p.strip() for p in paragraphs if p.strip()) or None

    def clean(self, text: str) -> str:
        """Remove URLs, then cut newline runs to two (NeMo modifiers); strip line ends."""
        if self.remove_urls:
            text = self._url_remover.modify_document(text)
        # Lines emptied by URL removal keep spaces that would hide a newline run from the
        # normaliser.
        text = _TRAILING_SPACE.sub("\n", text).strip()
        return self._newlines.modify_document(text)

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        htmls = df[self.html_field] if self.html_field in df else pd.Series(None, index=df.index)
        texts, reasons = [], []
        for html, text in zip(htmls, df[self.text_field]):
            reason = None
            if isinstance(html, str):
                try:
                    text = self.extract(html)
                except Exception:  # noqa: BLE001 - a pathological page must not stop the batch
                    text, reason = None, "extraction_error"
            if isinstance(text, str):
                text = self.clean(text)
            if reason is None and not (isinstance(text, str) and text):
                reason = "no_text_extracted"
            texts.append(text)
            reasons.append(reason)
        df[self.text_field] = pd.Series(texts, index=df.index, dtype=object)
        return pd.Series(reasons, index=df.index, dtype=object)

    def process(self, batch: DocumentBatch) -> DocumentBatch:
        out = super().process(batch)
        # The HTML is the bulk of a batch's memory and nothing downstream reads it.
        out.data = out.data.drop(columns=[self.html_field], errors="ignore")
        return out

"""Gopher repetition removal and quality filters, built on NeMo Curator's heuristic filters.

Checked against Gopher (Rae et al., 2021, appendix A, table A1):

* Duplicate line / paragraph fraction (0.30) and their character fractions (0.20): NeMo's
  ``RepeatedLines*`` / ``RepeatedParagraphs*`` keep a document when the *unique* fraction is at
  least ``1 - max``, which is Gopher's rule. Used as is.
* Duplicate n-gram character fraction, n = 5..10 (0.15 .. 0.10): NeMo's
  ``RepeatingDuplicateNGramsFilter`` counts the characters of every repeated occurrence once, never
  twice for overlapping n-grams, as Gopher says. Used as is.
* Top n-gram character fraction, n = 2..4 (0.20, 0.18, 0.16): NeMo's version removes the joined
  n-gram string with ``str.replace`` (which also hits it inside longer words, e.g. "the cat" in
  "bathe cat") and breaks ties through set order, which changes between processes.
  :class:`GopherTopNGramFilter` counts the characters of the word positions covered by the most
  frequent n-gram instead, ties going to the n-gram seen first.
* Symbol-to-word ratio (0.1 for ``#`` or ellipsis): NeMo's ``SymbolsToWordsFilter`` counts runs
  of ``#`` rather than characters and misses ellipses glued to words ("wait..."), so
  :class:`GopherSymbolToWordFilter` counts ``#`` characters and ``...``/``…`` occurrences per word.
* Word count 50..100,000, mean word length 3..10, bullet lines <= 90 %, ellipsis lines <= 30 %,
  >= 80 % words with a letter, >= 2 of the stop words the/be/to/of/and/that/have/with: NeMo's
  ``WordCountFilter``, ``MeanWordLengthFilter``, ``BulletsFilter``, ``EllipsisFilter``,
  ``WordsWithoutAlphabetsFilter`` and ``CommonEnglishWordsFilter`` match Gopher. Used as is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from nemo_curator.stages.text.filters.doc_filter import DocumentFilter
from nemo_curator.stages.text.filters.heuristic import (
    BulletsFilter,
    CommonEnglishWordsFilter,
    EllipsisFilter,
    MeanWordLengthFilter,
    SymbolsToWordsFilter,
    WordCountFilter,
    WordsWithoutAlphabetsFilter,
)
from nemo_curator.stages.text.filters.heuristic.repetition import (
    RepeatedLinesByCharFilter,
    RepeatedLinesFilter,
    RepeatedParagraphsByCharFilter,
    RepeatedParagraphsFilter,
    RepeatingDuplicateNGramsFilter,
    RepeatingTopNGramsFilter,
)
from nemo_curator.stages.text.utils.text_utils import get_ngrams, get_paragraphs, get_sentences

from mmllm.curation.base import FilterChainStage

GOPHER_TOP_NGRAMS = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAMS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherTopNGramFilter(RepeatingTopNGramsFilter):
    """Fraction of word characters covered by the most frequent word n-gram (Gopher, n = 2..4).

    Score = characters of the words at positions covered by any occurrence of the top n-gram,
    divided by the characters of all words (whitespace excluded from both). A document whose top
    n-gram occurs only once has no repetition and scores 0.

    Args:
        n: n-gram size.
        max_repeating_ngram_ratio: Drop above this fraction.
    """

    def __init__(self, n: int = 2, max_repeating_ngram_ratio: float = 0.2) -> None:
        super().__init__(n=n, max_repeating_ngram_ratio=max_repeating_ngram_ratio)
        self._name = f"top_{n}gram_char_fraction"
        self.words: list[str] | None = None  # precomputed by the stage, else split here

    def score_document(self, text: str) -> float:
        words = self.words if self.words is not None else text.split()
        if len(words) < self._n:
            return 0.0
        ngrams = get_ngrams(words, self._n)
        top, count = Counter(ngrams).most_common(1)[0]  # ties -> first seen (insertion order)
        if count < 2:
            return 0.0
        covered = bytearray(len(words))
        for i, g in enumerate(ngrams):
            if g == top:
                covered[i:i + self._n] = b"\x01" * self._n
        total = sum(len(w) for w in words)
        return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


class GopherSymbolToWordFilter(SymbolsToWordsFilter):
    """Max of (``#`` characters per word) and (ellipses ``...``/``…`` per word) (Gopher: <= 0.1).

    Args:
        max_symbol_to_word_ratio: Drop above this ratio.
    """

    def __init__(self, max_symbol_to_word_ratio: float = 0.1) -> None:
        super().__init__(max_symbol_to_word_ratio=max_symbol_to_word_ratio)
        self._name = "symbol_to_word"

    def score_document(self, text: str) -> float:
        n_words = len(text.split())
        if n_words == 0:
            return float("inf")
        ellipses = text.count("...") + text.count("\u2026")
        return max(text.count("#"), ellipses) / n_words


@dataclass(kw_only=True)
class GopherRepetitionStage(FilterChainStage):
    """Gopher repetition removal; thresholds are maxima of duplicated fractions.

    Args:
        name: Stage name.
        max_dup_line_fraction: Duplicated lines / lines.
        max_dup_paragraph_fraction: Duplicated paragraphs / paragraphs.
        max_dup_line_char_fraction: Characters in duplicated lines / characters in lines.
        max_dup_paragraph_char_fraction: Same for paragraphs.
        top_ngram_max_fractions: ``{n: max}`` for the top n-gram character fraction.
        dup_ngram_max_fractions: ``{n: max}`` for the duplicated n-gram character fraction.
    """

    name: str = "gopher_repetition"
    max_dup_line_fraction: float = 0.30
    max_dup_paragraph_fraction: float = 0.30
    max_dup_line_char_fraction: float = 0.20
    max_dup_paragraph_char_fraction: float = 0.20
    top_ngram_max_fractions: dict[int, float] = field(default_factory=lambda: dict(GOPHER_TOP_NGRAMS))
    dup_ngram_max_fractions: dict[int, float] = field(default_factory=lambda: dict(GOPHER_DUP_NGRAMS))

    def build_filters(self) -> Sequence[DocumentFilter]:
        fracs = [self.max_dup_line_fraction, self.max_dup_paragraph_fraction,
                 self.max_dup_line_char_fraction, self.max_dup_paragraph_char_fraction,
                 *self.top_ngram_max_fractions.values(), *self.dup_ngram_max_fractions.values()]
        if any(not 0.0 <= float(f) <= 1.0 for f in fracs):
            msg = f"{self.name}: every fraction must be in [0, 1], got {fracs}"
            raise ValueError(msg)
        # NeMo's line/paragraph filters take the minimum *unique* fraction.
        filters: list[DocumentFilter] = [
            RepeatedLinesFilter(1.0 - self.max_dup_line_fraction),
            RepeatedParagraphsFilter(1.0 - self.max_dup_paragraph_fraction),
            RepeatedLinesByCharFilter(1.0 - self.max_dup_line_char_fraction),
            RepeatedParagraphsByCharFilter(1.0 - self.max_dup_paragraph_char_fraction)]
        filters += [GopherTopNGramFilter(int(n), float(m))
                    for n, m in sorted(self.top_ngram_max_fractions.items())]
        filters += [RepeatingDuplicateNGramsFilter(int(n), float(m))
                    for n, m in sorted(self.dup_ngram_max_fractions.items())]
        return filters

    def prepare(self, text: str) -> None:
        # Split once per document and share the views (NeMo filters read these attributes).
        words, lines, paras = text.split(), get_sentences(text), get_paragraphs(text)
        for f in self._filters:
            f.sentences, f.paragraphs = lines, paras
            if isinstance(f, GopherTopNGramFilter):
                f.words = words
            elif isinstance(f, RepeatingDuplicateNGramsFilter):
                # An empty list (short text) scores 0; NeMo's own split would score it 1.0.
                f.ngrams = get_ngrams(words, f._n)

    def reset(self) -> None:
        for f in self._filters:
            f.sentences = f.paragraphs = f.ngrams = None
            if isinstance(f, GopherTopNGramFilter):
                f.words = None


@dataclass(kw_only=True)
class GopherQualityStage(FilterChainStage):
    """Gopher document quality filters (thresholds as in Gopher / BLOOM).

    Args:
        name: Stage name.
        min_words: Minimum words.
        max_words: Maximum words.
        min_mean_word_length: Minimum mean word length.
        max_mean_word_length: Maximum mean word length.
        max_symbol_word_ratio: Maximum ``#`` or ellipsis per word.
        max_bullet_lines_ratio: Maximum fraction of lines starting with a bullet.
        max_ellipsis_lines_ratio: Maximum fraction of lines ending with an ellipsis.
        min_alpha_words_ratio: Minimum fraction of words containing a letter.
        min_stop_words: Minimum count of Gopher's stop words (the, be, to, of, and, that, have,
            with).
    """

    name: str = "gopher_quality"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2

    def build_filters(self) -> Sequence[DocumentFilter]:
        if self.min_words > self.max_words or self.min_mean_word_length > self.max_mean_word_length:
            msg = f"{self.name}: a minimum exceeds its maximum"
            raise ValueError(msg)
        return [WordCountFilter(self.min_words, self.max_words),
                MeanWordLengthFilter(self.min_mean_word_length, self.max_mean_word_length),
                GopherSymbolToWordFilter(self.max_symbol_word_ratio),
                BulletsFilter(self.max_bullet_lines_ratio),
                EllipsisFilter(self.max_ellipsis_lines_ratio),
                WordsWithoutAlphabetsFilter(self.min_alpha_words_ratio),
                CommonEnglishWordsFilter(self.min_stop_words)]

    def prepare(self, text: str) -> None:
        lines = get_sentences(text)
        for f in self._filters:
            f.sentences = lines

    def reset(self) -> None:
        for f in self._filters:
            f.sentences = None

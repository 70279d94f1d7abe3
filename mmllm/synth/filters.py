"""Filters shared by the instruction generators: ROUGE-L near-duplicates, heuristics, degenerate answers.

Every filter returns the *reason* a candidate is dropped (a short snake_case string counted in the
run's stats) or None when it passes, so a run can report exactly why its yield is what it is.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence


# Self-instruct's blacklist: tasks a text-only model cannot do (or should not be taught to pretend).
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map",
             "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# Short, common English function words: an answer made only of these (and punctuation) says nothing.
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because
been before being below between both but by can could did do does doing down during each few for
from further had has have having he her here hers herself him himself his how i if in into is it
its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them themselves
then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves yes ok okay""".split())  # noqa: SIM905
_WORD = re.compile(r"[A-Za-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return [w.lower() for w in _WORD.findall(text)]


class RougePool:
    """A growing pool of texts with ROUGE-L near-duplicate lookup (``rouge-score``'s LCS).

    Each text is tokenized once when added (rouge-score's default tokenizer: lower-cased
    alphanumeric tokens, no stemming) and a candidate once per query. Pool entries whose
    length or bag of words makes the threshold unreachable are skipped without an LCS:
    LCS <= |bag intersection| <= min(m, n), and F = 2 LCS / (m + n).

    Args:
        threshold: a candidate whose ROUGE-L F-measure with any pool text is >= this is a
            near-duplicate (self-instruct: 0.7).
        texts: initial pool (e.g. the seed instructions).
    """

    def __init__(self, *, threshold: float = 0.7, texts: Iterable[str] = ()) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        # Imported here, not at module import: rouge-score pulls in absl, whose logging handler
        # binds the stderr of the moment (pytest's capture, a closed stream later).
        from rouge_score import tokenizers

        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._tokens: list[list[str]] = []
        self._bags: list[Counter] = []
        self.texts: list[str] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def add(self, text: str, tokens: list[str] | None = None) -> None:
        tokens = self.tokenize(text) if tokens is None else tokens
        self.texts.append(text)
        self._tokens.append(tokens)
        self._bags.append(Counter(tokens))

    def most_similar(self, text: str, tokens: list[str] | None = None, *,
                     first: bool = False) -> tuple[float, int | None]:
        """``(best ROUGE-L F, index of that pool text)``: exact when it reaches the threshold;
        below it, pool texts that cannot reach it are skipped, so it is only a lower bound
        (``(0.0, None)`` when every text was skipped, the pool is empty or ``text`` has no words).

        Args:
            first: stop at the first pool text at or above the threshold (a yes/no lookup).
        """
        tokens = self.tokenize(text) if tokens is None else tokens
        if not tokens:
            return 0.0, None
        bag, n = Counter(tokens), len(tokens)
        best, where = 0.0, None
        for i, (other, other_bag) in enumerate(zip(self._tokens, self._bags)):
            m = len(other)
            if not m or 2 * min(m, n) / (m + n) < max(self.threshold, best):
                continue  # even a perfect LCS cannot reach the threshold
            if 2 * sum((bag & other_bag).values()) / (m + n) < max(self.threshold, best):
                continue
            f = _score_lcs(other, tokens).fmeasure
            if f > best:
                best, where = f, i
                if first and best >= self.threshold:
                    break
        return best, where

    def is_duplicate(self, text: str, tokens: list[str] | None = None) -> bool:
        return self.most_similar(text, tokens, first=True)[0] >= self.threshold


def instruction_reason(text: str, *, min_words: int = 3, max_words: int = 150,
                       blacklist: Sequence[str] = BLACKLIST) -> str | None:
    """Why a generated instruction is dropped by self-instruct's heuristics (None: it passes).

    Reasons: ``empty``, ``too_short``, ``too_long``, ``blacklisted`` (a keyword such as image
    or file), ``program_task`` ("Write a program ..."), ``starts_with_punctuation``,
    ``non_english`` (starts with a non-ASCII character).
    """
    text = text.strip()
    if not text:
        return "empty"
    n = len(text.split())
    if n < min_words:
        return "too_short"
    if n > max_words:
        return "too_long"
    lowered = f" {' '.join(words(text))} "
    if any(f" {k} " in lowered for k in blacklist):
        return "blacklisted"
    if lowered.strip().startswith("write a program"):
        return "program_task"
    if text[0] in string.punctuation:
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "non_english"
    return None


def is_degenerate(text: str, *, min_words: int = 1) -> bool:
    """Whether ``text`` says nothing: fewer than ``min_words`` words, or only stop words/punctuation."""
    ws = words(text)
    return len(ws) < min_words or all(w in STOPWORDS for w in ws)


def is_repetitive(text: str, *, n: int = 4, max_repeat: float = 0.5) -> bool:
    """Whether ``text`` loops (a small model's greedy failure): at least 3 lines, at most half of
    them distinct; or at least 12 words whose distinct word ``n``-grams are under ``1 - max_repeat``
    of all of them."""
    lines = [line.strip().lower() for line in text.splitlines() if line.strip()]
    if len(lines) >= 3 and len(set(lines)) <= len(lines) * max_repeat:
        return True
    ws = words(text)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    return len(ws) >= 12 and len(set(grams)) < len(grams) * (1 - max_repeat)


def response_reason(response: str | None, *, min_words: int = 3, sorry_max_words: int = 80) -> str | None:
    """Why a teacher's answer is eliminated (Evol-Instruct's response rules), None: it passes.

    Reasons: ``teacher_failed`` (no answer), ``degenerate_response`` (fewer than ``min_words``
    words, or only punctuation and stop words), ``refused_response`` (it says "sorry" and is
    shorter than ``sorry_max_words`` words: the instruction was too hard to answer),
    ``repetitive_response`` (it loops, see :func:`is_repetitive`).
    """
    if response is None:
        return "teacher_failed"
    if is_degenerate(response, min_words=min_words):
        return "degenerate_response"
    ws = words(response)
    if "sorry" in ws and len(ws) < sorry_max_words:
        return "refused_response"
    if is_repetitive(response):
        return "repetitive_response"
    return None


def _score_lcs(target: list[str], prediction: list[str]):
    from rouge_score import rouge_scorer

    return rouge_scorer._score_lcs(target, prediction)

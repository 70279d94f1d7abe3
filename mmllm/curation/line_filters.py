"""Line-level filters: RefinedWeb's line-wise corrections and the C4 rules (optional).

Both rewrite the text (removing lines) and drop a document when too little, or too much, is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
from nemo_curator.stages.text.utils.constants import policy_substrings

from mmllm.curation.base import CurationStage

COUNTER_WORDS = ("likes?", "shares?", "comments?", "views?", "followers?", "following", "retweets?",
                 "repl(?:y|ies)", "reviews?", "votes?", "points?", "subscribers?", "reads?",
                 "items? in (?:your )?cart", "reactions?", "downloads?")
START_PATTERNS = ("sign in", "sign up", "log in", "login", "register", "subscribe", "share",
                  "tweet", "follow us", "skip to content", "skip to main content", "accept all",
                  "manage settings", "cookie settings", "back to top")
END_PATTERNS = ("read more", "read more...", "click here", "see more", "show more", "continue reading",
                "...")
ANYWHERE_PATTERNS = ("items in cart", "item in cart", "all rights reserved", "share on facebook",
                     "share on twitter", "share this", "uses cookies", "privacy policy",
                     "terms of use", "terms of service", "newsletter", "copyright ©", "©")
_COUNTER = re.compile(rf"^[\d.,]+\s*[kKmM]?\s+(?:{'|'.join(COUNTER_WORDS)})\.?$", re.IGNORECASE)
_NUMERIC = re.compile(r"^[\d\s.,:;%/+\-()$€£#]+$")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
C4_TERMINAL = (".", "!", "?", '"', "\u201d")


@dataclass(kw_only=True)
class RefinedWebLineFilterStage(CurationStage):
    """RefinedWeb line-wise corrections (Penedo et al., 2023, appendix G.2).

    A line is removed when it is mainly upper case, only numerical, a counter ("12 likes"), a
    single word, or short (<= ``max_short_line_words`` words) and starts, ends or contains a
    boilerplate pattern ("Sign in", "Read more", "items in cart"); for the short lines the pattern
    is cut out and the line removed only if nothing else is left. The document is dropped when
    the removed words exceed ``max_removed_fraction`` of its words.

    Args:
        name: Stage name.
        max_uppercase_fraction: A line with more upper-case letters than this fraction is removed.
        max_short_line_words: Lines up to this many words are checked against the patterns.
        max_removed_fraction: Drop the document above this fraction of removed words.
        start_patterns: Patterns matched at a line's start (case-insensitive).
        end_patterns: Patterns matched at a line's end.
        anywhere_patterns: Patterns matched anywhere.
    """

    name: str = "refinedweb_lines"
    max_uppercase_fraction: float = 0.5
    max_short_line_words: int = 10
    max_removed_fraction: float = 0.05
    start_patterns: list[str] = field(default_factory=lambda: list(START_PATTERNS))
    end_patterns: list[str] = field(default_factory=lambda: list(END_PATTERNS))
    anywhere_patterns: list[str] = field(default_factory=lambda: list(ANYWHERE_PATTERNS))

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_removed_fraction <= 1.0:
            msg = f"max_removed_fraction must be in [0, 1], got {self.max_removed_fraction}"
            raise ValueError(msg)
        alt = lambda ps: "|".join(re.escape(p) for p in sorted(ps, key=len, reverse=True))
        self._start = re.compile(rf"^\s*(?:{alt(self.start_patterns)})\b\W*", re.IGNORECASE)
        self._end = re.compile(rf"\W*(?:{alt(self.end_patterns)})\W*$", re.IGNORECASE)
        self._anywhere = re.compile(rf"(?:{alt(self.anywhere_patterns)})", re.IGNORECASE)

    def discard_line(self, line: str) -> bool:
        """Whether a whole line is removed (upper case, numeric, counter or single word)."""
        s = line.strip()
        letters = [c for c in s if c.isalpha()]
        if letters and sum(c.isupper() for c in letters) / len(letters) > self.max_uppercase_fraction:
            return True
        return bool(_NUMERIC.match(s) or _COUNTER.match(s) or len(s.split()) == 1)

    def edit_line(self, line: str) -> str:
        """Cut boilerplate patterns out of a short line (returns it unchanged when long)."""
        if len(line.split()) > self.max_short_line_words:
            return line
        for rx in (self._start, self._end, self._anywhere):
            line = rx.sub(" ", line)
        return " ".join(line.split())

    def correct(self, text: str) -> tuple[str, int, int]:
        """Apply the corrections to one document.

        Returns:
            ``(new_text, removed_words, total_words)``.
        """
        kept, removed, total = [], 0, 0
        for line in text.split("\n"):
            n = len(line.split())
            total += n
            if n == 0:
                kept.append(line)
                continue
            new = "" if self.discard_line(line) else self.edit_line(line)
            removed += n - len(new.split())
            if any(c.isalnum() for c in new):
                kept.append(new)
        out = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        return out, removed, total

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        texts, reasons = [], []
        for text in df[self.text_field]:
            new, removed, total = self.correct(text)
            texts.append(new)
            if not new:
                reasons.append("all_lines_removed")
            elif total and removed / total > self.max_removed_fraction:
                reasons.append("too_many_lines_removed")
            else:
                reasons.append(None)
        df[self.text_field] = texts
        return pd.Series(reasons, index=df.index, dtype=object)


@dataclass(kw_only=True)
class C4FilterStage(CurationStage):
    """The C4 rules (Raffel et al., 2020) as an option.

    Lines are kept only if they end with terminal punctuation, have at least
    ``min_words_per_line`` words and mention neither "javascript" nor a cookie/policy phrase
    (NeMo Curator's ``policy_substrings``); documents are dropped for "lorem ipsum", a curly
    bracket, a bad word, fewer than ``min_sentences`` sentences left, or a word longer than
    ``max_word_length``.

    Args:
        name: Stage name.
        min_words_per_line: Shorter lines are removed.
        min_sentences: Documents with fewer sentences left are dropped.
        max_word_length: Documents with a longer word are dropped.
        bad_words: Documents containing any of these words are dropped (empty = no check).
    """

    name: str = "c4"
    min_words_per_line: int = 5
    min_sentences: int = 3
    max_word_length: int = 1000
    bad_words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._bad = (re.compile(r"\b(?:" + "|".join(map(re.escape, self.bad_words)) + r")\b", re.IGNORECASE)
                     if self.bad_words else None)

    def keep_line(self, line: str) -> bool:
        """C4's line rule."""
        s = line.strip()
        low = s.lower()
        return (s.endswith(C4_TERMINAL) and len(s.split()) >= self.min_words_per_line
                and "javascript" not in low and not any(p in low for p in policy_substrings))

    def document_reason(self, text: str) -> str | None:
        """C4's document rules on the original text (``None`` keeps it)."""
        low = text.lower()
        if "lorem ipsum" in low:
            return "c4_lorem_ipsum"
        if "{" in text:
            return "c4_curly_bracket"
        if self._bad is not None and self._bad.search(text):
            return "c4_bad_words"
        if any(len(w) > self.max_word_length for w in text.split()):
            return "c4_long_word"
        return None

    def drop_reasons(self, df: pd.DataFrame) -> pd.Series:
        texts, reasons = [], []
        for text in df[self.text_field]:
            reason = self.document_reason(text)
            new = "\n".join(ln.strip() for ln in text.split("\n") if self.keep_line(ln))
            if reason is None and len(_SENTENCE_END.findall(new)) < self.min_sentences:
                reason = "c4_too_few_sentences"
            texts.append(new if reason is None else text)
            reasons.append(reason)
        df[self.text_field] = texts
        return pd.Series(reasons, index=df.index, dtype=object)

"""Metrics and answer extraction: acc / acc_norm, exact and normalised match, F1, pass@k.

``acc`` and ``acc_norm`` follow lm-eval's ``ConfigurableTask.process_results`` for
``multiple_choice``: ``acc`` is ``argmax(lls) == gold``; ``acc_norm`` divides each choice's
log-likelihood by the *character* length of the choice string (not tokens) before the argmax;
ties go to the first choice (``np.argmax``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def multiple_choice_scores(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice example, as lm-eval computes them.

    Args:
        lls: log-likelihood of each choice's continuation.
        choices: the choice strings (their character length normalises ``acc_norm``).
        gold: index of the correct choice.

    Returns:
        ``{"acc": 0/1, "acc_norm": 0/1, "pred": argmax, "pred_norm": argmax_norm}``.
    """
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    pred, pred_norm = int(np.argmax(lls_arr)), int(np.argmax(lls_arr / lengths))
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold),
            "pred": pred, "pred_norm": pred_norm}


# ------------------------------------------------------------------------------ normalisation
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_number(text: str) -> str:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"18.0"`` -> ``"18"``; non-numbers are stripped only."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return t
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_math(text: str) -> str:
    """A light LaTeX answer normalisation (Hendrycks et al.'s MATH): spacing and markup removed."""
    t = text.strip().strip("$")
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\$", ""), ("\\%", ""), ("%", ""), ("\\text{ }", "")):
        t = t.replace(old, new)
    t = re.sub(r"\\text\{(.*?)\}", r"\1", t)
    t = t.replace(" ", "")
    if t.startswith("."):
        t = "0" + t
    return normalize_number(t) if re.fullmatch(r"-?[\d,]*\.?\d+", t) else t


# --------------------------------------------------------------------------------- extraction
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> str:
    """GSM8K / MGSM: the number after ``####`` if present, else the last number in the text.

    Returns:
        The normalised number (see :func:`normalize_number`), or "" when the text has none.
    """
    if "####" in text:
        found = _NUMBER.findall(text.split("####", 1)[1])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else ""


def extract_boxed(text: str) -> str:
    """MATH: the content of the last ``\\boxed{...}`` (braces matched), else the last ``$...$``."""
    start = text.rfind("\\boxed")
    if start < 0:
        found = re.findall(r"\$([^$]+)\$", text)
        return found[-1].strip() if found else text.strip()
    i = text.find("{", start)
    if i < 0:  # "\boxed 5"
        return text[start + len("\\boxed"):].strip().split()[0] if text[start + 6:].strip() else ""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return text[i + 1:].strip()


def extract_answer_phrase(text: str) -> str:
    """BBH chain-of-thought: the text after the last "the answer is", else the first line."""
    m = re.findall(r"answer is:?\s*(.+?)(?:\.\s*$|\.\n|\n|$)", text, flags=re.IGNORECASE)
    if m:
        return m[-1].strip()
    return text.strip().split("\n")[0].strip()


def first_line(text: str) -> str:
    """Short-answer QA (NQ, TriviaQA, TyDiQA): the first non-empty line of the generation."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


# ------------------------------------------------------------------------------------ scoring
def exact_match(pred: str, refs: Sequence[str]) -> float:
    """1.0 when ``pred`` equals any reference after stripping surrounding whitespace."""
    return float(any(pred.strip() == r.strip() for r in refs))


def normalized_match(pred: str, refs: Sequence[str], normalize=normalize_answer) -> float:
    """1.0 when ``normalize(pred)`` equals any ``normalize(ref)``."""
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def token_f1(pred: str, refs: Sequence[str]) -> float:
    """SQuAD token F1 of ``pred`` against the best-matching reference."""
    best = 0.0
    p = normalize_answer(pred).split()
    for ref in refs:
        r = normalize_answer(ref).split()
        common = sum((Counter(p) & Counter(r)).values())
        if not p or not r:
            best = max(best, float(p == r))
        elif common:
            prec, rec = common / len(p), common / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    Args:
        n: samples drawn for a problem.
        c: samples that passed.
        k: the k of pass@k (needs ``k <= n``).

    Returns:
        The probability that at least one of k samples drawn without replacement passes.
    """
    if not 0 <= c <= n or k > n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # Numerically stable product form of the ratio of binomials.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

"""Preference rows on disk -> ranked response lists (:class:`Ranked`), with ``file:line``.

Formats (``format:`` of a source, or ``auto``: detected per row from its keys):

    pairs          ``{"prompt", "chosen", "rejected"}``; prompt a string or OpenAI messages;
                   chosen/rejected strings (or message lists ending in the assistant turn)
    hh             Anthropic HH-RLHF: ``{"chosen", "rejected"}`` full transcripts of
                   ``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."`` turns; the shared turns are
                   the prompt, the two final assistant turns the responses
    ranked         ``{"prompt", "responses": [...]}`` with ``"ranks"`` (rank of each response,
                   0 = best, equal = tie), ``"ranking"`` (response indices, best first),
                   ``"scores"`` (higher = better) or none of them (responses best first)
    stackexchange  preference-model pretraining (PMP): ``{"question", "answers": [{"text",
                   "score" | "pm_score", "accepted"}]}``; Anthropic's rule turns votes into a
                   score (:func:`anthropic_se_score`), answers with different scores form pairs
    reddit         PMP: ``{"title"/"post", "body"/"selftext", "comments": [{"body", "score"}]}``;
                   comments with different scores form pairs (higher preferred)

Every row becomes one :class:`Ranked`: a prompt (messages) and K >= 2 responses with ranks; the
K-wise loss (:func:`mmllm.losses.ranking.ranking_loss`) takes all pairs of different rank.
:func:`synthetic_preferences` writes a small learnable preference set for tests and demos.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmllm.data.conversations import BadRowError, files_of, read_rows

FORMATS = ("auto", "pairs", "hh", "ranked", "stackexchange", "reddit")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass
class Ranked:
    """One prompt and its ranked responses.

    Attributes:
        prompt: OpenAI-style messages ending with a user (or tool) turn.
        responses: K >= 2 assistant responses.
        ranks: rank of each response, 0 = best; equal ranks are ties (no pair between them).
        where: ``file:line`` of the row.
    """

    prompt: list[dict]
    responses: list[str]
    ranks: list[int]
    where: str = ""

    def __post_init__(self) -> None:
        if len(self.responses) < 2 or len(self.ranks) != len(self.responses):
            raise BadRowError(f"need >= 2 responses with one rank each, got {len(self.responses)} "
                              f"responses and {len(self.ranks)} ranks")
        if len(set(self.ranks)) < 2:
            raise BadRowError("every response has the same rank: no preference to learn")
        for r in self.responses:
            if not isinstance(r, str) or not r.strip():
                raise BadRowError(f"a response must be a non-empty string, got {r!r:.60}")


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """Ranks from scores, higher = better: the best score gets 0, equal scores share a rank."""
    order = sorted(set(scores), reverse=True)
    return [order.index(s) for s in scores]


def anthropic_se_score(votes: int, accepted: bool = False) -> int:
    """Anthropic's StackExchange PMP score (Askell et al. 2021, sec. 4.2): ``round(log2(1 +
    votes))``, +1 for the accepted answer; -1 for answers with negative votes."""
    if votes < 0:
        return -1
    return round(math.log2(1 + votes)) + int(bool(accepted))


# --------------------------------------------------------------------------------- formats
def _prompt(value) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise BadRowError("empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return [dict(m) for m in value]
    raise BadRowError(f"prompt must be a string or a list of messages, got {type(value).__name__}")


def _response(value) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], Mapping):
        if value[-1].get("role") != "assistant":  # TRL's conversational format
            raise BadRowError("a response given as messages must end with an assistant turn")
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise BadRowError(f"a response must be a string, got {type(value).__name__}")
    return value


def split_hh(transcript: str) -> tuple[list[dict], str]:
    """``(prompt messages, final assistant response)`` of an HH-RLHF transcript."""
    if not isinstance(transcript, str) or ASSISTANT not in transcript:
        raise BadRowError("an HH transcript must be a string with an '\\n\\nAssistant:' turn")
    turns, rest = [], transcript
    while rest:
        h, a = rest.find(HUMAN), rest.find(ASSISTANT)
        starts = [(i, tag) for i, tag in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, tag = min(starts)
        if i > 0 and rest[:i].strip():
            if not turns:
                raise BadRowError("text before the first Human/Assistant turn")
            turns[-1]["content"] += rest[:i]
        rest = rest[i + len(tag):]
        nxt = [j for j in (rest.find(HUMAN), rest.find(ASSISTANT)) if j >= 0]
        end = min(nxt) if nxt else len(rest)
        turns.append({"role": "user" if tag == HUMAN else "assistant", "content": rest[:end].strip()})
        rest = rest[end:]
    if not turns or turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise BadRowError("an HH transcript must end with an Assistant turn after a Human turn")
    return turns[:-1], turns[-1]["content"]


def parse_pairs(row: Mapping) -> Ranked:
    return Ranked(_prompt(row["prompt"]), [_response(row["chosen"]), _response(row["rejected"])], [0, 1])


def parse_hh(row: Mapping) -> Ranked:
    p_chosen, chosen = split_hh(row["chosen"])
    p_rejected, rejected = split_hh(row["rejected"])
    if p_chosen != p_rejected:
        raise BadRowError("chosen and rejected transcripts do not share their prompt turns")
    return Ranked(p_chosen, [chosen, rejected], [0, 1])


def parse_ranked(row: Mapping) -> Ranked:
    responses = [_response(r) for r in row["responses"]]
    K = len(responses)
    if "ranks" in row:
        ranks = [int(r) for r in row["ranks"]]
    elif "ranking" in row:
        order = [int(i) for i in row["ranking"]]
        if sorted(order) != list(range(K)):
            raise BadRowError(f"'ranking' must be a permutation of 0..{K - 1}, got {order}")
        ranks = [order.index(i) for i in range(K)]
    elif "scores" in row:
        ranks = dense_ranks([float(s) for s in row["scores"]])
    else:
        ranks = list(range(K))
    if len(ranks) != K:
        raise BadRowError(f"{len(ranks)} ranks for {K} responses")
    return Ranked(_prompt(row["prompt"]), responses, ranks)


def _scored(prompt: list[dict], items: list[tuple[str, float]], max_responses: int | None) -> Ranked:
    items = [(t, s) for t, s in items if isinstance(t, str) and t.strip()]
    if max_responses and len(items) > max_responses:
        # Keep the spread of scores: the best and worst, then alternate inward.
        items = sorted(items, key=lambda x: -x[1])
        keep = [items[i // 2] if i % 2 == 0 else items[-(i // 2) - 1] for i in range(max_responses)]
        items = keep
    return Ranked(prompt, [t for t, _ in items], dense_ranks([s for _, s in items]))


def parse_stackexchange(row: Mapping, *, score_rule: str = "anthropic",
                        max_responses: int | None = None) -> Ranked:
    question = row.get("question") or row.get("prompt") or \
        "\n\n".join(str(row[k]) for k in ("title", "body") if row.get(k))
    items = []
    for a in row["answers"]:
        if not isinstance(a, Mapping):
            raise BadRowError("every answer must be an object with 'text' and 'score'")
        text = a.get("text", a.get("body"))
        if "pm_score" in a:  # already converted (HuggingFaceH4/stack-exchange-preferences)
            score = float(a["pm_score"])
        elif score_rule == "anthropic":
            score = anthropic_se_score(int(a["score"]), bool(a.get("accepted", a.get("selected"))))
        else:
            score = float(a["score"])
        items.append((text, score))
    return _scored(_prompt(question), items, max_responses)


def parse_reddit(row: Mapping, *, max_responses: int | None = None) -> Ranked:
    title = row.get("title") or row.get("post") or row.get("prompt") or ""
    body = row.get("selftext") or row.get("body") or ""
    post = f"{title}\n\n{body}".strip() if body else str(title)
    items = []
    for c in row["comments"]:
        if not isinstance(c, Mapping):
            raise BadRowError("every comment must be an object with 'body' and 'score'")
        items.append((c.get("body", c.get("text")), float(c["score"])))
    return _scored(_prompt(post), items, max_responses)


def detect_format(row: Mapping) -> str:
    if "responses" in row:
        return "ranked"
    if "answers" in row:
        return "stackexchange"
    if "comments" in row:
        return "reddit"
    if "prompt" in row and ("chosen" in row or "rejected" in row):
        return "pairs"
    if "chosen" in row and "rejected" in row:
        return "hh"
    raise BadRowError(f"unknown preference row format (keys {sorted(row)[:8]}): expected "
                      "prompt/chosen/rejected, chosen/rejected transcripts, prompt/responses, "
                      "question/answers or post/comments")


def parse_row(row, fmt: str = "auto", **options) -> Ranked:
    """One row as :class:`Ranked` (``options``: ``score_rule``, ``max_responses`` for PMP).

    Raises:
        BadRowError: the row is malformed (missing keys, wrong types, no preference).
    """
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, Mapping):
        raise BadRowError(f"a row must be a JSON object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    pmp = {k: v for k, v in options.items() if v is not None}
    try:
        if fmt == "pairs":
            return parse_pairs(row)
        if fmt == "hh":
            return parse_hh(row)
        if fmt == "ranked":
            return parse_ranked(row)
        if fmt == "stackexchange":
            return parse_stackexchange(row, **pmp)
        if fmt == "reddit":
            return parse_reddit(row, max_responses=pmp.get("max_responses"))
    except KeyError as e:
        raise BadRowError(f"{fmt} row without key {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, BadRowError):
            raise
        raise BadRowError(f"{fmt} row: {e}") from None
    raise ValueError(f"unknown preference format {fmt!r}: expected one of {FORMATS}")


def read_preference_rows(path: str | Sequence[str]) -> Iterator[tuple[str, object]]:
    """``(where, row)`` of JSONL / JSONL.gz / Parquet files (see :func:`mmllm.data.conversations.read_rows`)
    and ``.json`` files holding a list of rows (``where`` = ``file:item i``)."""
    for f in files_of(path):
        if f.suffix != ".json":
            yield from read_rows(str(f))
            continue
        try:
            items = json.loads(Path(f).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            yield f"{f}:{e.lineno}", BadRowError(f"bad JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(items, list):
            yield f"{f}:1", BadRowError("a .json preference file must hold a list of rows")
            continue
        for i, row in enumerate(items):
            yield f"{f}:item {i}", row


# ------------------------------------------------------------------------------ synthetic set
SYNTH_WORDS = ("river", "stone", "garden", "window", "market", "tower", "boat", "cloud", "paper",
               "lamp", "field", "bridge")
SYNTH_GOOD = "kind"


def synthetic_preferences(path: str | Path, *, num_prompts: int = 256, k: int = 2,
                          words_per_response: int = 8, seed: int = 0) -> Path:
    """Writes a learnable preference set: responses with more ``"kind"`` words rank higher.

    Every prompt ("Describe the <w> and the <w>.") has ``k`` responses of random words in which
    the word "kind" appears a different number of times (0..k-1 times); the ranks follow that
    count. A tiny reward model learns it in a few dozen steps (it must count one token), while a
    model that ignores the responses stays at chance.

    Args:
        path: the JSONL file to write (``pairs`` rows for k = 2, ``ranked`` rows otherwise).
        num_prompts, k, words_per_response, seed: the set's size and shape.

    Returns:
        ``path``.
    """
    if not 2 <= k <= words_per_response:
        raise ValueError(f"k must be in [2, words_per_response], got k={k}")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_prompts):
            prompt = f"Describe the {rng.choice(SYNTH_WORDS)} and the {rng.choice(SYNTH_WORDS)}."
            counts = rng.sample(range(k), k)
            responses = []
            for c in counts:
                words = [rng.choice(SYNTH_WORDS) for _ in range(words_per_response - c)]
                for _ in range(c):
                    words.insert(rng.randrange(len(words) + 1), SYNTH_GOOD)
                responses.append(" ".join(words))
            ranks = [k - 1 - c for c in counts]  # most "kind" words = rank 0
            if k == 2:
                best = ranks.index(0)
                row = {"prompt": prompt, "chosen": responses[best], "rejected": responses[1 - best]}
            else:
                row = {"prompt": prompt, "responses": responses, "ranks": ranks}
            f.write(json.dumps(row) + "\n")
    return path

"""Pair selection for a labelling round: which comparisons are worth a labeller's time.

From K sampled responses per prompt, every pair of distinct responses is a candidate. Candidates
are ordered by how much a label would teach the reward model:

* ``uncertainty`` (one reward model): the Bradley-Terry preference ``p = σ(r_a − r_b)``; pairs
  with ``|p − 0.5|`` smallest come first (the model cannot tell them apart).
* ``disagreement`` (an ensemble of reward models): the standard deviation of ``p`` across the
  members; pairs the members disagree on come first.
* ``random``: a seeded shuffle (round 0, before any reward model exists).

Identical responses (after whitespace normalisation) are de-duplicated before pairing, empty
ones dropped; both are counted. A per-prompt cap spreads the budget across prompts.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Scorer = Callable[[list[str], list[str]], list[float]]  # score(prompts, responses) -> rewards
Sampler = Callable[[list[str], int], list[list[str]]]  # sample(prompts, n) -> n responses each
STRATEGIES = ("uncertainty", "disagreement", "random")


@dataclass
class Candidate:
    """A candidate comparison.

    Attributes:
        prompt, response_a, response_b: the comparison (sides shuffled, seeded).
        scores_a, scores_b: each scorer's reward of the two responses (empty under ``random``).
        priority: smaller is asked first (``|p - 0.5|``, ``-std(p)`` or a random draw).
    """

    prompt: str
    response_a: str
    response_b: str
    scores_a: list[float] = field(default_factory=list)
    scores_b: list[float] = field(default_factory=list)
    priority: float = 0.0

    def meta(self) -> dict:
        """What the label store keeps with the comparison."""
        return {"scores_a": self.scores_a, "scores_b": self.scores_b, "priority": self.priority}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _normalise(text: str) -> str:
    return " ".join(text.split())


def unique_responses(responses: Sequence[str]) -> tuple[list[str], int, int]:
    """Distinct non-empty responses in first-seen order; also ``(duplicates, empty)`` counts."""
    seen: dict[str, str] = {}
    dup = empty = 0
    for r in responses:
        key = _normalise(r)
        if not key:
            empty += 1
        elif key in seen:
            dup += 1
        else:
            seen[key] = r
    return list(seen.values()), dup, empty


def _score_all(scorers: Sequence[Scorer], items: list[tuple[str, str]]) -> list[list[float]]:
    """``scores[m][i]``: reward of scorer m for (prompt, response) i, checked for length and NaN."""
    prompts, responses = [p for p, _ in items], [r for _, r in items]
    out = []
    for m, score in enumerate(scorers):
        s = [float(x) for x in score(prompts, responses)]
        if len(s) != len(items):
            raise ValueError(f"scorer {m} returned {len(s)} scores for {len(items)} responses")
        if any(math.isnan(x) for x in s):
            raise ValueError(f"scorer {m} returned NaN rewards")
        out.append(s)
    return out


def select_pairs(prompts: Sequence[str], samples: Sequence[Sequence[str]], *, budget: int,
                 strategy: str = "uncertainty", scorers: Sequence[Scorer] = (),
                 max_pairs_per_prompt: int | None = 2, seed: int = 0) -> tuple[list[Candidate], dict]:
    """Chooses up to ``budget`` comparisons to label.

    Args:
        prompts: the prompts; ``samples[i]`` are the policy's responses to ``prompts[i]``.
        budget: comparisons to return at most.
        strategy: ``uncertainty`` (needs one scorer), ``disagreement`` (needs two or more) or
            ``random``.
        scorers: reward models as ``score(prompts, responses) -> rewards``.
        max_pairs_per_prompt: at most this many comparisons per prompt (None: no cap).
        seed: seeds the A/B side shuffle and the ``random`` order.

    Returns:
        ``(candidates, stats)``: the comparisons, most informative first, and counts
        (``candidates``, ``duplicates``, ``empty``, ``prompts_without_pair``, ``selected``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "uncertainty" and len(scorers) != 1:
        raise ValueError(f"strategy 'uncertainty' needs exactly one scorer, got {len(scorers)}")
    if strategy == "disagreement" and len(scorers) < 2:
        raise ValueError(f"strategy 'disagreement' needs an ensemble of >= 2 scorers, got {len(scorers)}")
    if len(prompts) != len(samples):
        raise ValueError(f"{len(prompts)} prompts but {len(samples)} sample lists")
    rng = random.Random(seed)
    stats = {"duplicates": 0, "empty": 0, "prompts_without_pair": 0}
    pairs: list[tuple[int, str, str]] = []  # (prompt index, a, b)
    for i, responses in enumerate(samples):
        unique, dup, empty = unique_responses(responses)
        stats["duplicates"] += dup
        stats["empty"] += empty
        if len(unique) < 2:
            stats["prompts_without_pair"] += 1
        for a, b in itertools.combinations(unique, 2):
            pairs.append((i, *((a, b) if rng.random() < 0.5 else (b, a))))
    stats["candidates"] = len(pairs)
    cands = _prioritise(prompts, pairs, strategy, scorers if strategy != "random" else (), rng)
    chosen, per_prompt = [], {}
    for c in sorted(cands, key=lambda c: c.priority):  # stable: ties keep sampling order
        if max_pairs_per_prompt is not None and per_prompt.get(c.prompt, 0) >= max_pairs_per_prompt:
            continue
        per_prompt[c.prompt] = per_prompt.get(c.prompt, 0) + 1
        chosen.append(c)
        if len(chosen) >= budget:
            break
    stats["selected"] = len(chosen)
    return chosen, stats


def _prioritise(prompts: Sequence[str], pairs: list[tuple[int, str, str]], strategy: str,
                scorers: Sequence[Scorer], rng: random.Random) -> list[Candidate]:
    """Candidates with their scores and priority (each distinct response scored once)."""
    if strategy == "random":
        return [Candidate(prompts[i], a, b, priority=rng.random()) for i, a, b in pairs]
    items = list(dict.fromkeys((prompts[i], r) for i, a, b in pairs for r in (a, b)))
    index = {item: j for j, item in enumerate(items)}
    scores = _score_all(scorers, items) if items else [[] for _ in scorers]
    out = []
    for i, a, b in pairs:
        ja, jb = index[(prompts[i], a)], index[(prompts[i], b)]
        ra, rb = [s[ja] for s in scores], [s[jb] for s in scores]
        probs = [sigmoid(x - y) for x, y in zip(ra, rb)]
        if strategy == "uncertainty":
            priority = abs(probs[0] - 0.5)
        else:  # disagreement: larger spread of the members' preferences first
            mean = sum(probs) / len(probs)
            priority = -math.sqrt(sum((p - mean) ** 2 for p in probs) / len(probs))
        out.append(Candidate(prompts[i], a, b, ra, rb, priority))
    return out

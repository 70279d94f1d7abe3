"""GLM's autoregressive blank infilling (Du et al., 2022, section 2.1), as pure tensor code.

A sequence ``x`` of T tokens becomes

* **Part A**: ``x`` with k spans (lengths ~ Poisson(λ), ~``mask_ratio`` of the tokens in all)
  each replaced by one ``[MASK]`` token;
* **Part B**: the spans in random order, each as ``[START] s_1 .. s_n`` predicting
  ``s_1 .. s_n [END]``.

Two position ids per token (the paper's 2D positions): position 1 is the index in Part A (for a
Part B token: the index of its span's ``[MASK]``), position 2 is 0 in Part A and 1..n+1 inside a
span. Attention: Part A sees all of Part A (bidirectional), Part B sees Part A and the Part B
tokens up to itself (causal). Rows are right-padded to the longest; padding attends to itself
only and has no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class InfillBatch:
    """One corrupted batch (all (B, T') except ``allowed``: (B, T', T'))."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    block_position_ids: torch.Tensor
    labels: torch.Tensor
    allowed: torch.Tensor  # bool: query i may attend key j
    part_a_len: torch.Tensor  # (B,)


def sample_spans(n_tokens: int, rng: np.random.Generator, *, mask_ratio: float,
                 poisson_lambda: float) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, end)`` spans covering about ``mask_ratio`` of ``n_tokens``."""
    target = max(1, round(mask_ratio * n_tokens))
    lengths: list[int] = []
    while sum(lengths) < target:
        lengths.append(int(max(1, rng.poisson(poisson_lambda))))
    lengths[-1] -= sum(lengths) - target  # exactly the target (the last span may shrink)
    lengths = [n for n in lengths if n > 0]
    rng.shuffle(lengths)
    free = n_tokens - sum(lengths)
    while len(lengths) > 1 and free < len(lengths) - 1:  # too dense to keep spans apart: merge
        last = lengths.pop()
        lengths[-1] += last
    k = len(lengths)
    # k + 1 gaps of unmasked tokens around the k spans: a uniform composition of what is left
    # after one token between neighbouring spans (so two spans never merge into one).
    rest = free - (k - 1)
    bars = np.sort(rng.choice(rest + k, size=k, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars, [rest + k]])) - 1
    gaps[1:k] += 1
    spans, pos = [], 0
    for gap, n in zip(gaps, lengths):
        pos += int(gap)
        spans.append((pos, pos + n))
        pos += n
    return spans


def corrupt(ids: list[int] | np.ndarray, rng: np.random.Generator, *, mask_id: int, start_id: int,
            end_id: int, mask_ratio: float = 0.15, poisson_lambda: float = 3.0,
            ) -> tuple[list[int], list[int], list[int], list[int], int]:
    """One sequence -> ``(input_ids, position_ids, block_position_ids, labels, part_a_len)``."""
    ids = [int(t) for t in ids]
    spans = sample_spans(len(ids), rng, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda)
    part_a, mask_pos, prev = [], [], 0
    for s, e in spans:
        part_a += ids[prev:s]
        mask_pos.append(len(part_a))
        part_a.append(mask_id)
        prev = e
    part_a += ids[prev:]
    inp, pos1, pos2 = list(part_a), list(range(len(part_a))), [0] * len(part_a)
    labels = [IGNORE_INDEX] * len(part_a)
    for j in rng.permutation(len(spans)):
        s, e = spans[j]
        span = ids[s:e]
        inp += [start_id, *span]
        pos1 += [mask_pos[j]] * (len(span) + 1)
        pos2 += list(range(1, len(span) + 2))
        labels += [*span, end_id]
    return inp, pos1, pos2, labels, len(part_a)


def blank_infilling_batch(input_ids: torch.Tensor, rng: np.random.Generator, *, mask_id: int,
                          start_id: int, end_id: int, pad_id: int = 0, mask_ratio: float = 0.15,
                          poisson_lambda: float = 3.0) -> InfillBatch:
    """Corrupts every row of ``input_ids`` (B, T) and pads the results into one batch."""
    rows = [corrupt(r, rng, mask_id=mask_id, start_id=start_id, end_id=end_id, mask_ratio=mask_ratio,
                    poisson_lambda=poisson_lambda) for r in input_ids.tolist()]
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    out = {k: torch.full((B, T), v, dtype=torch.long) for k, v in
           (("input_ids", pad_id), ("position_ids", 0), ("block_position_ids", 0),
            ("labels", IGNORE_INDEX))}
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    a_len = torch.zeros(B, dtype=torch.long)
    for b, (inp, p1, p2, lab, a) in enumerate(rows):
        n = len(inp)
        for k, v in zip(("input_ids", "position_ids", "block_position_ids", "labels"), (inp, p1, p2, lab)):
            out[k][b, :n] = torch.tensor(v)
        allowed[b, :n, :a] = True  # everyone sees Part A
        allowed[b, a:n, a:n] = torch.ones(n - a, n - a, dtype=torch.bool).tril()  # causal Part B
        allowed[b, torch.arange(n, T), torch.arange(n, T)] = True  # padding sees itself
        a_len[b] = a
    dev = input_ids.device
    return InfillBatch(**{k: v.to(dev) for k, v in out.items()}, allowed=allowed.to(dev),
                       part_a_len=a_len.to(dev))

"""Packing SFT examples into fixed-length rows: best-fit decreasing, isolated documents.

An example is a pair of equal-length int arrays ``(input_ids, labels)`` (labels already aligned
with the inputs: ``labels[t]`` is the target of position t, -100 where unsupervised, see
:meth:`mmllm.data.chat.RenderedChat.labels`). Packing places several examples in one row of at
most ``max_len`` tokens; each keeps its own document id, so attention stays inside it
(``doc_ids`` in :mod:`mmllm.nn.attention`) and positions restart at 0
(:func:`mmllm.models.decoder_lm.positions_from_docs`, also returned as ``position_ids``). Because
labels never cross an example boundary, a packed batch computes exactly the per-token losses of
the same examples batched one per row with padding: with the loss averaged over the supervised
tokens of the whole batch, loss and gradients are the same (tests/unit/test_packing.py).

Bins are filled by best-fit decreasing (longest example first, each into the fullest row it
fits), which for SFT length distributions leaves a few percent of padding against the 40-70 % of
padding to the longest example in a batch (benchmarks/sft_packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sortedcontainers import SortedList

from mmllm.losses.lm import IGNORE_INDEX

OVERLONG = ("truncate", "drop")
Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels), both (n,)


@dataclass
class PackingStats:
    """What fitting and packing did to a set of examples.

    Attributes:
        examples: examples kept.
        truncated: examples cut to ``max_len``.
        dropped: reason -> examples dropped ("overlong", "unsupervised_after_truncation").
        rows: packed rows (or padded rows when not packing).
        tokens: real tokens in those rows.
        capacity: ``rows * max_len`` (the padded size of the rows).
    """

    examples: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    tokens: int = 0
    capacity: int = 0

    @property
    def padding_fraction(self) -> float:
        """Share of row slots holding padding."""
        return 1.0 - self.tokens / self.capacity if self.capacity else 0.0

    def as_dict(self) -> dict:
        return {"examples": self.examples, "truncated": self.truncated, "dropped": dict(self.dropped),
                "rows": self.rows, "tokens": self.tokens,
                "padding_fraction": round(self.padding_fraction, 4)}


def fit_examples(examples: Sequence[Example], max_len: int, *, overlong: str = "truncate",
                 stats: PackingStats | None = None) -> list[Example]:
    """Examples of at most ``max_len`` tokens: longer ones truncated or dropped (counted).

    A truncated example keeps its first ``max_len`` positions; one left without a supervised
    label is dropped (counted as "unsupervised_after_truncation").
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    stats = stats if stats is not None else PackingStats()
    out = []
    for ids, labels in examples:
        if len(ids) != len(labels):
            raise ValueError(f"an example has {len(ids)} input ids but {len(labels)} labels")
        if len(ids) > max_len:
            if overlong == "drop":
                stats.dropped["overlong"] = stats.dropped.get("overlong", 0) + 1
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            if not (labels != IGNORE_INDEX).any():
                key = "unsupervised_after_truncation"
                stats.dropped[key] = stats.dropped.get(key, 0) + 1
                continue
            stats.truncated += 1
        out.append((ids, labels))
    stats.examples += len(out)
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to at most ``capacity`` (best-fit decreasing).

    Items are placed longest first (ties by index, so the result is deterministic) into the open
    bin with the least room that still fits them, else a new bin. O(n log n).

    Args:
        lengths: item sizes, each in ``[1, capacity]``.
        capacity: bin size.

    Returns:
        Bins in creation order; within a bin, items in placement order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = SortedList()  # (room left, bin index) of bins that are not full
    bins: list[list[int]] = []
    for i in order:
        size = int(lengths[i])
        if not 0 < size <= capacity:
            raise ValueError(f"item {i} has size {size}, outside [1, {capacity}]")
        j = free.bisect_left((size, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            free.add((room - size, b))
    return bins


def pack(examples: Sequence[Example], max_len: int, *,
         stats: PackingStats | None = None) -> list[list[int]]:
    """Rows (lists of example indices) of at most ``max_len`` tokens; counts them in ``stats``."""
    lengths = [len(ids) for ids, _ in examples]
    rows = best_fit_decreasing(lengths, max_len)
    if stats is not None:
        stats.rows += len(rows)
        stats.tokens += sum(lengths)
        stats.capacity += len(rows) * max_len
    return rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_packed(rows: Sequence[Sequence[Example]], *, pad_id: int, length: int | None = None,
                   pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """A batch of packed rows.

    Args:
        rows: each row a list of examples whose lengths sum to at most ``length``.
        pad_id: input id of padding (its labels are -100).
        length: row length T (default: the longest row rounded up to ``pad_to_multiple_of``).

    Returns:
        (B, T) int64 ``input_ids``, ``labels``, ``doc_ids`` (0, 1, ... per example of a row;
        trailing padding is one more document, so no real token attends to it) and
        ``position_ids`` (restarting at 0 in every document).
    """
    used = [sum(len(ids) for ids, _ in row) for row in rows]
    T = length if length is not None else _round_up(max(used), pad_to_multiple_of)
    if max(used) > T:
        raise ValueError(f"a row holds {max(used)} tokens, more than the row length {T}")
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.empty((B, T), dtype=np.int64)
    positions = np.empty((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for d, (ids, lab) in enumerate(row):
            n = len(ids)
            input_ids[b, pos:pos + n], labels[b, pos:pos + n] = ids, lab
            doc_ids[b, pos:pos + n], positions[b, pos:pos + n] = d, np.arange(n)
            pos += n
        doc_ids[b, pos:], positions[b, pos:] = len(row), np.arange(T - pos)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(doc_ids), "position_ids": torch.from_numpy(positions)}


def collate_padded(examples: Sequence[Example], *, pad_id: int,
                   pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the longest (rounded up to ``pad_to_multiple_of``).

    Returns:
        (B, T) int64 ``input_ids`` and ``labels`` (-100 on padding). Causal attention never lets
        a real token see the padding after it, so no mask is needed.
    """
    T = _round_up(max(len(ids) for ids, _ in examples), pad_to_multiple_of)
    input_ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)], labels[b, :len(ids)] = ids, lab
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}

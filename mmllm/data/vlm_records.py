"""The record primitives of the VLM readers: bad-sample errors and stats, image decoding,
LLaVA turns -> messages, ``<image>`` placeholder checks (see :mod:`mmllm.data.vlm_data`)."""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class BadSample(ValueError):
    """A sample that is skipped: ``reason`` is the stats key, ``where`` its path."""

    def __init__(self, reason: str, where: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {where}" + (f" ({detail})" if detail else ""))
        self.reason, self.where = reason, where


class ReadStats:
    """Counts of what a reader yielded and skipped, with the paths of the first bad samples.

    Attributes:
        counts: ``records`` yielded, and one key per skip reason (``bad_image``,
            ``missing_image``, ``bad_caption``, ``empty_caption``, ``placeholder_mismatch``,
            ``truncated_shard``, ...).
        examples: ``(reason, path, detail)`` of the first ``max_examples`` skips.
    """

    def __init__(self, *, max_examples: int = 20) -> None:
        self.counts: Counter = Counter()
        self.examples: list[tuple[str, str, str]] = []
        self.max_examples = max_examples

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((reason, where, detail))
        log.debug("skipped %s: %s %s", reason, where, detail)

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "records")

    def summary(self) -> str:
        """One line of counts, then the first bad paths."""
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if k != "records")
        lines = [f"{self.counts['records']} records, {self.skipped} skipped" + (f" ({parts})" if parts else "")]
        lines += [f"  {reason}: {where}" + (f" ({detail})" if detail else "")
                  for reason, where, detail in self.examples]
        return "\n".join(lines)

    def log_summary(self, name: str = "vlm data") -> None:
        level = logging.WARNING if self.skipped else logging.INFO
        log.log(level, "%s: %s", name, self.summary())


# --------------------------------------------------------------------------------- decoding
def decode_image(data: bytes | str | Path, *, where: str, max_pixels: int = 64_000_000) -> Image.Image:
    """A fully decoded RGB image from bytes or a file path.

    Raises:
        BadSample: ``missing_image`` (no such file) or ``bad_image`` (corrupt, truncated, not an
            image, or more than ``max_pixels`` pixels).
    """
    if not isinstance(data, bytes) and not os.path.isfile(data):
        raise BadSample("missing_image", where)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            if image.width * image.height > max_pixels:
                raise BadSample("bad_image", where, f"{image.width}x{image.height} > {max_pixels} pixels")
            image.load()  # decodes now: a truncated file fails here, not in the collate
            return image.convert("RGB")
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("bad_image", where, f"{type(e).__name__}: {e}") from e


def check_placeholders(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Messages with one ``<image>`` per image in user turns; none at all with one image gets it
    prepended to the first user turn (LLaVA's preprocessing). Raises BadSample on a mismatch."""
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if count == 0 and n_images == 1:
        i = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
        if i is not None:
            messages = [dict(m) for m in messages]
            messages[i]["content"] = f"{IMAGE_PLACEHOLDER}\n{messages[i]['content']}"
            count = 1
    if count != n_images:
        raise BadSample("placeholder_mismatch", where, f"{count} {IMAGE_PLACEHOLDER} for {n_images} images")
    return messages


def read_unit_items(samples: Iterable, decode: Callable, stats: ReadStats, skip: int) -> Iterator:
    """Decodes raw samples after the first ``skip`` (not decoded: a resume skips them cheaply)."""
    for i, sample in enumerate(samples):
        if i < skip:
            continue
        try:
            record = decode(sample)
        except BadSample as e:
            stats.skip(e.reason, e.where, str(e.__cause__ or ""))
            yield None
            continue
        stats.counts["records"] += 1
        yield record


def messages_from_turns(turns: list, where: str) -> list[dict]:
    """OpenAI messages from LLaVA turns (``from``/``value``) or messages (``role``/``content``)."""
    out = []
    for t in turns:
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower()) if isinstance(t, dict) else None
        content = (t.get("value", t.get("content")) if isinstance(t, dict) else None)
        if role is None or not isinstance(content, str):
            raise BadSample("bad_conversation", where, f"bad turn {t!r:.80}")
        out.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise BadSample("bad_conversation", where, "no assistant answer")
    return out

"""Image-text data for vision-language models: records, readers, a shard writer, bundled pairs.

A **record** is what every reader yields and the VLM collate consumes:

* captions: ``{"images": [PIL.Image.Image, ...], "caption": str, "id": str}``
* instructions: ``{"images": [...], "messages": [{"role", "content"}, ...], "id": str}``, where
  user content holds one ``<image>`` placeholder per image (the LLaVA convention).

Readers (**sources**) split their data into *units* (a webdataset tar shard; a block of JSON
entries) so DataLoader workers and data-parallel ranks each read their own units, and a
position (unit, sample within it) makes reading resumable
(:class:`mmllm.data.vlm_datamodule.VisionTextDataModule`). A source yields one item per raw
sample: the record, or None when the sample is bad. Bad samples (a corrupt, truncated or
missing image; an undecodable or empty caption; placeholders that do not match the images) are
counted and skipped with their path in a :class:`ReadStats`, never raised.

* :class:`WebDatasetSource`: LAION / COYO / CC-style tar shards (``jpg|png|webp`` + ``txt|json``
  per key), many shards by brace pattern or glob, any URL ``webdataset.gopen`` opens.
* :class:`CocoCaptionsSource`: COCO captions JSON (annotations + an images directory).
* :class:`LlavaInstructSource`: LLaVA instruction JSON (``conversations`` from human/gpt).
* :class:`RecordsSource`: in-memory records (:func:`skimage_pairs`, tests).
* :func:`write_webdataset`: records -> tar shards (for tests and for users).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from mmllm.data.vlm_records import (
    IMAGE_PLACEHOLDER,
    BadSample,
    ReadStats,
    check_placeholders,
    decode_image,
    messages_from_turns,
    read_unit_items,
)
from mmllm.data.vlm_samples import skimage_instructions, skimage_pairs

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_IMAGE_KEY = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png|webp)$")

__all__ = [
    "IMAGE_PLACEHOLDER",
    "BadSample",
    "CocoCaptionsSource",
    "LlavaInstructSource",
    "ReadStats",
    "RecordsSource",
    "WebDatasetSource",
    "decode_image",
    "expand_urls",
    "iter_records",
    "skimage_instructions",
    "skimage_pairs",
    "write_webdataset",
]


# ------------------------------------------------------------------------------ webdataset
def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns (``shards-{000000..000099}.tar``), globs or lists of them."""
    import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand.braceexpand(str(item)):
            local = "://" not in url and not url.startswith("pipe:")
            if local and glob.has_magic(url):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {url!r}")
                out += matches
            else:
                out.append(url)
    if not out:
        raise ValueError(f"no shards in {urls!r}")
    return out


class WebDatasetSource:
    """Image-text pairs (or instructions) from webdataset tar shards.

    Each sample is one key with image member(s) (``jpg``/``png``/``webp``, or ``0.jpg``,
    ``1.jpg``, ... for several) and ``txt`` (the caption) and/or ``json`` (``caption`` or
    ``text``; ``messages`` or LLaVA ``conversations`` for instructions; optional ``id``).

    Args:
        urls: shard paths/URLs: a brace pattern, a glob, or a list of them.
        max_pixels: larger images are skipped as bad.
        name: the source's name in logs.
    """

    def __init__(self, *, urls: str | Sequence[str], max_pixels: int = 64_000_000,
                 name: str = "webdataset") -> None:
        self.urls = expand_urls(urls)
        self.max_pixels, self.name = max_pixels, name

    def units(self) -> list[str]:
        return list(self.urls)

    def read_unit(self, unit: str, *, stats: ReadStats, skip: int = 0) -> Iterator[dict | None]:
        """One item per sample of shard ``unit`` after the first ``skip``."""
        return read_unit_items(self._samples(unit, stats), self._decode, stats, skip)

    def _samples(self, url: str, stats: ReadStats) -> Iterator[dict]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        def truncated(exn: Exception) -> bool:  # a broken tar ends its shard, never the run
            stats.skip("truncated_shard", url, f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}")
            return False

        try:
            stream = gopen(url)
        except Exception as e:  # noqa: BLE001 - missing file, failed pipe: the shard is skipped
            stats.skip("missing_shard", url, f"{type(e).__name__}: {e}")
            return
        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=truncated)
            yield from group_by_keys(files, handler=truncated)

    def _decode(self, sample: dict) -> dict:
        where = f"{sample['__url__']}:{sample['__key__']}"
        image_keys = sorted((k for k in sample if _IMAGE_KEY.match(k)),
                            key=lambda k: int(_IMAGE_KEY.match(k).group(1) or 0))
        if not image_keys:
            raise BadSample("missing_image", where)
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise BadSample("bad_caption", f"{where}.json") from e
            if not isinstance(meta, dict):
                raise BadSample("bad_caption", f"{where}.json", "not a JSON object")
        images = [decode_image(sample[k], where=f"{where}.{k}", max_pixels=self.max_pixels)
                  for k in image_keys]
        rid = str(meta.get("id") or f"{os.path.basename(sample['__url__'])}/{sample['__key__']}")
        turns = meta.get("messages") or meta.get("conversations")
        if turns and "txt" not in sample:
            messages = messages_from_turns(turns, where)
            return {"images": images, "messages": check_placeholders(messages, len(images), where),
                    "id": rid}
        caption = _caption(sample, meta, where)
        return {"images": images, "caption": caption, "id": rid}


def _caption(sample: dict, meta: dict, where: str) -> str:
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_caption", f"{where}.txt") from e
    else:
        caption = meta.get("caption", meta.get("text"))
        if not isinstance(caption, str):
            raise BadSample("bad_caption", where, "no txt and no caption/text in json")
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption", where)
    return caption


# ---------------------------------------------------------------------------------- JSON
class _JsonSource:
    """Entries of a JSON file read in blocks of ``block_size`` (the units), loaded lazily once
    per process (DataLoader workers load their own copy)."""

    def __init__(self, *, block_size: int, max_pixels: int, name: str) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.max_pixels, self.name = block_size, max_pixels, name
        self._entries: list | None = None

    @property
    def entries(self) -> list:
        if self._entries is None:
            self._entries = self._load()
        return self._entries

    def _load(self) -> list:
        raise NotImplementedError

    def units(self) -> list[tuple[int, int]]:
        n = len(self.entries)
        return [(lo, min(lo + self.block_size, n)) for lo in range(0, n, self.block_size)]

    def read_unit(self, unit: Sequence[int], *, stats: ReadStats, skip: int = 0) -> Iterator[dict | None]:
        lo, hi = unit
        return read_unit_items((self.entries[i] for i in range(lo, hi)), self._decode, stats, skip)

    def _decode(self, entry) -> dict:
        raise NotImplementedError

    def __getstate__(self) -> dict:  # workers re-read the file rather than unpickle a copy
        return {**self.__dict__, "_entries": None}


def _load_json(path: str | Path) -> list | dict:
    """A JSON document, or a JSONL file as a list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


class CocoCaptionsSource(_JsonSource):
    """COCO captions (``captions_train2017.json``: ``images`` + ``annotations``).

    Args:
        annotations: the captions JSON.
        image_dir: the directory of the ``file_name`` images.
        group_captions: one record per image with every caption in ``captions`` (``caption`` is
            the first), as caption metrics need; default one record per annotation (training).
        block_size: entries per unit (resume / worker granularity).
        max_pixels: larger images are skipped as bad.
    """

    def __init__(self, *, annotations: str, image_dir: str, group_captions: bool = False,
                 block_size: int = 1024, max_pixels: int = 64_000_000, name: str = "coco") -> None:
        super().__init__(block_size=block_size, max_pixels=max_pixels, name=name)
        self.annotations, self.image_dir, self.group_captions = annotations, image_dir, group_captions

    def _load(self) -> list:
        doc = _load_json(self.annotations)
        if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
            raise ValueError(f"{self.annotations} is not a COCO captions file (needs 'images' and "
                             "'annotations')")
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        by_image: dict = {}
        for ann in doc["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann.get("caption"))
        if self.group_captions:
            return [(image_id, files.get(image_id), caps) for image_id, caps in by_image.items()]
        return [(ann["image_id"], files.get(ann["image_id"]), [ann.get("caption")])
                for ann in doc["annotations"]]

    def _decode(self, entry) -> dict:
        image_id, file_name, captions = entry
        if file_name is None:
            raise BadSample("missing_image", f"{self.annotations}:image_id={image_id}", "not in 'images'")
        where = os.path.join(self.image_dir, file_name)
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            raise BadSample("empty_caption", where)
        image = decode_image(where, where=where, max_pixels=self.max_pixels)
        record = {"images": [image], "caption": captions[0], "id": f"coco/{image_id}"}
        if self.group_captions:
            record["captions"] = captions
        return record


class LlavaInstructSource(_JsonSource):
    """LLaVA instruction data (``llava_instruct_150k.json`` and the like: a JSON list or JSONL of
    ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``).

    ``image`` may be a list (several images) or absent (a text-only record with no images).

    Args:
        path: the JSON / JSONL file.
        image_dir: the directory the ``image`` paths are relative to.
        block_size: entries per unit.
        max_pixels: larger images are skipped as bad.
    """

    def __init__(self, *, path: str, image_dir: str, block_size: int = 1024,
                 max_pixels: int = 64_000_000, name: str = "llava") -> None:
        super().__init__(block_size=block_size, max_pixels=max_pixels, name=name)
        self.path, self.image_dir = path, image_dir

    def _load(self) -> list:
        doc = _load_json(self.path)
        if not isinstance(doc, list):
            raise ValueError(f"{self.path}: LLaVA instruction data is a JSON list of conversations")
        return doc

    def _decode(self, entry) -> dict:
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise BadSample("bad_conversation", f"{self.path}", f"entry {str(entry)[:80]!r}")
        rid = str(entry.get("id", ""))
        where = f"{self.path}:{rid}"
        names = entry.get("image") or []
        names = [names] if isinstance(names, str) else list(names)
        messages = messages_from_turns(entry["conversations"], where)
        messages = check_placeholders(messages, len(names), where)
        images = [decode_image(os.path.join(self.image_dir, n), where=os.path.join(self.image_dir, n),
                               max_pixels=self.max_pixels) for n in names]
        return {"images": images, "messages": messages, "id": rid or where}


class RecordsSource:
    """Records already in memory (:func:`skimage_pairs`, tests), ``block_size`` per unit.

    Args:
        records: a list of records, or a callable returning one (a Hydra ``_target_`` such as
            ``mmllm.data.vlm_data.skimage_pairs`` with ``_partial_: true``).
    """

    def __init__(self, *, records: list[dict] | Callable[[], list[dict]], block_size: int = 8,
                 name: str = "records") -> None:
        self.records = records() if callable(records) else list(records)
        self.block_size, self.name = block_size, name

    def units(self) -> list[tuple[int, int]]:
        n = len(self.records)
        return [(lo, min(lo + self.block_size, n)) for lo in range(0, n, self.block_size)]

    def read_unit(self, unit: Sequence[int], *, stats: ReadStats, skip: int = 0) -> Iterator[dict | None]:
        def keep(record: dict) -> dict:
            return record
        return read_unit_items(self.records[unit[0]:unit[1]], keep, stats, skip)


def iter_records(source, stats: ReadStats | None = None) -> Iterator[dict]:
    """Every good record of a source, in unit order (bad ones counted in ``stats``); e.g. COCO to
    shards: ``write_webdataset(iter_records(CocoCaptionsSource(...)), "coco/%06d.tar")``."""
    stats = stats if stats is not None else ReadStats()
    for unit in source.units():
        yield from (r for r in source.read_unit(unit, stats=stats) if r is not None)
    stats.log_summary(getattr(source, "name", "source"))


# --------------------------------------------------------------------------------- writer
def _encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    image.convert("RGB").save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def write_webdataset(records: Iterable[dict], pattern: str, *, max_count: int = 10_000,
                     max_size: float = 3e9, image_format: str = "jpg", quality: int = 95) -> list[str]:
    """Writes records as webdataset tar shards (``<key>.jpg`` + ``<key>.json`` per record; several
    images as ``<key>.0.jpg``, ``<key>.1.jpg``, ...).

    The json holds ``id`` and ``caption`` (also as ``<key>.txt``) or ``messages``.

    Args:
        records: caption or instruction records.
        pattern: shard path with a printf field, e.g. ``"out/shard-%06d.tar"``.
        max_count: records per shard.
        max_size: bytes per shard (a new shard starts past it).
        image_format: "jpg", "png" or "webp".
        quality: JPEG/WebP quality.

    Returns:
        The written shard paths, in order.
    """
    import webdataset as wds

    if image_format not in IMAGE_EXTS:
        raise ValueError(f"image_format must be one of {IMAGE_EXTS}, got {image_format!r}")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0, encoder=False,
                         post=written.append) as sink:
        for i, record in enumerate(records):
            images = record.get("images") or []
            sample = {"__key__": f"{i:09d}"}
            if len(images) == 1:
                sample[image_format] = _encode_image(images[0], image_format, quality)
            else:
                for k, image in enumerate(images):
                    sample[f"{k}.{image_format}"] = _encode_image(image, image_format, quality)
            meta = {"id": str(record.get("id", i))}
            if "messages" in record:
                meta["messages"] = record["messages"]
            else:
                meta["caption"] = record["caption"]
                sample["txt"] = record["caption"].encode("utf-8")
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            sink.write(sample)
    return written

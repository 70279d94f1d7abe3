"""Frozen-encoder feature cache: encode every image once, train the connector from disk.

With the vision encoder frozen (stage 1), its features never change, so they are computed once
and stored as safetensors shards plus an index::

    <dir>/features-00000.safetensors   "features": (n_images_in_shard, N, Dv)
    <dir>/records.jsonl                one line per record: its text, shard, offset, n_images
    <dir>/index.json                   written last: encoder fingerprint, shapes, dtype, counts

A directory whose index names the same encoder fingerprint is reused as is; any other is an
error (stale features would silently train the connector on the wrong encoder). Images that fail
to preprocess are counted and skipped with their record (``index.json: skipped``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mmllm.config import to_dtype

INDEX = "index.json"
RECORDS = "records.jsonl"


def _text_fields(record: Mapping) -> dict:
    return {k: record[k] for k in ("caption", "messages") if k in record}


@torch.no_grad()
def build_feature_cache(encoder, records: Iterable[Mapping], out_dir: str | Path, *,
                        batch_size: int = 64, shard_images: int = 4096,
                        dtype: str | torch.dtype = "float16", device: str | torch.device | None = None,
                        overwrite: bool = False) -> Path:
    """Encodes the images of ``records`` with the (frozen) ``encoder`` into ``out_dir``.

    Args:
        encoder: a :class:`mmllm.nn.vision.VisionEncoder` (its ``preprocess`` and ``fingerprint``).
        records: ``{"images": [PIL, ...], "caption" | "messages": ...}`` dicts.
        out_dir: the cache directory.
        batch_size: images per encoder forward.
        shard_images: images per shard file.
        dtype: storage dtype of the features (float16 halves the disk of float32).
        device: where the encoder runs (default: where its weights are).
        overwrite: rebuild even when a cache of the same encoder exists.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    fp = encoder.fingerprint()
    if (out / INDEX).is_file() and not overwrite:
        index = json.loads((out / INDEX).read_text())
        if index.get("encoder") != fp:
            raise ValueError(f"{out} caches features of another encoder ({index.get('encoder')}, this "
                             f"one is {fp}): use another directory or overwrite=True")
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)
    device = device or next(encoder.parameters()).device
    writer = _ShardWriter(out, shard_images, to_dtype(dtype))
    skipped, pending, pending_meta = 0, [], []

    def flush() -> None:
        if pending:
            feats = torch.cat([encoder(torch.stack(pending[i:i + batch_size]).to(device)).cpu()
                               for i in range(0, len(pending), batch_size)])
            writer.add(feats, pending_meta)
            pending.clear()
            pending_meta.clear()

    with open(out / RECORDS, "w", encoding="utf-8") as lines:
        writer.lines = lines
        total = len(records) if hasattr(records, "__len__") else None
        for record in tqdm(records, desc="feature cache", unit="record", total=total, leave=False):
            try:
                pixels = [encoder.preprocess(img.convert("RGB")) for img in record.get("images") or []]
            except (OSError, ValueError) as exc:  # a corrupt or truncated image
                skipped += 1
                print(f"[mmllm] feature cache: skipped a record ({type(exc).__name__}: {exc})")
                continue
            pending += pixels
            pending_meta.append((_text_fields(record), len(pixels)))
            if len(pending) >= batch_size:
                flush()
        flush()
        writer.close()
    index = {"encoder": fp, "encoder_config": encoder.config, "feature_shape": writer.shape,
             "dtype": str(writer.dtype).removeprefix("torch."), "shards": writer.shards,
             "num_records": writer.n_records, "num_images": writer.n_images, "skipped": skipped}
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, default=str))
    os.replace(tmp, out / INDEX)  # the index appears whole, last: its presence means "complete"
    return out


class _ShardWriter:
    """Buffers features and writes a shard every ``shard_images`` images; one JSON line per record."""

    def __init__(self, out: Path, shard_images: int, dtype: torch.dtype) -> None:
        self.out, self.shard_images, self.dtype = out, shard_images, dtype
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.n_records = self.n_images = 0
        self.shape: list[int] | None = None
        self.lines = None

    def add(self, feats: torch.Tensor, metas: list[tuple[dict, int]]) -> None:
        """Records in order with their images' features (n, N, Dv); a record never spans shards."""
        self.shape = self.shape or list(feats.shape[1:])
        start = 0
        for text, n in metas:
            if self.buffered and self.buffered + n > self.shard_images:
                self._write()
            entry = {**text, "shard": len(self.shards), "offset": self.buffered, "num_images": n}
            self.lines.write(json.dumps(entry) + "\n")
            self.buffer.append(feats[start:start + n])
            self.buffered += n
            start += n
            self.n_records += 1
            self.n_images += n

    def _write(self) -> None:
        name = f"features-{len(self.shards):05d}.safetensors"
        shape = [0, *(self.shape or [0, 0])]
        data = torch.cat(self.buffer) if self.buffer else torch.zeros(shape)
        save_file({"features": data.to(self.dtype).contiguous()}, str(self.out / name))
        self.shards.append({"file": name, "num_images": self.buffered})
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        if self.buffered or not self.shards:
            self._write()


class FeatureCache(Dataset):
    """Records of a cache built by :func:`build_feature_cache`, each with ``"features"`` (k, N, Dv).

    Args:
        path: the cache directory.
        encoder_fingerprint: when given, must match the cache's (guards against stale features).
    """

    def __init__(self, path: str | Path, *, encoder_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise FileNotFoundError(f"{self.path} is not a complete feature cache (no {INDEX}): "
                                    "build it with mmllm.data.feature_cache.build_feature_cache")
        self.index = json.loads((self.path / INDEX).read_text())
        if encoder_fingerprint is not None and encoder_fingerprint != self.index["encoder"]:
            raise ValueError(f"{self.path} holds features of encoder {self.index['encoder']}, not "
                             f"{encoder_fingerprint}: rebuild the cache")
        lines = (self.path / RECORDS).read_text(encoding="utf-8").splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]
        if len(self.records) != self.index["num_records"]:
            raise ValueError(f"{self.path}: {len(self.records)} records but the index says "
                             f"{self.index['num_records']}")
        self._shards: dict[int, object] = {}  # opened lazily, memory-mapped, per process

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(N, Dv)."""
        return tuple(self.index["feature_shape"])

    def __len__(self) -> int:
        return len(self.records)

    def _shard(self, i: int):
        if i not in self._shards:
            f = safe_open(str(self.path / self.index["shards"][i]["file"]), framework="pt")
            self._shards[i] = (f, f.get_slice("features"))  # keep the file open with its slice
        return self._shards[i][1]

    def __getitem__(self, idx: int) -> dict:
        rec = dict(self.records[idx])
        shard, offset, n = rec.pop("shard"), rec.pop("offset"), rec.pop("num_images")
        N, Dv = self.feature_shape
        rec["features"] = self._shard(shard)[offset:offset + n] if n else torch.zeros(0, N, Dv)
        return rec

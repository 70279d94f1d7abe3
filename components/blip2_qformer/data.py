"""Caption batches for Q-Former pretraining: a tokenizer with [CLS]/[DEC], a collator, a datamodule.

A batch is ``{"text_ids" (B, T), "text_mask" (B, T), "caption_ids" (B,)}`` plus either
``"image_features" (B, N, Dv)`` (from the feature cache: the frozen encoder never runs) or
``"images" (B, 3, H, W)``. ``text_ids`` start with [CLS] (ITC/ITM; the module swaps in [DEC] for
ITG) and end with the tokenizer's end token. ``caption_ids`` number the distinct captions of the
batch, so augmented copies of one image, which share a caption, count as positives of each other.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

SPECIAL = ("[PAD]", "[CLS]", "[DEC]", "[EOS]")


class ByteCaptionTokenizer:
    """UTF-8 bytes (ids 0-255) plus [PAD]=256, [CLS]=257, [DEC]=258, [EOS]=259: nothing unknown,
    no training needed (the default for small caption sets)."""

    def __init__(self) -> None:
        self.pad_token_id, self.cls_token_id, self.dec_token_id, self.eos_token_id = 256, 257, 258, 259

    def __len__(self) -> int:
        return 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFCaptionTokenizer:
    """Any HF tokenizer (e.g. the kit's byte-level BPE, ``mmllm.data.tokenizer``) with [CLS], [DEC]
    (and [PAD] / [EOS] where it has none) added as special tokens.

    Args:
        source: a tokenizer source for :func:`mmllm.checkpoint.load_tokenizer_from`, or a loaded one.
    """

    def __init__(self, source) -> None:
        if isinstance(source, str):
            from mmllm.checkpoint import load_tokenizer_from

            source = load_tokenizer_from(source)
        tok = source
        extra = {"additional_special_tokens": ["[CLS]", "[DEC]"]}
        if tok.pad_token is None:
            extra["pad_token"] = "[PAD]"
        if tok.eos_token is None:
            extra["eos_token"] = "[EOS]"
        tok.add_special_tokens(extra, replace_additional_special_tokens=False)
        self.tok = tok
        self.pad_token_id, self.eos_token_id = tok.pad_token_id, tok.eos_token_id
        self.cls_token_id, self.dec_token_id = tok.convert_tokens_to_ids(["[CLS]", "[DEC]"])

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def caption_tokenizer(source: str | None):
    """``None`` or ``"bytes"``: :class:`ByteCaptionTokenizer`; else :class:`HFCaptionTokenizer`."""
    return ByteCaptionTokenizer() if source in (None, "bytes") else HFCaptionTokenizer(source)


class CaptionCollator:
    """Records ``{"caption", "features" (1, N, Dv) | "images": [PIL]}`` -> a batch (module docstring).

    Args:
        tokenizer: a :class:`ByteCaptionTokenizer` / :class:`HFCaptionTokenizer`.
        max_len: longest text, [CLS] and end token included (longer captions are truncated,
            keeping the end token).
        image_transform: PIL -> (3, H, W), for records without cached features.
    """

    def __init__(self, tokenizer, *, max_len: int = 64, image_transform=None) -> None:
        if max_len < 3:
            raise ValueError(f"max_len={max_len}: need room for [CLS], one token and the end token")
        self.tokenizer, self.max_len, self.image_transform = tokenizer, max_len, image_transform

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows = []
        for r in records:
            if not r.get("caption"):
                raise ValueError(f"record without a caption: keys {sorted(r)}")
            ids = tok.encode(r["caption"])[: self.max_len - 2]
            rows.append([tok.cls_token_id, *ids, tok.eos_token_id])
        T = max(len(r) for r in rows)
        text_ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            text_ids[i, :len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        captions = [r["caption"] for r in records]
        order = {c: k for k, c in enumerate(dict.fromkeys(captions))}
        batch = {"text_ids": text_ids, "text_mask": torch.arange(T)[None] < lengths[:, None],
                 "caption_ids": torch.tensor([order[c] for c in captions])}
        return {**batch, **self._images(records)}

    def _images(self, records: list[dict]) -> dict[str, torch.Tensor]:
        if all("features" in r for r in records):
            if any(torch.as_tensor(r["features"]).shape[0] != 1 for r in records):
                raise ValueError("Q-Former pretraining takes one image per caption record")
            return {"image_features": torch.cat([torch.as_tensor(r["features"]) for r in records]).float()}
        if self.image_transform is None or not all(len(r.get("images") or ()) == 1 for r in records):
            raise ValueError("records need cached 'features' or exactly one image (and an image_transform)")
        return {"images": torch.stack([self.image_transform(r["images"][0].convert("RGB")) for r in records])}


class CaptionDataModule(L.LightningDataModule):
    """Image-caption pairs, features cached once from the frozen encoder, as caption batches.

    Args:
        vision: :class:`mmllm.nn.vision.VisionEncoder` keyword arguments (built once; shared
            with the module, which needs its width).
        tokenizer: "bytes" (default) or a tokenizer source (see :func:`caption_tokenizer`).
        records: "skimage" or an iterable of caption records (a reader, mmllm.data.vlm_data).
        feature_cache: cache directory (built on first use, reused while the encoder is the
            same); None feeds images and the module runs the frozen encoder.
        val_every: every k-th record is held out for validation (0: none).
        batch_size, num_workers, max_len: loader and collator settings.
    """

    def __init__(self, *, vision: dict, tokenizer: str | None = "bytes", records="skimage",
                 feature_cache: str | None = None, val_every: int = 0, batch_size: int = 32,
                 num_workers: int = 0, max_len: int = 64) -> None:
        super().__init__()
        self.vision_kwargs, self.tokenizer_source, self.records_spec = dict(vision), tokenizer, records
        self.feature_cache, self.val_every = feature_cache, val_every
        self.batch_size, self.num_workers, self.max_len = batch_size, num_workers, max_len
        self.tokenizer = self.encoder = self.collator = self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.collator is not None:
            return
        from mmllm.data.vlm_collate import resolve_records
        from mmllm.nn.vision import VisionEncoder

        self.tokenizer = caption_tokenizer(self.tokenizer_source)
        self.encoder = VisionEncoder(**self.vision_kwargs)
        records = resolve_records(self.records_spec)
        if self.feature_cache:
            from mmllm.data.feature_cache import FeatureCache, build_feature_cache

            build_feature_cache(self.encoder, records, self.feature_cache)
            records = FeatureCache(self.feature_cache, encoder_fingerprint=self.encoder.fingerprint())
        k = self.val_every
        self.train_set = [records[i] for i in range(len(records)) if not k or i % k != k - 1]
        self.val_set = [records[i] for i in range(len(records)) if k and i % k == k - 1]
        self.collator = CaptionCollator(self.tokenizer, max_len=self.max_len,
                                        image_transform=self.encoder.preprocess)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          collate_fn=self.collator, num_workers=self.num_workers,
                          drop_last=len(self.train_set) > self.batch_size)  # no 1-pair ITC batch

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self.collator,
                          num_workers=self.num_workers) if self.val_set else []

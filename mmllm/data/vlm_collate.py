"""Vision-language batches: records with images -> token ids, labels and images (or features).

Records (from :mod:`mmllm.data.vlm_data` or the feature cache, :mod:`mmllm.data.feature_cache`):

* captions (stage 1): ``{"images": [PIL, ...], "caption": str}``;
* conversations (stage 2): ``{"images": [...], "messages": [...]}`` with ``"<image>"`` placeholders
  in user/system content, one per image, in order;
* a cached record has ``"features"`` (k, N, Dv) instead of ``"images"``.

Every image becomes ``<Img>`` + ``<ImageFeature>`` x M + ``</Img>``; the model writes the connector's
M output embeddings at the ``<ImageFeature>`` positions. None of these tokens is ever a target.

Captions: ``<s><Img>..</Img> [instruction] caption</s>`` (MiniGPT-4 stage 1; the instruction, sampled
from a template list with probability ``instruction_prob``, is not supervised). Conversations are
rendered by :class:`mmllm.data.chat.ChatRenderer` (loss on assistant turns only) with the
tokenizer's template (LLaVA multi-turn, ChatML) or :data:`MINIGPT4_TEMPLATE`
(``###Human: <Img><ImageFeature></Img> <Instruction> ###Assistant: <answer>``).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmllm.data.chat import ChatRenderer, MaskError, RenderedChat, Span, check_rendered
from mmllm.data.special_tokens import SPECIAL_TOKENS

IMAGE_PLACEHOLDER = SPECIAL_TOKENS.image  # "<image>" in record text
IMG_START, IMG_FEATURE, IMG_END = "<Img>", "<ImageFeature>", "</Img>"
VLM_TOKENS = (IMG_START, IMG_FEATURE, IMG_END)
IGNORE_INDEX = -100

CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.", "What is in this picture?", "Give a short caption.",
    "Summarize the visual content of the image.", "Write a short description of the photo.",
)

MINIGPT4_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '###Human: ' + m['content'] + ' ' -}}"
    "{%- else -%}{{- '###Assistant: ' + m['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '###Assistant: ' -}}{%- endif -%}"
)
CHAT_TEMPLATES = {"minigpt4": MINIGPT4_TEMPLATE}


def add_vlm_tokens(tokenizer) -> int:
    """Adds ``<Img>``, ``<ImageFeature>``, ``</Img>`` as special tokens; returns how many were new
    (resize the LM's embeddings to ``len(tokenizer)`` afterwards)."""
    before = len(tokenizer)
    missing = [t for t in VLM_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(tokenizer) - before


def vlm_token_ids(tokenizer) -> tuple[int, int, int]:
    """Ids of (``<Img>``, ``<ImageFeature>``, ``</Img>``); raises when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in VLM_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks {missing}: call mmllm.data.vlm_collate.add_vlm_tokens")
    return tuple(vocab[t] for t in VLM_TOKENS)


class VLMCollator:
    """Turns records into a training batch.

    Args:
        tokenizer: an HF tokenizer with the VLM tokens (:func:`add_vlm_tokens`).
        num_image_tokens: M, the connector's output tokens per image.
        image_transform: PIL image -> (3, H, W) tensor (the encoder's preprocessing); None when
            every record carries cached ``features``.
        instructions: templates sampled for captions (None: :data:`CAPTION_INSTRUCTIONS`).
        instruction_prob: probability that a caption gets an instruction before it.
        chat_template: a Jinja template, "minigpt4", or None (the tokenizer's own / ChatML).
        max_len: longest sequence; longer text is cut (never inside an image span: an error).
        seed: seeds instruction sampling.

    Returns (``__call__``):
        ``{"input_ids" (B, T), "labels" (B, T), "attention_mask" (B, T), "num_images" (B,)}``
        plus ``"images"`` (n, 3, H, W) or ``"image_features"`` (n, N, Dv) of all images in order.
    """

    def __init__(self, tokenizer, *, num_image_tokens: int,
                 image_transform: Callable | None = None, instructions: Sequence[str] | None = None,
                 instruction_prob: float = 0.5, chat_template: str | None = None,
                 max_len: int = 512, seed: int = 0) -> None:
        self.tokenizer, self.num_image_tokens = tokenizer, num_image_tokens
        self.start_id, self.feature_id, self.end_id = vlm_token_ids(tokenizer)
        self.image_transform = image_transform
        self.instructions = list(instructions or CAPTION_INSTRUCTIONS)
        self.instruction_prob, self.max_len = instruction_prob, max_len
        self.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)
        self._renderer: ChatRenderer | None = None
        self.rng = random.Random(seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def image_ids(self) -> list[int]:
        return [self.start_id] + [self.feature_id] * self.num_image_tokens + [self.end_id]

    @property
    def renderer(self) -> ChatRenderer:
        if self._renderer is None:
            self._renderer = ChatRenderer(self.tokenizer, chat_template=self.chat_template)
        return self._renderer

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------------------------ records
    def encode_caption(self, n_images: int, caption: str, instruction: str | None = None):
        """``(ids, loss_mask)`` of ``<s> <Img>..</Img> x n [instruction] caption</s>``."""
        if not caption.strip():
            raise ValueError("empty caption")
        # bos first: the first caption token has a position predicting it even with no image.
        bos = self.tokenizer.bos_token_id
        ids = [bos] if bos is not None else []
        for _ in range(n_images):
            ids += self.image_ids
        if instruction:
            ids += self._text(" " + instruction)
        mask = [False] * len(ids)
        target = self._text(" " + caption.strip()) + [self.tokenizer.eos_token_id]
        return ids + target, mask + [True] * len(target)

    def encode_messages(self, messages: Sequence[Mapping], n_images: int) -> RenderedChat:
        """Renders a conversation and expands each ``<image>`` of user/system content into the
        image span; the result is checked (:func:`mmllm.data.chat.check_rendered`)."""
        found = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if found != n_images:
            raise ValueError(f"the conversation has {found} {IMAGE_PLACEHOLDER} placeholders but the "
                             f"record has {n_images} images")
        if any(m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"] for m in messages):
            raise ValueError(f"{IMAGE_PLACEHOLDER} in an assistant turn: images go in user turns")
        rendered = self.renderer(messages)
        ids, mask, spans = [], [], []
        for s in rendered.spans:
            part_ids = rendered.input_ids[s.start:s.end]
            if s.part == "content" and IMAGE_PLACEHOLDER in messages[s.message]["content"]:
                part_ids = self._expand(part_ids, messages[s.message]["content"])
            spans.append(Span(s.role, s.message, s.part, len(ids), len(ids) + len(part_ids), s.supervised))
            ids += part_ids
            mask += [s.supervised] * len(part_ids)
        out = RenderedChat(input_ids=ids, loss_mask=mask, spans=spans)
        check_rendered(out, messages)
        if ids.count(self.feature_id) != n_images * self.num_image_tokens:
            raise MaskError(f"{ids.count(self.feature_id)} image positions after rendering, expected "
                            f"{n_images} x {self.num_image_tokens}: the template altered a placeholder")
        return out

    def prompt_ids(self, messages: Sequence[Mapping], n_images: int) -> list[int]:
        """Generation prompt of a conversation ending in a user turn: its rendering (images
        expanded) through the header of the assistant turn that follows."""
        rendered = self.encode_messages([*messages, {"role": "assistant", "content": "x"}], n_images)
        start = next(s.start for s in reversed(rendered.spans) if s.role == "assistant" and s.part == "content")
        return rendered.input_ids[:start]

    def _expand(self, content_ids: list[int], content: str) -> list[int]:
        """Re-tokenises a content span with each ``<image>`` replaced by the image span."""
        text = self.tokenizer.decode(content_ids)
        if text.count(IMAGE_PLACEHOLDER) != content.count(IMAGE_PLACEHOLDER) or \
                text.strip() != content.strip():
            raise MaskError(f"the tokenised content {text[:60]!r} does not match the message "
                            f"{content[:60]!r}: cannot place its images")
        pieces = text.split(IMAGE_PLACEHOLDER)
        ids = self._text(pieces[0]) if pieces[0] else []
        for piece in pieces[1:]:
            ids += self.image_ids + (self._text(piece) if piece else [])
        return ids

    def encode(self, record: Mapping) -> tuple[list[int], list[bool], int]:
        """``(ids, loss_mask, n_images)`` of one record."""
        n = len(record["features"]) if "features" in record else len(record.get("images") or [])
        if "messages" in record:
            r = self.encode_messages(record["messages"], n)
            ids, mask = r.input_ids, r.loss_mask
        elif "caption" in record:
            use = self.instructions and self.rng.random() < self.instruction_prob
            ids, mask = self.encode_caption(n, record["caption"], self.rng.choice(self.instructions) if use else None)
        else:
            raise ValueError(f"a record needs 'caption' or 'messages', got keys {sorted(record)}")
        if len(ids) > self.max_len:
            if n and max(i for i, t in enumerate(ids) if t == self.end_id) >= self.max_len:
                raise ValueError(f"a record of {len(ids)} tokens would be cut inside an image span "
                                 f"(max_len={self.max_len}): raise max_len or use fewer image tokens")
            ids, mask = ids[:self.max_len], mask[:self.max_len]
        if not any(mask):
            raise MaskError("no supervised token left in the record")
        return ids, mask, n

    # ------------------------------------------------------------------------------- batches
    def __call__(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(r) for r in records]
        T = max(len(ids) for ids, _, _ in encoded)
        B = len(encoded)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        for b, (ids, mask, _) in enumerate(encoded):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
            # labels[t] = ids[t+1] where token t+1 is supervised (mmllm.losses.lm convention).
            target = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
            labels[b, :len(target)] = torch.tensor(target, dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
                 "num_images": torch.tensor([n for _, _, n in encoded])}
        batch.update(self._visual(records))
        return batch

    def _visual(self, records: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        feats = [r["features"] for r in records if "features" in r and len(r["features"])]
        images = [img for r in records if "features" not in r for img in r.get("images") or []]
        if feats and images:
            raise ValueError("a batch mixes cached features and raw images")
        if feats:
            return {"image_features": torch.cat([torch.as_tensor(f) for f in feats]).float()}
        if images:
            if self.image_transform is None:
                raise ValueError("records carry images but the collator has no image_transform")
            return {"images": torch.stack([self.image_transform(img.convert("RGB")) for img in images])}
        return {}


# ---------------------------------------------------------------------------------- records
def skimage_records(*, chat: bool = False) -> list[dict]:
    """The images bundled with scikit-image as caption records, or as conversations.

    Uses :func:`mmllm.data.vlm_data.skimage_pairs` / ``skimage_instructions`` when the data side
    provides them, else reads the ``skimage.data`` images that ship with the package with the
    first docstring line of each as caption (conversations: one question, the caption as answer).
    """
    try:
        from mmllm.data.vlm_data import skimage_instructions, skimage_pairs

        if chat:
            return [dict(r) for r in skimage_instructions()]
        return [dict(r) for r in skimage_pairs()]
    except ImportError:
        pairs = _skimage_fallback()
    if not chat:
        return pairs
    questions = ("What does this image show?", "Describe the picture.", "What is this?")
    return [{"images": r["images"], "messages": [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{questions[i % len(questions)]}"},
        {"role": "assistant", "content": r["caption"]}]} for i, r in enumerate(pairs)]


_SKIMAGE = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins",
            "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
            "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text")


@functools.lru_cache(maxsize=1)
def _skimage_images() -> tuple[tuple[Image.Image, str], ...]:
    """(image, caption) of the bundled images, decoded once per process."""
    import numpy as np
    import skimage.data

    out = []
    for name in _SKIMAGE:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        arr = np.asarray(fn())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        caption = (fn.__doc__ or name).strip().splitlines()[0].strip().rstrip(".") + "."
        out.append((img, caption))
    return tuple(out)


def _skimage_fallback() -> list[dict]:
    return [{"images": [img], "caption": caption} for img, caption in _skimage_images()]


def resolve_records(records) -> list[dict]:
    """``"skimage"`` / ``"skimage_chat"`` (bundled pairs) or any iterable of records."""
    if isinstance(records, str):
        if records not in ("skimage", "skimage_chat"):
            raise ValueError(f"records={records!r}: use 'skimage', 'skimage_chat' or a reader "
                             "(_target_: mmllm.data.vlm_data....)")
        return skimage_records(chat=records == "skimage_chat")
    return list(records)


# ------------------------------------------------------------------------------ datamodule
class VLMDataModule(L.LightningDataModule):
    """Tokenizer (with the image tokens), vision encoder and batches of image-text records.

    Args:
        tokenizer: tokenizer source (a kit run or tokenizer directory, an HF directory,
            "smollm2"; see mmllm.checkpoint.load_tokenizer_from).
        vision: VisionEncoder keyword arguments (the encoder is built once, shared with the module).
        records: training records: "skimage", "skimage_chat" or an iterable (a reader).
        val_every: every k-th record is held out for validation (0: no validation).
        feature_cache: directory of a feature cache: built on first use, then training reads
            encoder features from it (stage 1, frozen encoder); None feeds images.
        num_image_tokens: M per image (None: the encoder's N, for linear/MLP connectors).
        batch_size, num_workers: DataLoader settings.
        max_len, instruction_prob, chat_template, seed: see :class:`VLMCollator`.
    """

    def __init__(self, *, tokenizer: str, vision: dict, records="skimage", val_every: int = 0,
                 feature_cache: str | None = None, num_image_tokens: int | None = None,
                 batch_size: int = 8, num_workers: int = 0, max_len: int = 512,
                 instruction_prob: float = 0.5, chat_template: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer_source, self.vision_kwargs = tokenizer, dict(vision)
        self.records_spec, self.val_every = records, val_every
        self.feature_cache, self.num_image_tokens = feature_cache, num_image_tokens
        self.batch_size, self.num_workers, self.max_len = batch_size, num_workers, max_len
        self.instruction_prob, self.chat_template, self.seed = instruction_prob, chat_template, seed
        self.tokenizer = self.encoder = self.collator = None
        self.train_set = self.val_set = None
        self.tokenizer_dir = None

    def setup(self, stage: str | None = None) -> None:
        if self.collator is not None:
            return
        from mmllm.checkpoint import load_tokenizer_from
        from mmllm.nn.vision import VisionEncoder

        self.tokenizer = load_tokenizer_from(self.tokenizer_source)
        add_vlm_tokens(self.tokenizer)
        self.encoder = VisionEncoder(**self.vision_kwargs)
        records = resolve_records(self.records_spec)
        if self.feature_cache:
            from mmllm.data.feature_cache import FeatureCache, build_feature_cache

            build_feature_cache(self.encoder, records, self.feature_cache)
            records = FeatureCache(self.feature_cache, encoder_fingerprint=self.encoder.fingerprint())
        k = self.val_every
        idx = range(len(records))
        self.train_set = [records[i] for i in idx if not k or i % k != k - 1]
        self.val_set = [records[i] for i in idx if k and i % k == k - 1]
        m = self.num_image_tokens or self.encoder.num_tokens
        self.collator = VLMCollator(self.tokenizer, num_image_tokens=m,
                                    image_transform=self.encoder.preprocess,
                                    instruction_prob=self.instruction_prob,
                                    chat_template=self.chat_template, max_len=self.max_len, seed=self.seed)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return (self.encoder.num_tokens, self.encoder.width)

    def _loader(self, data, shuffle: bool) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collator,
                          num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False) if self.val_set else []

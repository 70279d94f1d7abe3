"""Images in chat requests: OpenAI ``image_url`` content parts -> checked PIL images -> VLM prompts.

Requests send images as OpenAI content parts::

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}

* ``data:`` URLs are decoded and checked (size, pixels, a real image) -> 400 otherwise.
* local paths / ``file://`` URLs only when the server allows them (``allow_local_files``), and
  only under ``local_root`` when one is set (no ``..`` escape).
* ``http(s)`` URLs are never fetched: the server makes no outbound requests on a client's behalf.

Each image part becomes an ``<image>`` placeholder in its message's text (the LLaVA convention of
the kit's records); :func:`encode_prompt` renders the conversation with the chat renderer and
replaces each placeholder by the image span the VLM was trained on (``<Img>`` +
``<ImageFeature>`` x M + ``</Img>``), tokenised as training tokenises it.

The VLM interface the server needs (:func:`is_vlm`), as ``mmllm.models.vlm.VisionLanguageModel``
has it: ``image_token_id`` (the ``<ImageFeature>`` id), ``num_image_tokens`` (M),
``embed(input_ids, images=...) -> (B, T, D)`` input embeddings with image features in place,
``decoder`` (the LM the decode session runs) and ``vision.preprocess_images(pil_images)``
(or ``preprocess_images``) -> (n, 3, H, W).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from PIL import Image

from mmllm.data.vlm_data import IMAGE_PLACEHOLDER, BadSample, decode_image
from mmllm.serve.protocol import APIError

from mmllm.data.vlm_collate import IMG_END, IMG_FEATURE, IMG_START  # the tokens VLM training uses
NO_IMAGES = "this model does not take images (it is not a vision-language model)"
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^;,]*)*?);base64,(?P<data>.*)$",
                       re.DOTALL)


@dataclass(frozen=True)
class ImageLimits:
    """What images a request may carry.

    Attributes:
        max_images: images per request.
        max_bytes: encoded bytes per image.
        max_pixels: width x height per image.
        allow_local_files: accept local paths and ``file://`` URLs (only for trusted clients).
        local_root: if set, local files must lie under this directory.
    """

    max_images: int = 4
    max_bytes: int = 8 << 20
    max_pixels: int = 4096 * 4096
    allow_local_files: bool = False
    local_root: str | None = None


def _bad(message: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param="messages", code=code)


def _decode(data: bytes | str, where: str, limits: ImageLimits) -> Image.Image:
    try:
        return decode_image(data, where=where, max_pixels=limits.max_pixels)
    except BadSample as e:
        raise _bad(f"{where}: {e.reason.replace('_', ' ')} ({e.__cause__ or e})") from e


def load_image_url(url: str, limits: ImageLimits, *, where: str = "image") -> Image.Image:
    """The RGB image of an ``image_url`` (a data URL, or a local file when allowed).

    Raises:
        APIError: 400 for bad base64, a non-image, an image over the limits, a refused URL.
    """
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: image_url.url must be a non-empty string")
    m = _DATA_URL.match(url)
    if m:
        if m["mime"] and not m["mime"].startswith("image/"):
            raise _bad(f"{where}: a data URL of type {m['mime']!r} is not an image")
        payload = re.sub(r"\s+", "", m["data"])
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise _bad(f"{where}: the image exceeds {limits.max_bytes} bytes", code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"{where}: the data URL is not valid base64 ({e})") from e
        return _decode(data, where, limits)
    if url.startswith("data:"):
        raise _bad(f"{where}: only base64 data URLs are supported (data:image/png;base64,...)")
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise _bad(f"{where}: this server does not fetch {scheme} URLs; send the image inline as a "
                   "data URL (data:image/jpeg;base64,...)", code="url_not_allowed")
    return _local_image(url, limits, where)


def _local_image(url: str, limits: ImageLimits, where: str) -> Image.Image:
    if not limits.allow_local_files:
        raise _bad(f"{where}: local image files are not allowed on this server (start it with "
                   "images.allow_local_files=true for trusted clients)", code="url_not_allowed")
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file") or (parsed.scheme == "file" and parsed.netloc not in ("", "localhost")):
        raise _bad(f"{where}: unsupported image URL {url[:80]!r}", code="url_not_allowed")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser().resolve()
    if limits.local_root is not None and not path.is_relative_to(Path(limits.local_root).expanduser().resolve()):
        raise _bad(f"{where}: {path} is outside the allowed image directory", code="url_not_allowed")
    if not path.is_file():
        raise _bad(f"{where}: no such image file: {path}")
    if path.stat().st_size > limits.max_bytes:
        raise _bad(f"{where}: the image exceeds {limits.max_bytes} bytes", code="image_too_large")
    return _decode(str(path), where, limits)


def has_image_parts(body: Mapping) -> bool:
    """Whether any message of a chat body has an ``image_url`` content part."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list)
        and any(isinstance(p, Mapping) and p.get("type") == "image_url" for p in m["content"])
        for m in messages)


def extract_images(body: Mapping, limits: ImageLimits) -> tuple[dict, list[Image.Image]]:
    """The body with every image part of its messages replaced by an ``<image>`` text part, and
    the images in order (placeholder order).

    Raises:
        APIError: 400 for an image outside a user message, too many images, a bad image, or
            ``<image>`` typed in the text (it would claim an image that was not sent).
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return dict(body), []  # protocol.chat_messages reports it
    images: list[Image.Image] = []
    out_messages = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        text = content if isinstance(content, str) else "".join(
            str(p.get("text", "")) for p in content or [] if isinstance(p, Mapping) and p.get("type") == "text") \
            if isinstance(content, list) else ""
        if IMAGE_PLACEHOLDER in text:
            raise _bad(f"messages[{i}]: the text contains {IMAGE_PLACEHOLDER!r}; send images as "
                       "image_url content parts")
        if not isinstance(content, list) or not any(isinstance(p, Mapping) and p.get("type") == "image_url"
                                                    for p in content):
            out_messages.append(m)
            continue
        if m.get("role") != "user":
            raise _bad(f"messages[{i}]: images are only accepted in user messages")
        parts = []
        for j, p in enumerate(content):
            if isinstance(p, Mapping) and p.get("type") == "image_url":
                if len(images) >= limits.max_images:
                    raise _bad(f"at most {limits.max_images} images per request", code="too_many_images")
                spec = p.get("image_url")
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                images.append(load_image_url(url, limits, where=f"messages[{i}].content[{j}]"))
                parts.append({"type": "text", "text": IMAGE_PLACEHOLDER + "\n"})
            else:
                parts.append(p)
        out_messages.append({**m, "content": parts})
    return {**body, "messages": out_messages}, images


# ------------------------------------------------------------------------------ the VLM side
def is_vlm(model) -> bool:
    """Whether ``model`` has the VLM interface the server uses (see the module doc)."""
    return all(hasattr(model, a) for a in ("image_token_id", "num_image_tokens", "embed", "decoder"))


def preprocess(model, images: list[Image.Image]) -> torch.Tensor:
    """(n, 3, H, W) model inputs of PIL images, with the model's own image transform."""
    fn = getattr(model, "preprocess_images", None) or getattr(getattr(model, "vision", None),
                                                              "preprocess_images", None)
    if fn is None:
        raise APIError(500, "the VLM has no image preprocessing (preprocess_images)", type="server_error")
    return fn(images)


def image_span_ids(tokenizer, num_image_tokens: int) -> list[int]:
    """Ids of one image's span: ``<Img>`` + ``<ImageFeature>`` x M + ``</Img>``."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMG_START, IMG_FEATURE, IMG_END) if t not in vocab]
    if missing:
        raise APIError(500, f"the VLM's tokenizer lacks the image tokens {missing}", type="server_error")
    return [vocab[IMG_START]] + [vocab[IMG_FEATURE]] * num_image_tokens + [vocab[IMG_END]]


def encode_prompt(renderer, messages: list[dict], n_images: int, span: list[int]) -> list[int]:
    """Generation-prompt ids of a conversation whose user contents hold ``<image>`` placeholders,
    each replaced by ``span``; text is tokenised per piece as the VLM collate tokenises it.

    The conversation is rendered with a dummy assistant turn, whose content span marks where the
    generation prompt ends; that prefix must equal ``renderer.prompt(messages)``.
    """
    rendered = renderer([*messages, {"role": "assistant", "content": "x"}])
    last = len(messages)
    cut = next(s.start for s in rendered.spans if s.message == last and s.part == "content")
    if rendered.input_ids[:cut] != renderer.prompt(messages):
        raise APIError(500, "the chat template renders the generation prompt unlike an assistant "
                       "turn: images cannot be placed", type="server_error")
    tok, ids = renderer.tokenizer, []
    for s in rendered.spans:
        if s.start >= cut:
            break
        content = messages[s.message]["content"] if s.part == "content" else ""
        if IMAGE_PLACEHOLDER not in content:
            ids += rendered.input_ids[s.start:s.end]
            continue
        pieces = content.split(IMAGE_PLACEHOLDER)
        encoded = tok(pieces, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids += encoded[0]
        for piece_ids in encoded[1:]:
            ids += span + piece_ids
    if ids.count(span[1]) != n_images * (len(span) - 2):
        raise APIError(500, "the rendered prompt lost image positions", type="server_error")
    return ids


@torch.no_grad()
def prompt_embeddings(model, prompt: list[int], images: torch.Tensor) -> torch.Tensor:
    """(T, D) input embeddings of one prompt with its images' features at the image positions."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    return model.embed(ids, images=images.to(device))[0]

"""VisionLanguageModel: vision encoder -> connector -> decoder LM, features written at placeholders.

The token sequence holds ``<Img>`` + ``<ImageFeature>`` x M + ``</Img>`` per image (see
:mod:`mmllm.data.vlm_collate`); the connector's (n_images, M, D) outputs replace the embeddings
of the ``<ImageFeature>`` positions, in reading order (row by row, left to right), so a sample
may hold any number of images (0, 1, 3, ...)::

    images (n, 3, H, W) -encoder-> (n, N, Dv) -connector-> (n, M, D) --+
    input_ids (B, T) -embed_tokens-> (B, T, D) --- masked_scatter -----+--> decoder -> logits

``.decoder`` is the plain DecoderLM, so mmllm.distributed.parallelize (FSDP2/TP) and peft apply
to it as to a text model; generation with images prefills the DecodeSession from embeddings.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from mmllm.models.decoder_lm import DecoderLM, DecoderOutput
from mmllm.nn.connectors import Connector
from mmllm.nn.vision import VisionEncoder


def _build(spec: nn.Module | dict, default_class: type) -> nn.Module:
    """A module, or one rebuilt from a config dict (``class`` key or ``default_class``)."""
    if isinstance(spec, nn.Module):
        return spec
    spec = dict(spec)
    path = spec.pop("class", None) or spec.pop("_target_", None)
    klass = default_class
    if path:
        mod, _, name = path.rpartition(".")
        klass = getattr(importlib.import_module(mod), name)
    return klass(**spec)


class VisionLanguageModel(nn.Module):
    """A decoder LM reading images through a vision encoder and a connector.

    Args:
        decoder: the LM (a DecoderLM or its config dict); its vocabulary must hold the image
            tokens (resize it with ``resize_token_embeddings(len(tokenizer))``).
        connector: a :class:`~mmllm.nn.connectors.Connector` (or a config dict with ``class``)
            mapping the encoder width to the decoder width.
        image_token_id: id of ``<ImageFeature>``, the positions that receive image features.
        vision: the :class:`~mmllm.nn.vision.VisionEncoder` (or its config); None when training
            only from cached features.
    """

    def __init__(self, *, decoder: nn.Module | dict, connector: Connector | dict,
                 image_token_id: int, vision: VisionEncoder | dict | None = None) -> None:
        super().__init__()
        self.decoder = _build(decoder, DecoderLM)
        self.connector = _build(connector, Connector)
        self.vision = _build(vision, VisionEncoder) if vision is not None else None
        self.image_token_id = image_token_id
        dim = self.decoder.embed_tokens.weight.shape[1]
        if self.connector.out_dim != dim:
            raise ValueError(f"the connector outputs {self.connector.out_dim} features but the decoder "
                             f"width is {dim}")
        if self.vision is not None and self.connector.in_dim != self.vision.width:
            raise ValueError(f"the connector reads {self.connector.in_dim} features but the encoder "
                             f"gives {self.vision.width}")
        if image_token_id >= self.decoder.embed_tokens.weight.shape[0]:
            raise ValueError(f"image_token_id={image_token_id} is outside the decoder vocabulary "
                             f"({self.decoder.embed_tokens.weight.shape[0]}): resize its embeddings")

    @property
    def config(self) -> dict:
        """Rebuilds the model (mmllm.checkpoint): the parts' configs; weights travel in the state
        dict, so the encoder is rebuilt without re-reading its pretrained file."""
        conn = type(self.connector)
        out = {"decoder": dict(self.decoder.config),
               "connector": {"class": f"{conn.__module__}.{conn.__qualname__}", **self.connector.config},
               "image_token_id": self.image_token_id}
        if self.vision is not None:
            out["vision"] = {**self.vision.config, "pretrained": None}
        return out

    @property
    def num_image_tokens(self) -> int:
        """M: placeholder positions per image."""
        if self.vision is None:
            raise ValueError("no vision encoder: M depends on the cached features' N")
        return self.connector.num_output_tokens(self.vision.num_tokens)

    # Attributes the training/generation code reads from a DecoderLM.
    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def lm_head(self) -> nn.Module:
        return self.decoder.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.decoder.embed_tokens

    def new_kv_cache(self, batch_size: int, max_len: int | None = None):
        return self.decoder.new_kv_cache(batch_size, max_len)

    def init_weights(self) -> None:
        """Re-initialises after ``to_empty`` (mmllm.checkpoint rebuilds, then loads the weights)."""
        self.decoder.init_weights()

    # ------------------------------------------------------------------------------ images
    def image_embeddings(self, *, images: torch.Tensor | None = None,
                         image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """(n, 3, H, W) images or (n, N, Dv) encoder features -> (n, M, D) connector outputs."""
        if images is not None and image_features is not None:
            raise ValueError("give images or image_features, not both")
        if images is not None and images.shape[0] == 0:
            images = None
        if images is not None:
            if self.vision is None:
                raise ValueError("this model has no vision encoder: pass cached image_features")
            image_features = self.vision(images)
        if image_features is None or image_features.shape[0] == 0:
            return None
        dtype = next(self.connector.parameters()).dtype
        return self.connector(image_features.to(dtype))

    def embed(self, input_ids: torch.Tensor, *, images: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids (+ images) -> (B, T, D) input embeddings with the image features in place."""
        x = self.decoder.embed_tokens(input_ids)  # (B, T, D)
        slots = input_ids == self.image_token_id  # (B, T)
        feats = self.image_embeddings(images=images, image_features=image_features)
        n_slots = int(slots.sum())
        n_feats = 0 if feats is None else feats.shape[0] * feats.shape[1]
        if n_slots != n_feats:
            n_img = 0 if feats is None else feats.shape[0]
            raise ValueError(f"the batch has {n_slots} image positions but {n_img} images give "
                             f"{n_feats} features ({n_img} x M): every image needs exactly M "
                             "<ImageFeature> tokens, in order")
        if feats is None:
            return x
        # Row-major order of the slots = the order of the images in the batch.
        return x.masked_scatter(slots.unsqueeze(-1), feats.to(x.dtype).reshape(-1, x.shape[-1]))

    def forward(self, input_ids: torch.Tensor, *, images: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, **kwargs) -> DecoderOutput:
        """Runs the decoder on ``input_ids`` with image features at the placeholders.

        Args:
            input_ids: (B, T).
            images: (n, 3, H, W) preprocessed images of the whole batch, in placeholder order.
            image_features: (n, N, Dv) cached encoder features instead of ``images``.
            kwargs: passed to the decoder (attention_mask, position_ids, kv_cache,
                return_hidden, return_logits).
        """
        x = self.embed(input_ids, images=images, image_features=image_features)
        return self.decoder(input_ids, inputs_embeds=x, **kwargs)

    # ---------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], images: Sequence[torch.Tensor | None], *,
                 max_new_tokens: int = 32, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int = 0, sampling=None, generator: torch.Generator | None = None,
                 progress: bool | str = False) -> list[list[int]]:
        """Generates from prompts holding image spans: each row is prefilled from embeddings.

        Args:
            prompts: token ids per row (with ``<Img><ImageFeature>*M</Img>`` spans).
            images: per row, (k, 3, H, W) preprocessed images (k = its spans) or None.
            sampling: a :class:`mmllm.generation.SamplingParams` (default greedy).
            progress: a tqdm bar over the token budget (True, or its name as a string).

        Returns:
            The new token ids of every row.
        """
        from mmllm.generation.progress import decode
        from mmllm.generation.session import DecodeSession

        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
        embeds = [self.embed(torch.tensor([p], device=self.embed_tokens.weight.device),
                             images=im)[0] for p, im in zip(prompts, images)]  # (T_i, D) each
        session = DecodeSession(self.decoder, max_rows=len(prompts),
                                max_len=max(len(p) for p in prompts) + max_new_tokens + 1,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                generator=generator)
        rows = session.add_rows(inputs_embeds=embeds, max_new_tokens=max_new_tokens, sampling=sampling)
        decode(session, rows, progress=progress)
        return [session.rows[r].tokens for r in rows]


def build_vlm(*, connector: Connector, image_token_id: int, vocab_size: int,
              lm: DecoderLM | None = None, lm_init_from: str | None = None,
              vision: VisionEncoder | None = None) -> VisionLanguageModel:
    """A VLM from a fresh or pretrained LM whose vocabulary grows to ``vocab_size``.

    Args:
        connector: the connector.
        image_token_id: id of ``<ImageFeature>``.
        vocab_size: ``len(tokenizer)`` after :func:`mmllm.data.vlm_collate.add_vlm_tokens`.
        lm: the LM to start from (or ``lm_init_from``: any mmllm.checkpoint.load_model source).
        vision: the encoder (None: features come from a cache).
    """
    if (lm is None) == (lm_init_from is None):
        raise ValueError("give exactly one of lm or lm_init_from")
    if lm is None:
        from mmllm.checkpoint import load_model

        lm = load_model(lm_init_from)[0]
    if vocab_size > lm.vocab_size:
        lm.resize_token_embeddings(vocab_size)
    return VisionLanguageModel(decoder=lm, connector=connector, image_token_id=image_token_id,
                               vision=vision)

"""GLM blank-infilling pretraining on the kit's LLaMA-style decoder (a research variant).

What it changes against ``mmllm.modules.CausalLMModule`` (see README.md): the objective is GLM's
autoregressive blank infilling (``blank_infilling.py``) instead of left-to-right next-token
prediction; the context (Part A) is attended bidirectionally; a second, learned "block position"
embedding (zero-initialised, so step 0 is exactly the decoder) is added to the token embeddings,
while the decoder's own rotary positions carry GLM's first position id. The decoder's weights are
the kit's ``DecoderLM`` unchanged, so a GLM-trained checkpoint loads and generates left to right
with ``mmllm generate`` like any other.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from components.glm.blank_infilling import InfillBatch, blank_infilling_batch
from mmllm.losses import causal_lm_loss
from mmllm.modules import CausalLMModule
from mmllm.nn.attention import AttentionInputs


def glm_forward(decoder: nn.Module, block_embed: nn.Embedding, batch: InfillBatch) -> torch.Tensor:
    """Logits (B, T, V) of ``decoder`` on a blank-infilling batch (2D positions, GLM's mask)."""
    if getattr(decoder, "alibi", None) is not None:
        raise ValueError("GLM's 2D positions need position='rope' or 'learned', not ALiBi")
    x = decoder.embed_tokens(batch.input_ids) + block_embed(batch.block_position_ids)  # (B, T, C)
    if decoder.pos_embed is not None:
        x = x + decoder.pos_embed(batch.position_ids)
    rope = decoder.rotary(batch.position_ids, x.dtype) if decoder.rotary is not None else None
    inputs = AttentionInputs(mask=batch.allowed[:, None], is_causal=False)  # (B, 1, T, T)
    for layer in decoder.layers:
        x, _ = layer(x, inputs=inputs, rope=rope, kv_cache=None)
    return decoder.lm_head(decoder.norm(x))


class GLMModule(CausalLMModule):
    """``CausalLMModule`` trained with GLM's autoregressive blank infilling.

    Args:
        mask_ratio: share of each sequence's tokens masked in spans (the paper: 15 %).
        poisson_lambda: mean span length (the paper: 3).
        max_span: longest span the block-position table covers (longer spans are clipped).
        special_ids: ``[mask, start, end]`` token ids; None: the last three ids of the model's
            vocabulary (set ``model.lm.vocab_size`` to the tokenizer's size + 3; checked at fit).
        seed: seed of the corruption RNG (one stream per process and rank).
        **kwargs: the arguments of ``CausalLMModule``.
    """

    def __init__(self, *, mask_ratio: float = 0.15, poisson_lambda: float = 3.0, max_span: int = 64,
                 special_ids: list[int] | None = None, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio={mask_ratio}: must be in (0, 1)")
        self.mask_ratio, self.poisson_lambda, self.max_span = mask_ratio, poisson_lambda, max_span
        self.special_ids, self.seed = special_ids, seed
        self.block_embed: nn.Embedding | None = None
        self._rng: np.random.Generator | None = None
        self._val_rng: np.random.Generator | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.block_embed is None:
            self.block_embed = nn.Embedding(self.max_span + 2, self.model.dim)
            nn.init.zeros_(self.block_embed.weight)

    def ids(self) -> tuple[int, int, int]:
        if self.special_ids is not None:
            return tuple(self.special_ids)
        v = self.model.vocab_size
        return v - 3, v - 2, v - 1

    def on_fit_start(self) -> None:
        super().on_fit_start()
        tok = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tok is not None and self.special_ids is None and len(tok) > self.model.vocab_size - 3:
            raise ValueError(f"GLM reserves the last 3 ids of the vocabulary for [MASK]/[START]/[END]: "
                             f"set model.lm.vocab_size >= {len(tok) + 3} (tokenizer: {len(tok)})")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        # The same corruptions every validation: val/loss is comparable across epochs.
        self._val_rng = np.random.default_rng([self.seed, self.global_rank, 1])

    def corrupt(self, input_ids: torch.Tensor) -> InfillBatch:
        if self._rng is None:
            self._rng = np.random.default_rng([self.seed, self.global_rank])
        rng = self._rng if self.training or self._val_rng is None else self._val_rng
        mask_id, start_id, end_id = self.ids()
        b = blank_infilling_batch(input_ids, rng, mask_id=mask_id, start_id=start_id,
                                  end_id=end_id, mask_ratio=self.mask_ratio,
                                  poisson_lambda=self.poisson_lambda)
        b.block_position_ids.clamp_(max=self.max_span + 1)
        return b

    def forward_loss(self, batch: dict[str, torch.Tensor]):
        infill = self.corrupt(batch["input_ids"])
        logits = glm_forward(self.model, self.block_embed, infill)
        loss, n = causal_lm_loss(logits, infill.labels)
        return loss, loss, n

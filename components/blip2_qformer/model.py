"""The Q-Former of BLIP-2 stage 1: the kit's :class:`~mmllm.nn.connectors.QFormer` plus a text branch.

BLIP-2 (Li et al. 2023, section 3.1) builds the Q-Former from two transformers that share their
self-attention layers: an image transformer (the learnable queries, which also cross-attend to
the frozen image features) and a text transformer (a BERT encoder/decoder). Here the image side
*is* the connector: its queries, ``image_norm``, ``query_norm`` and every layer's self-attention,
cross-attention and FFN weights are used as they are, so after pretraining ``connector.save``
writes exactly the weights ``vlm_stage1`` loads. The text side adds word + position embeddings
(normalised by the connector's ``query_norm``, as BLIP-2's one embedding LayerNorm), a text FFN
per layer (BLIP-2 has separate query/text FFNs; these start as copies of the connector's, so a
BERT init reaches both) and the heads of the three objectives.

The connector's ``Attention`` takes no mask, so the masked forward over the joint sequence
``[queries; text]`` is written here from the same q/k/v/out projections. Text never
cross-attends to the image: it reaches the image only through the queries.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.nn.connectors import Attention, QFormer


def masked_attention(attn: Attention, x: torch.Tensor, context: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """``attn``'s projections applied with an attention mask.

    Args:
        attn: a connector :class:`Attention` (its ``query/key/value/out`` linears).
        x: (B, L, C) queries.
        context: (B, S, Ckv) keys/values.
        mask: (B, 1, L, S) bool (True = may attend) or None.

    Returns:
        (B, L, C).
    """
    B, L, C = x.shape
    h = attn.n_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, S, C) -> (B, h, S, C/h)
        return t.view(B, t.shape[1], h, C // h).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(context)), heads(attn.value(context))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.out(y.transpose(1, 2).reshape(B, L, C))


class _TextFFN(nn.Module):
    """The text transformer's FFN of one layer (BERT ``intermediate``/``output``)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.fc1, self.fc2, self.norm = copy.deepcopy(fc1), copy.deepcopy(fc2), copy.deepcopy(norm)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.norm(t + self.fc2(F.gelu(self.fc1(t))))


class QFormerWithText(nn.Module):
    """A connector Q-Former with BLIP-2's text branch and ITC / ITM / ITG heads.

    Args:
        qformer: the connector whose weights are pretrained (and later saved with its ``save``).
        vocab_size: text vocabulary size (the tokenizer's, special tokens included).
        max_text_len: position-embedding table size (longest text, [CLS]/[DEC] included).
        embed_dim: width of the ITC embedding space (BLIP-2: 256).
        temperature: initial ITC temperature (BLIP-2: 0.07; learnable, clamped to [0.001, 0.5]).
    """

    def __init__(self, *, qformer: QFormer, vocab_size: int, max_text_len: int = 64,
                 embed_dim: int = 256, temperature: float = 0.07) -> None:
        super().__init__()
        if not isinstance(qformer, QFormer):
            raise TypeError(f"BLIP-2 pretraining needs a QFormer connector, got {type(qformer).__name__}")
        self.qformer = qformer
        dim = qformer.queries.shape[-1]
        self.dim, self.vocab_size, self.max_text_len = dim, vocab_size, max_text_len
        self.word_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_text_len, dim)
        nn.init.normal_(self.word_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.text_ffn = nn.ModuleList(_TextFFN(l.fc1, l.fc2, l.ffn_norm) for l in qformer.layers)
        self.vision_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.itm_head = nn.Linear(dim, 2)
        # BERT's LM prediction head: transform, then a decoder tied to the word embeddings.
        self.lm_transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(),
                                          nn.LayerNorm(dim, eps=qformer.query_norm.eps))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.temp = nn.Parameter(torch.tensor(float(temperature)))

    @property
    def num_queries(self) -> int:
        return self.qformer.num_queries

    def encode(self, image_features: torch.Tensor, text_ids: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared-self-attention forward of queries and text under one attention mask.

        Args:
            image_features: (B, N, Dv) frozen-encoder features.
            text_ids: (B, T) token ids (first token [CLS] or [DEC]).
            mask: (B, 1, M + T, M + T) bool, one of :mod:`components.blip2_qformer.masks`.

        Returns:
            ``(query_out (B, M, dim), text_out (B, T, dim))``.
        """
        B, T = text_ids.shape
        if T > self.max_text_len:
            raise ValueError(f"text of {T} tokens exceeds max_text_len={self.max_text_len}")
        qf, M = self.qformer, self.num_queries
        image = qf.image_norm(image_features)  # (B, N, Dv)
        text = self.word_embed(text_ids) + self.pos_embed(torch.arange(T, device=text_ids.device))
        x = qf.query_norm(torch.cat([qf.queries.expand(B, -1, -1), text], dim=1))  # (B, M + T, dim)
        for layer, text_ffn in zip(qf.layers, self.text_ffn):
            x = layer.self_norm(x + masked_attention(layer.self_attn, x, x, mask))
            q, t = x[:, :M], x[:, M:]
            if layer.cross_attn is not None:  # only the queries read the image
                q = layer.cross_norm(q + layer.cross_attn(q, image))
            q = layer.ffn_norm(q + layer.fc2(F.gelu(layer.fc1(q))))
            x = torch.cat([q, text_ffn(t)], dim=1)
        return x[:, :M], x[:, M:]

    def lm_logits(self, text_out: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, vocab) next-token logits (decoder tied to ``word_embed``)."""
        return F.linear(self.lm_transform(text_out), self.word_embed.weight, self.lm_bias)

    def clamped_temp(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)

"""DecoderLM: a LLaMA-style decoder-only language model assembled from mmllm.nn blocks.

The constructor's keyword-only arguments are the model's config schema (conf/model/lm/*.yaml).
Parameter names follow transformers' LlamaForCausalLM where the architectures coincide, which keeps
HF import/export a rename (see mmllm.models.hf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmllm.nn.attention import KVCache, build_attention_inputs
from mmllm.nn.block import DecoderBlock
from mmllm.nn.mlp import llama_hidden_dim
from mmllm.nn.moe import GroupedExperts
from mmllm.nn.norms import build_norm
from mmllm.nn.position import RotaryEmbedding, alibi_slopes

POSITIONS = ("rope", "alibi", "learned")


@dataclass
class DecoderOutput:
    """What :meth:`DecoderLM.forward` returns.

    Attributes:
        logits: (B, T, V), or None when ``return_logits=False``.
        aux_loss: MoE load-balancing loss summed over layers (0 for dense models).
        hidden: (B, T, C) final normed hidden states when ``return_hidden=True``.
    """

    logits: torch.Tensor | None
    aux_loss: torch.Tensor
    hidden: torch.Tensor | None = None


def positions_from_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its document: (B, T) doc ids -> (B, T) positions."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


class DecoderLM(nn.Module):
    """Decoder-only transformer LM.

    Args:
        vocab_size: embedding rows / logits.
        dim: model width.
        n_layers: number of blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (None = n_heads: MHA; 1: MQA; otherwise GQA).
        head_dim: per-head width (None = dim // n_heads).
        hidden_dim: MLP width (None = LLaMA's rule from ``multiple_of``/``ffn_dim_multiplier``).
        multiple_of: rounding of the LLaMA MLP width.
        ffn_dim_multiplier: optional multiplier of the LLaMA MLP width.
        norm: "rmsnorm" (LLaMA) or "layernorm".
        norm_eps: norm epsilon.
        mlp: "swiglu" (LLaMA) or "gelu".
        bias: biases in linear layers.
        position: "rope", "alibi" or "learned".
        rope_base: RoPE theta.
        rope_scaling: RoPE scaling dict (see :func:`mmllm.nn.position.rope_inv_freq`).
        max_seq_len: longest sequence (learned positions, KV cache default).
        tie_embeddings: share the input embedding and the output projection.
        attn_backend: "sdpa", "flash_attn" or "eager".
        n_experts: > 0 replaces every MLP by a mixture of that many experts.
        moe_top_k: experts per token.
        init_std: std of the normal init of weights.
        depth_scaled_init: scale output projections' init by 1/sqrt(2 * n_layers) (GPT-2).
    """

    def __init__(self, *, vocab_size: int, dim: int, n_layers: int, n_heads: int,
                 n_kv_heads: int | None = None, head_dim: int | None = None,
                 hidden_dim: int | None = None, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, norm: str = "rmsnorm",
                 norm_eps: float = 1e-5, mlp: str = "swiglu", bias: bool = False,
                 position: str = "rope", rope_base: float = 10_000.0,
                 rope_scaling: dict | None = None, max_seq_len: int = 2048,
                 tie_embeddings: bool = False, attn_backend: str = "sdpa", n_experts: int = 0,
                 moe_top_k: int = 2, init_std: float = 0.02, depth_scaled_init: bool = True) -> None:
        super().__init__()
        # The constructor arguments are the model's schema: kept to rebuild it from a checkpoint.
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if position not in POSITIONS:
            raise ValueError(f"unknown position {position!r}: expected one of {POSITIONS}")
        n_kv_heads = n_kv_heads or n_heads
        head_dim = head_dim or dim // n_heads
        hidden_dim = hidden_dim or llama_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.vocab_size, self.dim, self.n_layers = vocab_size, dim, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.hidden_dim, self.position, self.max_seq_len = hidden_dim, position, max_seq_len
        self.tie_embeddings, self.n_experts, self.moe_top_k = tie_embeddings, n_experts, moe_top_k
        self.init_std, self.depth_scaled_init = init_std, depth_scaled_init

        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_seq_len, dim) if position == "learned" else None
        self.rotary = RotaryEmbedding(head_dim, base=rope_base, scaling=rope_scaling) if position == "rope" else None
        if position == "alibi":
            self.register_buffer("alibi", alibi_slopes(n_heads), persistent=False)
        else:
            self.alibi = None
        self.layers = nn.ModuleList(
            DecoderBlock(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         hidden_dim=hidden_dim, norm=norm, norm_eps=norm_eps, mlp=mlp, bias=bias,
                         attn_backend=attn_backend, n_experts=n_experts, moe_top_k=moe_top_k,
                         layer_idx=i)
            for i in range(n_layers))
        self.norm = build_norm(norm, dim, norm_eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # ----------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms; output projections scaled by depth.

        Also callable after ``to_empty()`` from the meta device (buffers are recomputed and the
        tied embedding, which ``to_empty`` unties, is re-tied).
        """
        if self.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        out_std = self.init_std / math.sqrt(2 * self.n_layers) if self.depth_scaled_init else self.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = out_std if name.endswith(("o_proj", "down_proj")) else self.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
            elif isinstance(module, GroupedExperts):  # stacked MoE experts: same rule as Linear
                module.init_weights(std=self.init_std, out_std=out_std)
            elif hasattr(module, "reset_parameters") and not isinstance(module, DecoderLM):
                if not list(module.children()):  # norms, rotary tables
                    module.reset_parameters()
        if self.alibi is not None:
            self.alibi = alibi_slopes(self.n_heads).to(self.alibi.device)

    # ----------------------------------------------------------------------------------- info
    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count (shared tied weights counted once)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
        return n

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for this model's dtype; its kv heads are those the attention writes (the
        rank's local heads under tensor parallelism), so the storage is sized at the first write."""
        return KVCache(n_layers=self.n_layers, batch_size=batch_size,
                       max_len=max_len or self.max_seq_len, dtype=self.embed_tokens.weight.dtype)

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grows (or shrinks) the vocabulary; new rows are the mean of the old rows."""
        old = self.embed_tokens.weight.data
        n = min(old.shape[0], new_size)

        def grown(weight: torch.Tensor) -> torch.Tensor:
            new = weight.new_empty(new_size, weight.shape[1])
            new[:n] = weight[:n]
            new[n:] = weight.mean(0, keepdim=True)
            return new

        self.embed_tokens = nn.Embedding(new_size, self.dim, device=old.device, dtype=old.dtype)
        self.embed_tokens.weight.data = grown(old)
        if self.tie_embeddings:
            self.lm_head = nn.Linear(self.dim, new_size, bias=False, device=old.device, dtype=old.dtype)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            head = self.lm_head.weight.data
            self.lm_head = nn.Linear(self.dim, new_size, bias=False, device=head.device, dtype=head.dtype)
            self.lm_head.weight.data = grown(head)
        self.vocab_size = new_size
        # The recorded constructor config rebuilds the model from a checkpoint: keep it in step.
        self.config["vocab_size"] = new_size

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, inputs_embeds: torch.Tensor | None = None,
                return_hidden: bool = False, return_logits: bool = True) -> DecoderOutput:
        """Runs the model.

        Args:
            input_ids: (B, T) token ids (ignored when ``inputs_embeds`` is given).
            position_ids: (B, T); default: per-document positions if ``doc_ids`` else offsets
                from the KV cache (minus left padding when ``attention_mask`` is given).
            doc_ids: (B, T) document index of each token in a packed sequence; attention stays
                inside a document and positions restart at each document.
            attention_mask: (B, T_total) 1 for tokens, 0 for (left) padding, covering cached
                and new positions.
            kv_cache: a :class:`KVCache` to read and extend (generation).
            inputs_embeds: (B, T, C) embeddings used instead of ``input_ids`` (vision-language).
            return_hidden: also return the final normed hidden states.
            return_logits: compute the (B, T, V) logits (skip for value/reward heads).
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        # Cached positions per row (an int when all rows agree) and the keys attention reads.
        past, kv_len = kv_cache.begin(B, T, x.device) if kv_cache is not None else (0, T)
        if position_ids is None:
            position_ids = self._default_positions(B, T, past, doc_ids, attention_mask, x.device)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        inputs = build_attention_inputs(q_len=T, kv_len=kv_len, device=x.device, dtype=x.dtype,
                                        doc_ids=doc_ids, padding_mask=attention_mask,
                                        alibi_slopes=self.alibi, q_offset=past)
        rope = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, layer_aux = layer(x, inputs=inputs, rope=rope, kv_cache=kv_cache)
            aux = aux + layer_aux
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm(x)
        logits = self.lm_head(x) if return_logits else None
        return DecoderOutput(logits=logits, aux_loss=aux, hidden=x if return_hidden else None)

    @staticmethod
    def _default_positions(B: int, T: int, past: int | torch.Tensor, doc_ids, attention_mask,
                           device) -> torch.Tensor:
        if doc_ids is not None:
            return positions_from_docs(doc_ids)
        steps = torch.arange(T, device=device)
        if attention_mask is not None:
            # Left padding: positions count real tokens only, as HF does.
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if isinstance(past, torch.Tensor):  # rows of a ragged cache: (B, T) key indices
                return pos.gather(1, past[:, None] + steps)
            return pos[:, past:past + T]
        if isinstance(past, torch.Tensor):
            return past[:, None] + steps  # (B, T): each row continues from its own length
        return (steps + past).expand(B, T)

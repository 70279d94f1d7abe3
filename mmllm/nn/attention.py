"""Multi-head attention with grouped / multi-query KV heads, a KV cache and three backends.

Backends:
    ``sdpa``       torch's scaled_dot_product_attention (default; picks flash/mem-efficient/math).
    ``flash_attn`` the flash-attn package when importable on CUDA with fp16/bf16 (varlen kernel for
                   packed documents); anything it cannot do (a padding mask, fp32, CPU) falls back
                   to SDPA so one config runs everywhere.
    ``eager``      explicit softmax(QK^T / sqrt(d) + mask) V, the reference for tests.

Masking is described once per forward by :class:`AttentionInputs` (built by
:func:`build_attention_inputs`) and shared by all layers.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.nn.position import apply_rope

FLASH_ATTN_AVAILABLE = importlib.util.find_spec("flash_attn") is not None
BACKENDS = ("sdpa", "flash_attn", "eager")


@dataclass
class AttentionInputs:
    """Masking shared by every layer of one forward pass.

    Attributes:
        mask: None for plain causal attention, else a bool (B|1, 1, Tq, Tk) "may attend" mask, or
            a float additive bias (B|1, H|1, Tq, Tk) when ALiBi is on.
        is_causal: True when ``mask`` is None and queries and keys are the same positions.
        doc_ids: (B, T) document index per token for packed sequences (flash varlen path).
        alibi_slopes: (H,) ALiBi slopes or None.
        has_padding: a key-padding mask was given (flash_attn cannot use it; SDPA is used).
    """

    mask: torch.Tensor | None
    is_causal: bool
    doc_ids: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    has_padding: bool = False


def build_attention_inputs(
    *,
    q_len: int,
    kv_len: int,
    device: torch.device,
    dtype: torch.dtype,
    doc_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> AttentionInputs:
    """Builds the causal (+ per-document, + key-padding, + ALiBi) mask for one forward.

    Args:
        q_len: number of new query positions; they are the last ``q_len`` of ``kv_len`` keys.
        kv_len: number of key positions (cached + new).
        doc_ids: (B, T) with T == q_len == kv_len: tokens attend only within their document.
        padding_mask: (B, kv_len), 1 for real tokens, 0 for padding (left padding in generation).
        alibi_slopes: (H,) slopes; adds ``-slope * (i - j)`` to the scores.
    """
    offset = kv_len - q_len
    plain = doc_ids is None and padding_mask is None and alibi_slopes is None
    if plain and offset == 0:
        return AttentionInputs(mask=None, is_causal=True)
    q_pos = torch.arange(q_len, device=device) + offset
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if doc_ids is not None:
        if offset:
            raise ValueError("doc_ids masking is for training/scoring without a KV cache")
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if padding_mask is not None:
        keep = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        # A query always sees itself, so rows of padding never become all -inf (NaN softmax).
        diag = (k_pos[None, :] == q_pos[:, None])[None, None]
        allowed = allowed & (keep | diag)
    if alibi_slopes is None:
        return AttentionInputs(mask=allowed, is_causal=False, doc_ids=doc_ids,
                               has_padding=padding_mask is not None)
    dist = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).to(torch.float32)  # (Tq, Tk)
    bias = -alibi_slopes.to(device)[None, :, None, None] * dist[None, None]  # (1, H, Tq, Tk)
    bias = bias.masked_fill(~allowed, float("-inf")).to(dtype)
    return AttentionInputs(mask=bias, is_causal=False, doc_ids=doc_ids, alibi_slopes=alibi_slopes,
                           has_padding=padding_mask is not None)


class KVCache:
    """Preallocated keys and values for all layers: (L, B, n_kv_heads, max_len, head_dim).

    Layers write their new keys with :meth:`update`; the model calls :meth:`advance` once per
    forward. Left-padded batches share one length; padding is masked by the attention mask.
    """

    def __init__(self, *, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int,
                 head_dim: int, device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorders / repeats the batch rows: row i becomes old row ``index[i]``.

        Used to compute a shared prefix once and expand it for several continuations (beam
        search, few-shot scoring). The result is a copy, so later writes do not alias rows.
        """
        self.k = self.k[:, index]  # (L, N, Hkv, max_len, hd)
        self.v = self.v[:, index]


def _flash_ok(q: torch.Tensor, inputs: AttentionInputs, q_len: int, kv_len: int) -> bool:
    return (FLASH_ATTN_AVAILABLE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and not inputs.has_padding and q_len == kv_len)


def _flash_attention(q, k, v, inputs: AttentionInputs) -> torch.Tensor:
    """flash-attn on (B, H, T, hd) tensors; varlen over documents when doc_ids are given."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, T, hd = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, hd)
    slopes = None if inputs.alibi_slopes is None else inputs.alibi_slopes.to(q.device, torch.float32)
    if inputs.doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes).transpose(1, 2)
    # Documents become independent sequences: boundaries wherever doc id changes (or a row ends).
    flat = inputs.doc_ids.reshape(-1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[1:] = flat[1:] != flat[:-1]
    new[::T] = True
    starts = torch.nonzero(new).flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(B * T, H, hd), k.reshape(B * T, -1, hd),
                                 v.reshape(B * T, -1, hd), cu, cu, max_len, max_len,
                                 causal=True, alibi_slopes=slopes)
    return out.view(B, T, H, hd).transpose(1, 2)


def _eager_attention(q, k, v, inputs: AttentionInputs) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if inputs.mask is None:
        tq, tk = scores.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif inputs.mask.dtype == torch.bool:
        scores = scores.masked_fill(~inputs.mask, float("-inf"))
    else:
        scores = scores + inputs.mask
    return scores.float().softmax(-1).to(q.dtype) @ v


class Attention(nn.Module):
    """Causal self-attention with ``n_kv_heads`` <= ``n_heads`` (MHA, GQA, MQA).

    Parameter names follow transformers' LlamaAttention (q_proj, k_proj, v_proj, o_proj).
    """

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, backend: str = "sdpa", layer_idx: int = 0) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: expected one of {BACKENDS}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.backend, self.layer_idx = backend, layer_idx
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, *, inputs: AttentionInputs,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the weights, so a tensor-parallel shard sees its local heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if self.backend == "flash_attn" and _flash_ok(q, inputs, T, k.shape[2]):
            out = _flash_attention(q, k, v, inputs)
        elif self.backend == "eager":
            out = _eager_attention(q, k, v, inputs)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=inputs.mask, is_causal=inputs.is_causal and T == k.shape[2],
                enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

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
import warnings
from collections.abc import Sequence
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
    q_offset: int | torch.Tensor | None = None,
) -> AttentionInputs:
    """Builds the causal (+ per-document, + key-padding, + ALiBi) mask for one forward.

    Args:
        q_len: number of new query positions.
        kv_len: number of key positions (cached + new) the attention reads.
        doc_ids: (B, T) with T == q_len == kv_len: tokens attend only within their document.
        padding_mask: (B, kv_len), 1 for real tokens, 0 for padding (left padding in generation).
        alibi_slopes: (H,) slopes; adds ``-slope * (i - j)`` to the scores.
        q_offset: key position of the first query: an int shared by all rows, a (B,) tensor
            when the rows of a KV cache have different lengths, or None for ``kv_len - q_len``
            (the queries are the last keys).
    """
    offset = kv_len - q_len if q_offset is None else q_offset
    ragged = isinstance(offset, torch.Tensor)
    plain = doc_ids is None and padding_mask is None and alibi_slopes is None
    if plain and not ragged and offset == 0 and kv_len == q_len:
        return AttentionInputs(mask=None, is_causal=True)
    if plain and not ragged and q_len == 1 and kv_len == offset + 1:
        return AttentionInputs(mask=None, is_causal=False)  # one query that sees every key
    ar = torch.arange(q_len, device=device)
    q_pos = offset[:, None] + ar if ragged else (ar + offset)[None]  # (B|1, Tq)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # (B|1, 1, Tq, Tk)
    if doc_ids is not None:
        if ragged or offset:
            raise ValueError("doc_ids masking is for training/scoring without a KV cache")
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if padding_mask is not None:
        keep = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        # A query always sees itself, so rows of padding never become all -inf (NaN softmax).
        diag = (k_pos[None, None, :] == q_pos[:, :, None])[:, None]
        allowed = allowed & (keep | diag)
    if alibi_slopes is None:
        return AttentionInputs(mask=allowed, is_causal=False, doc_ids=doc_ids,
                               has_padding=padding_mask is not None)
    dist = (q_pos[:, :, None] - k_pos[None, None, :]).clamp(min=0).to(torch.float32)  # (B|1, Tq, Tk)
    bias = -alibi_slopes.to(device)[None, :, None, None] * dist[:, None]  # (B|1, H, Tq, Tk)
    bias = bias.masked_fill(~allowed, float("-inf")).to(dtype)
    return AttentionInputs(mask=bias, is_causal=False, doc_ids=doc_ids, alibi_slopes=alibi_slopes,
                           has_padding=padding_mask is not None)


@dataclass
class _Plan:
    """Where one forward reads and writes the cache (see :meth:`KVCache.plan`).

    Attributes:
        rows: the cache rows of the batch: a slice (a view, no copy) or a (B,) index tensor.
        offset: per-row cached length before the forward: an int when all rows agree, else (B,).
        kv_len: keys the attention reads (the longest row after the forward).
        start: with ``pos`` None, every row writes its T new keys at ``start`` (contiguous).
        pos: (B, T) cache column of every new key; padding of short rows writes to the scratch
            column ``max_len``, which is never read.
        n_new: new tokens per row (host ints).
    """

    rows: slice | torch.Tensor
    offset: int | torch.Tensor
    kv_len: int
    start: int = 0
    pos: torch.Tensor | None = None
    n_new: list[int] | None = None


class KVCache:
    """Preallocated keys and values of all layers, with a length per row (a row is a sequence).

    Storage is (L, B, n_kv_heads, max_len + 1, head_dim): row ``b`` holds its ``lengths[b]``
    positions at the front, so rows of one batch can be at different lengths (continuous
    batching, tool results appended to one row) and a row is truncated or freed by setting its
    length. Column ``max_len`` is scratch for the padding of rows that take fewer new tokens.

    A forward over the cache covers all rows with T new tokens each, unless :meth:`plan` chose
    some rows and a count per row first. The model calls :meth:`begin` (offsets and key length),
    each layer :meth:`update`, and the model :meth:`advance` once at the end.

    Args:
        n_kv_heads: kv heads per row; None sizes the storage from the first keys written, which
            under tensor parallelism are the rank's local heads (n_kv_heads / tp).
        head_dim, device, dtype: likewise taken from the first keys when None.
    """

    def __init__(self, *, n_layers: int, batch_size: int, max_len: int,
                 n_kv_heads: int | None = None, head_dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.n_layers, self.max_len = n_layers, max_len
        self.n_kv_heads, self.head_dim, self.device, self.dtype = n_kv_heads, head_dim, device, dtype
        self.lengths: list[int] = [0] * batch_size  # host copy: plans need no device sync
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._plan: _Plan | None = None
        self._static: _Plan | None = None
        if None not in (n_kv_heads, head_dim, device, dtype):
            self._allocate(n_kv_heads, head_dim, torch.device(device), dtype)

    def _allocate(self, n_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (self.n_layers, self.batch_size, n_kv_heads, self.max_len + 1, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_kv_heads, self.head_dim, self.device, self.dtype = n_kv_heads, head_dim, device, dtype

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The length shared by all rows (ValueError when rows differ: read ``lengths``)."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"KV cache rows have different lengths {self.lengths}")
        return self.lengths[0] if self.lengths else 0

    # ------------------------------------------------------------------------ one forward
    def plan(self, rows: Sequence[int] | None = None, n_new: Sequence[int] | int | None = None) -> None:
        """Chooses the rows of the next forward and how many of its T tokens each one takes.

        Args:
            rows: cache rows, in batch order (None: all rows).
            n_new: new tokens per row (int: the same for all); the batch is right-padded to T.
                None: every row takes all T tokens (set when the forward starts).
        """
        rows = list(range(self.batch_size)) if rows is None else [int(r) for r in rows]
        if n_new is None:
            self._plan = _Plan(rows=rows, offset=0, kv_len=0)  # completed by begin()
            return
        n_new = [int(n_new)] * len(rows) if isinstance(n_new, int) else [int(n) for n in n_new]
        if len(n_new) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(n_new)} token counts")
        self._plan = _Plan(rows=rows, offset=0, kv_len=0, n_new=n_new)

    def begin(self, batch: int, q_len: int, device: torch.device) -> tuple[int | torch.Tensor, int]:
        """Called by the model at the start of a forward of ``batch`` rows of ``q_len`` tokens.

        Returns:
            ``(offset, kv_len)``: the first query's position per row (int when shared, else a
            (B,) tensor) and the number of keys the attention reads.
        """
        if self._plan is not None and self._plan is self._static:
            return self._plan.offset, self._plan.kv_len  # device tensors only: graph-capturable
        plan = self._plan or _Plan(rows=list(range(self.batch_size)), offset=0, kv_len=0)
        rows = plan.rows
        n_new = plan.n_new or [q_len] * len(rows)
        if len(rows) != batch:
            raise ValueError(f"KV cache plan covers {len(rows)} rows, the forward has {batch}")
        if max(n_new, default=0) > q_len:
            raise ValueError(f"a row takes {max(n_new)} new tokens but the forward has {q_len}")
        offsets = [self.lengths[r] for r in rows]
        ends = [o + n for o, n in zip(offsets, n_new)]
        if max(ends, default=0) > self.max_len:
            raise ValueError(f"KV cache overflow: {max(ends)} positions > max_len {self.max_len}")
        self.device = self.device or device
        self._plan = self._resolve(rows, offsets, n_new, q_len)
        for r, e in zip(rows, ends):
            self.lengths[r] = e
        return self._plan.offset, self._plan.kv_len

    def _resolve(self, rows: list[int], offsets: list[int], n_new: list[int], q_len: int) -> _Plan:
        device = self.device
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        sel = slice(rows[0], rows[0] + len(rows)) if contiguous and rows else \
            torch.tensor(rows, dtype=torch.long, device=device)
        kv_len = max(1, max(o + n for o, n in zip(offsets, n_new)))
        if len(set(offsets)) <= 1 and all(n == q_len for n in n_new):
            start = offsets[0] if offsets else 0
            return _Plan(rows=sel, offset=start, kv_len=kv_len, start=start, n_new=n_new)
        off = torch.tensor(offsets, dtype=torch.long, device=device)
        pos = off[:, None] + torch.arange(q_len, device=device)  # (B, T)
        real = torch.arange(q_len, device=device)[None] < torch.tensor(n_new, device=device)[:, None]
        pos = torch.where(real, pos, torch.full_like(pos, self.max_len))
        offset = offsets[0] if len(set(offsets)) == 1 else off
        return _Plan(rows=sel, offset=offset, kv_len=kv_len, pos=pos, n_new=n_new)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes one layer's new (B, Hkv, T, hd) keys/values; returns the (B, Hkv, kv_len, hd) ones."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("KVCache.update outside a forward: the model calls begin() first")
        if self.k is None:
            self._allocate(k.shape[1], k.shape[3], k.device, self.dtype or k.dtype)
        if k.shape[1] != self.n_kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"KV cache holds {self.n_kv_heads} kv heads of {self.head_dim} per row "
                             f"but layer {layer} wrote {k.shape[1]} of {k.shape[3]}: under tensor "
                             "parallelism size it from the local shard (n_kv_heads=None)")
        B, _, T, _ = k.shape
        if plan.pos is None and isinstance(plan.rows, slice):  # contiguous rows and columns
            self.k[layer, plan.rows, :, plan.start:plan.start + T] = k
            self.v[layer, plan.rows, :, plan.start:plan.start + T] = v
        else:  # scatter: row b's token t goes to column cols[b, t]
            rows = _row_index(plan.rows, B, k.device)[:, None]  # (B, 1)
            cols = plan.pos if plan.pos is not None else \
                plan.start + torch.arange(T, device=k.device)[None]  # (B, T)
            self.k[layer][rows, :, cols] = k.transpose(1, 2)  # indexed as (B, T, Hkv, hd)
            self.v[layer][rows, :, cols] = v.transpose(1, 2)
        return self._read(self.k[layer], plan), self._read(self.v[layer], plan)

    @staticmethod
    def _read(store: torch.Tensor, plan: _Plan) -> torch.Tensor:
        keys = store[:, :, :plan.kv_len]
        return keys[plan.rows] if isinstance(plan.rows, slice) else keys.index_select(0, plan.rows)

    def plan_static_step(self, active: Sequence[bool]) -> None:
        """Plans a one-token forward of every row that reads all ``max_len`` keys (fixed shapes).

        The offsets and write positions live in persistent device buffers updated in place, so
        the forward can be captured once as a CUDA graph (``torch.compile(mode="reduce-overhead")``)
        and replayed every step; ``active[b]`` False: row b's token is padding (written to scratch).
        Needs the storage allocated (after a first forward).
        """
        if self.k is None:
            raise RuntimeError("a static step needs the cache allocated: prefill first")
        if len(active) != self.batch_size:
            raise ValueError(f"{len(active)} flags for {self.batch_size} rows")
        if self._static is None:
            zeros = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
            self._static = _Plan(rows=slice(0, self.batch_size), offset=zeros, kv_len=self.max_len,
                                 pos=zeros.clone()[:, None])
            for t in (self.k, self.v, self._static.offset, self._static.pos):
                torch._dynamo.mark_static_address(t)
        if any(a and n >= self.max_len for a, n in zip(active, self.lengths)):
            raise ValueError(f"KV cache overflow: a row is full (max_len {self.max_len})")
        pos = [n if a else self.max_len for a, n in zip(active, self.lengths)]
        self._static.offset.copy_(torch.tensor(self.lengths), non_blocking=True)
        self._static.pos.copy_(torch.tensor(pos)[:, None], non_blocking=True)
        self.lengths = [n + int(a) for a, n in zip(active, self.lengths)]
        self._plan = self._static

    def advance(self, n: int) -> None:
        """Ends the forward (the lengths were already extended by :meth:`begin`)."""
        self._plan = None

    # ------------------------------------------------------------------------- row edits
    def truncate(self, row: int, length: int) -> None:
        """Keeps the first ``length`` positions of ``row`` (later writes overwrite the rest)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def reset_rows(self, rows: Sequence[int]) -> None:
        """Empties rows (their slots can take new sequences)."""
        for r in rows:
            self.lengths[int(r)] = 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Reorders / repeats the batch rows: row i becomes old row ``index[i]``.

        Used to compute a shared prefix once and expand it for several continuations (beam
        search, few-shot scoring). The result is a copy, so later writes do not alias rows.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        self.lengths = [self.lengths[i] for i in index.tolist()]
        self._static = None
        if self.k is not None:
            index = index.to(self.k.device)
            self.k = self.k[:, index]  # (L, N, Hkv, max_len + 1, hd)
            self.v = self.v[:, index]


def _row_index(rows: slice | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    return torch.arange(rows.start, rows.start + n, device=device)


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
        if backend == "flash_attn" and not FLASH_ATTN_AVAILABLE and layer_idx == 0:
            # Once per model, not per layer: the run goes on with SDPA rather than failing.
            warnings.warn("attn_backend=flash_attn but flash-attn is not installed: using SDPA. "
                          "fix: pip install flash-attn --no-build-isolation (CUDA only), or set "
                          "model.lm.attn_backend=sdpa", stacklevel=2)
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

"""Connectors: image features (B, N, Dv) -> LLM input embeddings (B, M, D), behind one interface.

* :class:`LinearConnector` — one projection (LLaVA-1.0), M = N.
* :class:`MLPConnector` — Linear, GELU, Linear (LLaVA-1.5), M = N.
* :class:`QFormer` — BLIP-2: M learnable queries; every layer self-attends over the queries,
  every ``cross_attention_every``-th layer also cross-attends to the image features; BERT-style
  (post-LN) so the self-attention/FFN weights can start from a BERT text encoder.
* :class:`VisualAbstractor` — mPLUG-Owl: M learnable queries attending to the dense features
  concatenated with the queries themselves, pre-LN blocks with a SwiGLU FFN.

Every connector is a :class:`Connector`: ``num_output_tokens(N)`` gives M, and :meth:`Connector.save`
/ :func:`load_connector` move it alone between runs (safetensors + its constructor config).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


class Connector(nn.Module):
    """Base class: ``forward(features (B, N, Dv)) -> (B, M, D)``.

    Subclasses record their keyword constructor arguments in ``self.config`` (the Hydra schema,
    also what :func:`load_connector` rebuilds them from) and set ``in_dim`` / ``out_dim``.
    """

    in_dim: int
    out_dim: int

    def num_output_tokens(self, n_in: int) -> int:
        """M for N = ``n_in`` input tokens."""
        return n_in

    def save(self, path: str | Path) -> Path:
        """Writes the weights and constructor config to one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "config": json.dumps(self.config)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata=meta)
        return path

    def load(self, path: str | Path) -> None:
        """Loads weights saved by :meth:`save` into this connector (shapes must match exactly)."""
        state, meta = _read(path)
        own = self.state_dict()
        problems = [f"{k}: saved {tuple(v.shape)} vs this {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if problems or missing or unexpected:
            raise ValueError(
                f"connector checkpoint {path} ({meta.get('class')}, config {meta.get('config')}) does "
                f"not fit this {type(self).__name__} ({json.dumps(self.config)}): shape mismatch "
                f"{problems[:4]}, missing {missing[:4]}, unexpected {unexpected[:4]}")
        self.load_state_dict(state)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no connector checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if "class" not in meta:
        raise ValueError(f"{path} is not a connector checkpoint (no 'class' metadata)")
    return state, meta


def load_connector(path: str | Path) -> Connector:
    """Rebuilds the connector saved at ``path`` (its class and config come from the file)."""
    _, meta = _read(path)
    mod, _, cls = meta["class"].rpartition(".")
    klass = getattr(importlib.import_module(mod), cls)
    connector = klass(**json.loads(meta["config"]))
    connector.load(path)
    return connector


# ----------------------------------------------------------------------------------- simple
class LinearConnector(Connector):
    """One linear projection Dv -> D per token (LLaVA-1.0).

    Args:
        in_dim: Dv, the vision feature width.
        out_dim: D, the LLM width.
    """

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.config = {"in_dim": in_dim, "out_dim": out_dim}
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # (B, N, D)


class MLPConnector(Connector):
    """Linear -> GELU -> Linear per token (LLaVA-1.5's ``mlp2x_gelu``).

    Args:
        in_dim: Dv.
        out_dim: D.
        hidden_dim: width of the hidden layer (None = ``out_dim``, as LLaVA-1.5).
    """

    def __init__(self, *, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or out_dim
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "hidden_dim": hidden_dim}
        self.in_dim, self.out_dim = in_dim, out_dim
        # Names follow transformers' LlavaMultiModalProjector (export is a copy).
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (B, N, D)


# ------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (BERT's layout, so weights map).

    Args:
        dim: query width (and output width).
        kv_dim: key/value input width (None = ``dim``; the image width for cross-attention).
        n_heads: heads (``dim`` must divide by it).
    """

    def __init__(self, *, dim: int, n_heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        kv_dim = kv_dim or dim
        self.n_heads = n_heads
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(kv_dim, dim)
        self.value, self.out = nn.Linear(kv_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, M, C = x.shape
        h = self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, h, L, C/h)
            return t.view(B, t.shape[1], h, C // h).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(context)), heads(self.value(context))
        y = F.scaled_dot_product_attention(q, k, v)  # queries see every key: no mask
        return self.out(y.transpose(1, 2).reshape(B, M, C))


class _QFormerLayer(nn.Module):
    """Post-LN BERT layer: self-attention, optional cross-attention to the image, FFN."""

    def __init__(self, *, dim: int, kv_dim: int, n_heads: int, hidden_dim: int, cross: bool,
                 eps: float) -> None:
        super().__init__()
        self.self_attn, self.self_norm = Attention(dim=dim, n_heads=n_heads), nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim=dim, n_heads=n_heads, kv_dim=kv_dim) if cross else None
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.self_norm(q + self.self_attn(q, q))
        if self.cross_attn is not None:
            q = self.cross_norm(q + self.cross_attn(q, image))
        return self.ffn_norm(q + self.fc2(F.gelu(self.fc1(q))))


class QFormer(Connector):
    """BLIP-2's Querying Transformer: M learnable queries read the image through cross-attention.

    Args:
        in_dim: Dv, the image feature width (keys/values of the cross-attention).
        out_dim: D, the LLM width (a final linear projection, as BLIP-2's ``language_projection``).
        num_queries: M (BLIP-2: 32).
        dim: Q-Former width (BLIP-2: 768, BERT-base).
        n_layers: layers (BLIP-2: 12).
        n_heads: attention heads.
        hidden_dim: FFN width (None = 4 * dim).
        cross_attention_every: layers 0, k, 2k, ... cross-attend to the image (BLIP-2: 2).
        layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
        text_encoder: path of an HF BERT checkpoint whose self-attention and FFN weights
            initialise the layers (BLIP-2 starts from BERT-base); None = random init.
    """

    def __init__(self, *, in_dim: int, out_dim: int, num_queries: int = 32, dim: int = 768,
                 n_layers: int = 12, n_heads: int = 12, hidden_dim: int | None = None,
                 cross_attention_every: int = 2, layer_norm_eps: float = 1e-12,
                 text_encoder: str | None = None) -> None:
        super().__init__()
        if cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be >= 1, got {cross_attention_every}")
        hidden_dim = hidden_dim or 4 * dim
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.image_norm = nn.LayerNorm(in_dim)  # BLIP-2's ln_vision
        self.query_norm = nn.LayerNorm(dim, eps=layer_norm_eps)  # BERT's embedding LayerNorm
        self.layers = nn.ModuleList(
            _QFormerLayer(dim=dim, kv_dim=in_dim, n_heads=n_heads, hidden_dim=hidden_dim,
                          cross=i % cross_attention_every == 0, eps=layer_norm_eps)
            for i in range(n_layers))
        self.proj = nn.Linear(dim, out_dim)
        if text_encoder is not None:
            self.init_from_bert(text_encoder)

    def num_output_tokens(self, n_in: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.image_norm(features)  # (B, N, Dv)
        q = self.query_norm(self.queries.expand(features.shape[0], -1, -1))  # (B, M, dim)
        for layer in self.layers:
            q = layer(q, image)
        return self.proj(q)  # (B, M, D)

    @torch.no_grad()
    def init_from_bert(self, source) -> None:
        """Copies self-attention, FFN and LayerNorm weights of BERT layer i into layer i.

        Args:
            source: an HF BERT checkpoint directory or an in-memory ``BertModel``; its hidden
                size, intermediate size and layer count must cover this Q-Former's.
        """
        if isinstance(source, (str, Path)):
            from transformers import BertModel

            source = BertModel.from_pretrained(str(source))
        cfg = source.config
        dim = self.queries.shape[-1]
        if cfg.hidden_size != dim or cfg.intermediate_size != self.layers[0].fc1.out_features or \
                cfg.num_hidden_layers < len(self.layers):
            raise ValueError(f"BERT (hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
                             f"{cfg.num_hidden_layers} layers) does not fit this Q-Former (dim {dim}, "
                             f"hidden {self.layers[0].fc1.out_features}, {len(self.layers)} layers)")
        self.query_norm.load_state_dict(source.embeddings.LayerNorm.state_dict())
        for ours, theirs in zip(self.layers, source.encoder.layer):
            att = theirs.attention
            for name in ("query", "key", "value"):
                getattr(ours.self_attn, name).load_state_dict(getattr(att.self, name).state_dict())
            ours.self_attn.out.load_state_dict(att.output.dense.state_dict())
            ours.self_norm.load_state_dict(att.output.LayerNorm.state_dict())
            ours.fc1.load_state_dict(theirs.intermediate.dense.state_dict())
            ours.fc2.load_state_dict(theirs.output.dense.state_dict())
            ours.ffn_norm.load_state_dict(theirs.output.LayerNorm.state_dict())


class _AbstractorLayer(nn.Module):
    """Pre-LN: queries attend to [image features; queries], then a SwiGLU FFN."""

    def __init__(self, *, dim: int, n_heads: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, n_heads=n_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.gate, self.up = nn.Linear(dim, hidden_dim), nn.Linear(dim, hidden_dim)
        self.down = nn.Linear(hidden_dim, dim)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        context = self.norm_kv(torch.cat([image, q], dim=1))  # (B, N + M, dim)
        q = q + self.attn(self.norm_q(q), context)
        h = self.ffn_norm(q)
        return q + self.down(F.silu(self.gate(h)) * self.up(h))


class VisualAbstractor(Connector):
    """mPLUG-Owl's visual abstractor: M learnable queries summarise the dense patch features.

    Args:
        in_dim: Dv.
        out_dim: D, the LLM width.
        num_queries: M (mPLUG-Owl: 64).
        dim: abstractor width (the features are projected to it first).
        n_layers: layers (mPLUG-Owl: 6).
        n_heads: attention heads.
        hidden_dim: SwiGLU width (None = 4 * dim).
    """

    def __init__(self, *, in_dim: int, out_dim: int, num_queries: int = 64, dim: int = 1024,
                 n_layers: int = 6, n_heads: int = 16, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.in_dim, self.out_dim, self.num_queries = in_dim, out_dim, num_queries
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.in_proj = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(_AbstractorLayer(dim=dim, n_heads=n_heads, hidden_dim=hidden_dim)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def num_output_tokens(self, n_in: int) -> int:
        return self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.in_proj(features)  # (B, N, dim)
        q = self.queries.expand(features.shape[0], -1, -1)  # (B, M, dim)
        for layer in self.layers:
            q = layer(q, image)
        return self.proj(self.norm(q))  # (B, M, D)

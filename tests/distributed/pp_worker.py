"""Script of the pipeline-parallel test, one process per stage (torchrun-style environment).

Trains a 3-layer untied DecoderLM split into 2 stages for 3 AdamW steps with each schedule, and
the same model unsplit in-process as the reference; writes ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmllm.distributed.pipeline import PipelineRunner
from mmllm.losses import causal_lm_loss
from mmllm.models import DecoderLM

MODEL = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
STEPS, BATCH, SEQ, MICRO = 3, 8, 16, 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL["vocab_size"], (STEPS, BATCH, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def reference(model: DecoderLM) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, first_grads = [], {}
    for i, (ids, labels) in enumerate(batches()):
        loss, _ = causal_lm_loss(model(ids).logits, labels)
        loss.backward()
        if i == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, first_grads


def pipelined(model: DecoderLM, schedule: str, ref_grads: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    runner = PipelineRunner(model, stage_index=rank, num_stages=world, device="cpu",
                            n_microbatches=MICRO, schedule=schedule)
    params = dict(runner.module.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, grad_diff = [], None
    for i, (ids, labels) in enumerate(batches()):
        loss = runner.step(ids, labels)
        if i == 0:
            grad_diff = max(float((p.grad - ref_grads[n]).abs().max()) for n, p in params.items())
        opt.step()
        opt.zero_grad()
        losses.append(None if loss is None else float(loss))
    return {"losses": losses, "grad_diff": grad_diff, "params": sorted(params)}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DecoderLM(**MODEL)
    ref_losses, ref_grads = reference(copy.deepcopy(model))
    result = {"reference": ref_losses, "all_params": sorted(n for n, _ in model.named_parameters())}
    for schedule in ("gpipe", "1f1b"):
        result[schedule] = pipelined(copy.deepcopy(model), schedule, ref_grads)
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

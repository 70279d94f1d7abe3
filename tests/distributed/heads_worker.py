"""Script of the wrapped-model test, one process per rank (torchrun-style environment).

Three models that wrap a DecoderLM: a reward model (decoder + ScalarHead, left padding), a policy
with a value head (logits + per-token values) and a small vision-language model (encoder +
connector + decoder fed with ``inputs_embeds``). Each is parallelised on a 2-rank mesh: FSDP2
(dp=2, full activation checkpointing) and FSDP2+TP (tp=2, sequence parallel, selective
checkpointing), runs forward/backward and one AdamW step, and is compared with an unsharded copy
in the same process. Rank 0 writes ``<out>/result.json``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mmllm.distributed import parallelize
from mmllm.losses import causal_lm_loss
from mmllm.models import DecoderLM, DecoderWithScalarHead
from mmllm.nn import ScalarHead, ValueHead

MODEL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
             max_seq_len=64)
B, T, PATCHES, PATCH_DIM = 4, 8, 4, 12


class TinyVLM(nn.Module):
    """Patch features -> encoder -> connector -> vision tokens in front of the text tokens."""

    def __init__(self, *, decoder: DecoderLM) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(PATCH_DIM, 24), nn.GELU(), nn.Linear(24, 24))
        self.connector = nn.Linear(24, decoder.dim)
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.connector(self.encoder(pixels))  # (B, P, C)
        text = self.decoder.embed_tokens(input_ids)  # (B, T, C)
        out = self.decoder(None, inputs_embeds=torch.cat([vision, text], dim=1))
        return out.logits[:, PATCHES:]  # (B, T, V) text positions


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    decoder = DecoderLM(**MODEL)
    if kind == "reward":
        return DecoderWithScalarHead(decoder=decoder, head=ScalarHead(dim=32, init_std=0.2))
    if kind == "policy_value":
        return DecoderWithScalarHead(decoder=decoder, head=ValueHead(dim=32), return_logits=True)
    return TinyVLM(decoder=decoder)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, MODEL["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in enumerate((0, 3, 1, 5)):  # left padding of different lengths
        mask[row, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask, "target": torch.randn(B, generator=g),
            "labels": torch.randint(0, MODEL["vocab_size"], (B, T), generator=g),
            "pixels": torch.randn(B, PATCHES, PATCH_DIM, generator=g)}


def loss_of(kind: str, model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "reward":  # a Bradley-Terry-free stand-in: regress the score on a target
        return F.mse_loss(model(b["input_ids"], attention_mask=b["attention_mask"]).scores,
                          b["target"])
    if kind == "policy_value":
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        values = (out.scores - b["target"][:, None]) * b["attention_mask"]
        return causal_lm_loss(out.logits, b["labels"])[0] + values.square().mean()
    return causal_lm_loss(model(b["input_ids"], b["pixels"]), b["labels"])[0]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():  # the same order on every rank (collectives)
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name.replace("_checkpoint_wrapped_module.", "")] = g
    return out


def one_case(kind: str, mesh_shape: tuple[int, int], parallelism: dict) -> dict:
    rank = dist.get_rank()
    ref = make(kind)
    model = parallelize(copy.deepcopy(ref), init_device_mesh(
        "cpu", mesh_shape, mesh_dim_names=("data_parallel", "tensor_parallel")), **parallelism)
    full = batch()
    dp = mesh_shape[0]
    local = {k: v.chunk(dp)[rank % dp] for k, v in full.items()} if dp > 1 else full
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    losses = {"ref": [], "got": []}
    for _ in range(2):  # forward/backward, an AdamW step, then forward/backward again
        for m, opt, b, key in ((ref, opts[0], full, "ref"), (model, opts[1], local, "got")):
            opt.zero_grad()
            loss = loss_of(kind, m, b)
            loss.backward()
            mean = loss.detach().clone()
            if key == "got" and dp > 1:
                dist.all_reduce(mean)
                mean /= dp
            losses[key].append(float(mean))
        expected, got = grads(ref), grads(model)
        for opt in opts:
            opt.step()
    diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    return {**losses, "grad_diff": diff, "ref_names": sorted(expected), "names": sorted(got),
            "dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    meshes = {"fsdp": ((2, 1), {"activation_checkpointing": "full"}),
              "tp": ((1, 2), {"sequence_parallel": True, "activation_checkpointing": "selective"})}
    result = {}
    for kind in ("reward", "policy_value", "vlm"):
        for mesh_name, (shape, parallelism) in meshes.items():
            result[f"{kind}/{mesh_name}"] = one_case(kind, shape, parallelism)
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

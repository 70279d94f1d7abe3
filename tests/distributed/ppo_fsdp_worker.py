"""Script of the PPO-under-FSDP2 test, one process per rank (torchrun-style environment).

Policy + value head (shared trunk), the frozen reference and a reward model (DecoderWithScalarHead)
are all sharded with FSDP2 on a 2-rank CPU mesh (ModelParallelStrategy, dp=2). Before training,
greedy rollouts, reward scores and old log-probabilities of the sharded module are compared with
an unsharded copy in the same process; then 3 PPO iterations with PPO-ptx run (every rank decodes
its own prompts, stopping after its own number of tokens) and the policy is saved. Rank 0 writes
``<out>/result.json``.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from mmllm.distributed.strategy import ModelParallelStrategy
from mmllm.models import DecoderLM, DecoderWithScalarHead
from mmllm.modules.ppo import PPOModule
from mmllm.nn.heads import ScalarHead

V = 32
MODEL = {"vocab_size": V, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64,
         "max_seq_len": 64}
PROBE = [[1, 5, 9], [1, 4], [1, 8, 8, 3, 11]]


class RecordingPPO(PPOModule):
    """Records the response lengths of every rollout (this rank's)."""

    def rollout(self, prompts, *, greedy=False):
        roll = super().rollout(prompts, greedy=greedy)
        if not greedy:
            self.lengths.append([len(r) for r in roll.responses])
            self.seen.append(prompts)
        return roll


def make(**kwargs) -> PPOModule:
    torch.manual_seed(0)
    policy = DecoderLM(**MODEL)
    rm = DecoderWithScalarHead(decoder=DecoderLM(**MODEL), head=ScalarHead(dim=32, init_std=0.5))
    ids = (torch.arange(17)[None] + torch.arange(2)[:, None]) % (V - 3) + 3
    m = RecordingPPO(model=policy, reward_model=rm, optimizer=partial(torch.optim.AdamW, lr=3e-3),
                     max_new_tokens=12, ppo_epochs=2, num_minibatches=2, eos_token_id=list(range(2, 10)),
                     ptx_coef=0.5, ptx_data=[{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}],
                     probe_every=1, probe_prompts=PROBE, **kwargs)
    m.lengths, m.seen = [], []
    return m


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [[1] + torch.randint(5, V, (3,), generator=g).tolist() for _ in range(n)]


def parity(sharded: PPOModule, plain: PPOModule) -> dict:
    out = {}
    with torch.no_grad():
        rolls = [m.rollout(PROBE, greedy=True) for m in (sharded, plain)]
        out["same_tokens"] = rolls[0].responses == rolls[1].responses
        out["score_diff"] = float((sharded.score(rolls[0]) - plain.score(rolls[1])).abs().max())
        lp = [m.forward_policy(r.input_ids, r.attention_mask, r.response)[0] * r.mask
              for m, r in zip((sharded, plain), rolls)]
        out["logprob_diff"] = float((lp[0] - lp[1]).abs().max())
    return out


class Check(L.Callback):
    def on_train_start(self, trainer, pl_module):
        # Before any forward: FSDP2 keeps a root unit gathered after its forward.
        pl_module.dtensor = {n: all(isinstance(p, DTensor) for p in getattr(pl_module, n).parameters())
                             for n in ("model", "ref", "reward_model")}
        plain = make()
        plain.configure_model()
        pl_module.parity = parity(pl_module, plain)


def main() -> None:
    out = Path(sys.argv[1])
    module = make(parallelism={"fsdp": True, "param_dtype": None})
    data = DataLoader(prompts(16), batch_size=4, shuffle=False,
                      collate_fn=lambda rows: {"prompt_ids": [list(r) for r in rows]})
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=12, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                       process_group_backend="gloo"),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Check()])
    trainer.fit(module, train_dataloaders=data)
    module.save_policy(out / "policy.ckpt")  # every rank gathers; rank 0 writes
    lengths, seen = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(lengths, module.lengths)
    dist.all_gather_object(seen, module.seen)
    if trainer.is_global_zero:
        from mmllm.checkpoint import load_model

        loaded, _ = load_model(out / "policy.ckpt")
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in module.policy.state_dict().items()}
        saved_diff = max(float((loaded.state_dict()[k] - v).abs().max()) for k, v in full.items())
        (out / "result.json").write_text(json.dumps({
            "parity": module.parity, "dtensor": module.dtensor, "history": module.history,
            "lengths": lengths, "seen": seen, "saved_diff": saved_diff, "rollouts": module.rollouts}))
    else:  # the gather of full tensors above is collective
        for v in module.policy.state_dict().values():
            if isinstance(v, DTensor):
                v.full_tensor()
    dist.barrier()


if __name__ == "__main__":
    main()

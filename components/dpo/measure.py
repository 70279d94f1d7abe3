"""Measures DPO against a reward model on the same synthetic preference task (README table).

    python -m components.dpo.measure [--steps 30] [--out /tmp/dpo_measure]

Both train a 1-layer, dim-32 decoder from the same seed for ``--steps`` AdamW steps (lr 3e-3,
8 prompts a batch) on the synthetic pairs (the more "kind" words the better; 300 prompts, 15 %
held out by prompt) and report held-out pairwise accuracy and mean margin: DPO of its implicit
reward beta * (log pi - log ref) (beta 0.5), the reward model of its scalar score.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import lightning as L
import torch

from components.dpo.module import DPOModule
from mmllm.data.preference import PreferenceDataModule
from mmllm.models import DecoderLM
from mmllm.modules.reward import RewardModelModule

TINY = {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64, "max_seq_len": 128}


def run(kind: str, out: Path, steps: int, seed: int = 0) -> dict:
    src = {"name": "synthetic", "path": str(out / "s.jsonl"), "synthetic": {"num_prompts": 300, "k": 2, "seed": 0}}
    dm = PreferenceDataModule(sources=[src], vocab_size=512, seq_len=96, batch_size=8, labels=kind == "dpo",
                              end_token=None if kind == "dpo" else "eos", cache_dir=str(out / kind),
                              val_fraction=0.15)
    L.seed_everything(seed)
    opt = partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)
    model = partial(DecoderLM, **TINY)
    module = DPOModule(model=model, beta=0.5, optimizer=opt) if kind == "dpo" else \
        RewardModelModule(model=model, optimizer=opt, normalize=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=steps,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    return {"method": kind, "steps": steps, "val_pairs": len(dm._val),
            "val_reward_acc": round(float(m["val/reward_acc"]), 3), "val_margin": round(float(m["val/margin"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/dpo_measure")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(k, out, args.steps) for k in ("dpo", "reward_model")]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

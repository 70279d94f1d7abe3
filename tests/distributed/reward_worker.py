"""Script of the FSDP2 reward-model test: ``python reward_worker.py <out dir>``.

Trains a tiny reward model on the synthetic preference set under Lightning's
ModelParallelStrategy (FSDP2, dp=2, gloo on CPU; Lightning re-runs this script for rank 1),
with the kit's crash-safe checkpoint callback writing distributed checkpoints; after training
the rewards are normalised on every rank and last.ckpt is rewritten. Rank 0 writes
``<out>/result.json``: metrics, whether every parameter is a DTensor, and the sharded model's
scores of the first held-out responses (for comparison with the reloaded checkpoint).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from mmllm.callbacks.checkpoint import RunCheckpoint
from mmllm.data.preference import PreferenceCollate, PreferenceDataModule
from mmllm.distributed.strategy import ModelParallelStrategy
from mmllm.models import DecoderLM
from mmllm.modules.reward import RewardModelModule

TINY = {"vocab_size": 512, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64,
            "max_seq_len": 128, "tie_embeddings": True}


def main(out: Path) -> None:
    src = {"name": "synthetic", "path": str(out / "synthetic.jsonl"),
           "synthetic": {"num_prompts": 240, "k": 2, "seed": 0}}
    dm = PreferenceDataModule(sources=[src], vocab_size=512, seq_len=96, batch_size=4,
                              cache_dir=str(out / "cache"), val_fraction=0.2)
    L.seed_everything(0)
    module = RewardModelModule(model=partial(DecoderLM, **TINY), parallelism={"fsdp": True},
                               optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    ckpt = RunCheckpoint(dirpath=str(out / "run" / "checkpoints"), save_last=True, every_n_train_steps=20)
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=40, logger=False, callbacks=[ckpt],
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=40,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    dtensor = all(isinstance(p, DTensor) for p in module.model.parameters())
    module.eval()
    batch = PreferenceCollate(pad_id=0)(dm._val[:4])
    with torch.no_grad():  # every rank runs the sharded forward; rank 0 reports
        scores = module.scores(batch).tolist()
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (out / "result.json").write_text(json.dumps({
            "metrics": metrics, "dtensor": dtensor, "scores": scores, "offset": module.reward_offset,
            "last": ckpt.last_model_path, "world": trainer.world_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

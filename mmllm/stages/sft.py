"""The ``sft`` pipeline stage: instruction-tune the pretrained checkpoint.

Reads the pretrain stage's ``final.ckpt`` and the tokenize stage's tokenizer, renders the kit's
demo conversations (``mmllm/data/assets/sft_demo.jsonl``) plus, when the optional
``self_instruct`` stage has finished, its ``sft.jsonl`` (rows ``{"messages": [...]}``) with
:class:`mmllm.data.sft.SFTDataModule`, and fine-tunes with :class:`CausalLMModule` (full FT by
default, LoRA with ``lora``; loss per supervised token). It records the validation loss before
and after and the regression check of :mod:`mmllm.eval.regression` (capitals multiple choice and
perplexity before/after), and writes ``<run>/stages/sft/sft.ckpt``: a kit checkpoint (merged on
load when LoRA was used) that later stages (reward model, PPO) start from.
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path

from mmllm.stages.base import Stage, StageContext, stage_dir
from mmllm.stages.trainer import CONFIG_IGNORE as STAGE_TRAINER_IGNORE
from mmllm.stages.trainer import stage_trainer

SELF_INSTRUCT_FILE = "sft.jsonl"


class SFTStage(Stage):
    """Fine-tunes the pretrained model on instruction data.

    Args:
        sources: extra conversation sources (``{name, path}`` as in ``data=sft``); the demo set is
            always included unless ``demo=false``.
        demo: include the kit's demo instruction set.
        lora: LoRA options (:func:`mmllm.modules.lora.apply_lora`); None: full fine-tuning.
        max_steps: optimizer steps.
        lr: peak learning rate (linear warmup over ``warmup_steps``, cosine to 10 %).
        warmup_steps: warmup steps.
        batch_size: packed rows per micro-batch.
        accumulate_grad_batches: micro-batches per optimizer step.
        seq_len: tokens per packed row (None: the pipeline's ``data.seq_len``).
        val_fraction: held-out share of every source (the val loss before/after).
        eval_limit: examples per regression task (None: all 40 capitals questions, 60 sentences).
    """

    inputs = ("pretrain",)
    optional_inputs = ("tokenize", "self_instruct")
    config_keys = ("seed", "data.seq_len", "stage_trainer")
    config_ignore = STAGE_TRAINER_IGNORE

    def __init__(self, *, sources: list[dict] | None = None, demo: bool = True,
                 lora: dict | None = None, max_steps: int = 40, lr: float = 1e-3,
                 warmup_steps: int = 5, batch_size: int = 8, accumulate_grad_batches: int = 1,
                 seq_len: int | None = None, val_fraction: float = 0.1,
                 eval_limit: int | None = 20) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.sources, self.demo, self.lora = [dict(s) for s in sources or []], demo, lora
        self.max_steps, self.lr, self.warmup_steps = max_steps, lr, warmup_steps
        self.batch_size, self.accumulate_grad_batches = batch_size, accumulate_grad_batches
        self.seq_len, self.val_fraction, self.eval_limit = seq_len, val_fraction, eval_limit

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"checkpoint": ctx.dir / "sft.ckpt", "regression": ctx.dir / "regression.json",
                "data": ctx.dir / "data"}

    # ------------------------------------------------------------------------------ inputs
    def data_sources(self, ctx: StageContext) -> list[dict]:
        """The demo set, the configured sources and the self_instruct stage's output if present."""
        from mmllm.config import ASSETS_DIR

        sources = [{"name": "demo", "path": str(ASSETS_DIR / "sft_demo.jsonl")}] if self.demo else []
        sources += self.sources
        if ctx.has("self_instruct"):
            outputs = ctx.markers["self_instruct"].output_paths(ctx.run_dir)
            path = outputs.get("sft") or stage_dir(ctx.run_dir, "self_instruct") / SELF_INSTRUCT_FILE
            if Path(path).is_file():
                sources.append({"name": "self_instruct", "path": str(path)})
            else:
                print(f"[sft] self_instruct finished but wrote no {path}: not used")
        if not sources:
            raise ValueError("the sft stage has no data: set demo=true or give sources")
        return sources

    def tokenizer_dir(self, ctx: StageContext) -> Path:
        """The tokenize stage's tokenizer, else the one the pretrain checkpoint records."""
        if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
            return ctx.output("tokenize", "tokenizer")
        from mmllm.checkpoint import _read_checkpoint, checkpoint_tokenizer_dir

        ckpt = ctx.output("pretrain", "checkpoint")
        found = checkpoint_tokenizer_dir(ckpt, _read_checkpoint(ckpt).get("mmllm", {}))
        if found is None:
            raise FileNotFoundError(f"no tokenizer for {ckpt}: run the tokenize stage")
        return found

    # -------------------------------------------------------------------------------- work
    def run(self, ctx: StageContext) -> None:
        import lightning as L
        import torch

        from mmllm.checkpoint import load_lightning_checkpoint
        from mmllm.data.sft import SFTDataModule
        from mmllm.eval.builtin import capitals_task, capitals_text_task
        from mmllm.eval.regression import compare, format_diff, suite_metrics, write_diff
        from mmllm.modules import CausalLMModule
        from mmllm.modules.schedules import warmup_cosine

        cfg, out = ctx.cfg, self.outputs(ctx)
        if cfg.get("seed") is not None:
            L.seed_everything(int(cfg.seed), workers=True)
        dm = SFTDataModule(sources=self.data_sources(ctx), cache_dir=str(out["data"]),
                           tokenizer=str(self.tokenizer_dir(ctx)),
                           seq_len=int(self.seq_len or cfg.data.seq_len), batch_size=self.batch_size,
                           val_fraction=self.val_fraction, seed=int(cfg.get("seed") or 0))
        t0 = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        model, _, _ = load_lightning_checkpoint(ctx.output("pretrain", "checkpoint"))
        tasks = [capitals_task(), capitals_text_task()]
        before = suite_metrics(model, dm.tokenizer, tasks, limit=self.eval_limit)
        seconds = {"data_and_eval_before": time.perf_counter() - t0}
        module = CausalLMModule(
            model=model.train(), lora=self.lora,
            optimizer=partial(torch.optim.AdamW, lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0),
            scheduler=partial(warmup_cosine, warmup_steps=self.warmup_steps, min_lr_ratio=0.1))
        module.tokenizer_path = "data/tokenizer"  # relative to sft.ckpt: the run dir can move
        trainer = stage_trainer(ctx, max_steps=self.max_steps, max_epochs=-1,
                                accumulate_grad_batches=self.accumulate_grad_batches,
                                val_check_interval=None, check_val_every_n_epoch=None)
        val_before = self._val_loss(trainer, module, dm)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds["train"] = time.perf_counter() - t0
        val_after = self._val_loss(trainer, module, dm)
        trainer.save_checkpoint(out["checkpoint"], weights_only=True)
        t0 = time.perf_counter()
        diff = compare(before, suite_metrics(module.model, dm.tokenizer, tasks, limit=self.eval_limit))
        seconds["eval_after"] = time.perf_counter() - t0
        write_diff(diff, ctx.dir)
        print(f"[sft] val loss {val_before:.3f} -> {val_after:.3f}\n{format_diff(diff)}")
        ctx.record["sft"] = {  # under its own key: the summary merges every stage's record
            "val_loss_before": val_before, "val_loss_after": val_after,
            "regression": {t: {m: {k: round(d[k], 4) for k in ("before", "after", "delta")}
                               for m, d in ms.items()} for t, ms in diff["tasks"].items()},
            "regressed": diff["regressed"], "checkpoint": str(out["checkpoint"]),
            "train": {"steps": trainer.global_step,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "mode": "lora" if self.lora else "full", "sources": dm.summary()["sources"]}}

    @staticmethod
    def _val_loss(trainer, module, dm) -> float:
        if not dm.val_dataloader():
            return math.nan
        return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])

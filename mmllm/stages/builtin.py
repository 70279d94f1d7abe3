"""The stages of ``mmllm pipeline``: curate -> tokenize -> pretrain -> export -> evaluate -> samples.

Each reads what earlier stages wrote to the run directory (through their markers), so any of
them can run alone in a process of its own: ``mmllm pipeline stages=[evaluate] hydra.run.dir=<run>``.
The summary stage is in :mod:`mmllm.stages.summary`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmllm.stages.base import Stage, StageContext

# The top-level config sections that decide what pretraining produces.
# (Not ckpt_path: resuming an interrupted training of the same config gives the same model.)
TRAIN_KEYS = ("seed", "model", "data", "module", "trainer", "strategy", "callbacks", "logger")


class CurateStage(Stage):
    """Curates web data and points ``data.train_texts``/``data.val_texts`` at the result.

    By default it curates a demo crawl built from the Wikipedia sample: the articles rendered as
    web pages (navigation, share buttons, cookie banners) plus planted spam, a blocklisted domain,
    foreign-language pages, duplicates and corrupt records, which curation must strip or drop.

    Args:
        sources: WARC/WET/JSONL/Parquet paths or globs (local or fsspec) to curate; None builds
            and curates the demo crawl.
        overrides: extra Hydra overrides of ``conf/curate.yaml`` (e.g. ``executor=local``).
        val_every: every ``val_every``-th curated document is held out for validation.
        min_documents: fewer curated documents than this is an error (nothing to train on).
    """

    def __init__(self, *, sources: list[str] | None = None, overrides: list[str] = (),
                 val_every: int = 10, min_documents: int = 10) -> None:
        if val_every < 2:
            raise ValueError(f"val_every={val_every}: must be >= 2 (1 would hold out every document)")
        self.sources, self.overrides = sources, list(overrides)
        self.val_every, self.min_documents = val_every, min_documents

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        out = {"curated": ctx.run_dir / "curated", "train_texts": ctx.run_dir / "corpus" / "train.jsonl",
               "val_texts": ctx.run_dir / "corpus" / "val.jsonl"}
        return {"raw": ctx.run_dir / "raw", **out} if self.sources is None else out

    def run(self, ctx: StageContext) -> None:
        from mmllm.curation import build_demo_warc, demo_overrides, run_curation
        from mmllm.data.corpora import write_jsonl

        paths = self.outputs(ctx)
        sources, overrides = self.sources, list(self.overrides)
        if sources is None:
            sources = [str(build_demo_warc(paths["raw"]))]
            overrides = demo_overrides(paths["raw"]) + overrides
        result = run_curation(sources, str(paths["curated"]), output_format="jsonl", overrides=overrides)
        docs = [json.loads(line) for shard in result.shards
                for line in Path(shard).read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(docs) < self.min_documents:
            raise RuntimeError(f"curation kept only {len(docs)} documents (< min_documents="
                               f"{self.min_documents}): see {result.report_paths}")
        k = self.val_every
        write_jsonl((d for i, d in enumerate(docs) if i % k != k - 1), paths["train_texts"])
        write_jsonl((d for i, d in enumerate(docs) if i % k == k - 1), paths["val_texts"])
        ctx.update_config("data.train_texts", str(paths["train_texts"]))
        ctx.update_config("data.val_texts", str(paths["val_texts"]))
        funnel = result.report["funnel"]
        ctx.record["curation"] = {
            "input_records": funnel[0].get("docs_in") if funnel else None,
            "output_documents": result.num_documents,
            "output_characters": result.report["output"]["characters"],
            "report": result.report_paths.get("md"),
        }
        c = ctx.record["curation"]
        print(f"curation: {c['input_records']} records -> {len(docs)} documents (report: {c['report']})")


class TokenizeStage(Stage):
    """Trains (or loads) the tokenizer and writes the packed token shards of ``data`` (prepare_data).

    The data module caches both under ``data.cache_dir``; a cache inside the run directory is
    rebuilt when this stage reruns, one elsewhere is shared and checked by the data module.

    Args:
        ignore: keys of ``data`` that do not change the tokenizer or the shards (changing them
            reruns pretraining but not this stage); every other key of ``data`` counts.
    """

    optional_inputs = ("curate",)
    config_keys = ("data",)

    def __init__(self, *, ignore: list[str] = ()) -> None:
        self.config_ignore = tuple(f"data.{k}" for k in ignore)

    def _datamodule(self, ctx: StageContext):
        return instantiate(ctx.cfg.data)

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        dm = self._datamodule(ctx)
        out = {"tokenizer": getattr(dm, "tokenizer_dir", None), "cache": getattr(dm, "cache_dir", None)}
        return {k: Path(v) for k, v in out.items() if v}

    def run(self, ctx: StageContext) -> None:
        dm = self._datamodule(ctx)
        dm.prepare_data()
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            ctx.record["tokenizer"] = {"vocab_size": len(tok), "path": getattr(dm, "tokenizer_dir", None)}
            print(f"tokenizer: {len(tok)} tokens")


class PretrainStage(Stage):
    """Pretrains the model (``model``/``module``/``trainer``/... of the config) on the tokenized data.

    Measures the validation perplexity before and after training and saves the trained weights
    as ``<run>/checkpoints/final.ckpt`` (what export/evaluate/samples load). A rerun after an
    interrupted attempt with the same config continues from its ``last.ckpt`` (as does an explicit
    ``ckpt_path=...``); a rerun for a changed config first removes the run's old checkpoints.
    """

    inputs = ("tokenize",)
    config_keys = TRAIN_KEYS
    distributed = True  # trainer.devices/num_nodes > 1: every rank joins this stage

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        ckpt_dir = OmegaConf.select(ctx.cfg, "callbacks.model_checkpoint.dirpath", default=None)
        ckpt_dir = Path(ckpt_dir) if ckpt_dir else ctx.run_dir / "checkpoints"
        return {"checkpoint": ckpt_dir / "final.ckpt", "checkpoints": ckpt_dir,
                "config": ctx.run_dir / "config.yaml"}

    def clean(self, ctx: StageContext) -> None:
        if not self._resume_from(ctx):  # else keep the checkpoints it continues from
            super().clean(ctx)

    def _resume_from(self, ctx: StageContext) -> str | None:
        if ctx.cfg.get("ckpt_path"):
            return str(ctx.cfg.ckpt_path)
        last = self.outputs(ctx)["checkpoints"] / "last.ckpt"  # a file, or a DCP directory
        return str(last) if ctx.resuming and last.exists() else None

    def run(self, ctx: StageContext) -> None:
        from mmllm.config import save_resolved
        from mmllm.train import build, resolve_ckpt_arg

        cfg, paths = ctx.cfg, self.outputs(ctx)
        save_resolved(cfg, paths["config"])
        module, datamodule, trainer = build(cfg)
        datamodule.prepare_data()
        before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        print(f"validation perplexity before training: {before['val/ppl']:.1f}")
        ckpt = resolve_ckpt_arg(self._resume_from(ctx), ctx.run_dir, strategy=trainer.strategy)
        if ckpt:
            print(f"resuming training from {ckpt}")
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        finally:  # a distributed checkpoint consolidated for this fit (see mmllm.train)
            if ckpt and Path(ckpt).parent.name.startswith("consolidated-"):
                shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
        seconds = time.perf_counter() - t0
        train_loss = float(trainer.callback_metrics.get("train/loss", math.nan))  # validate resets them
        after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        # Weights and metadata only: the resumable state is last.ckpt, written by ModelCheckpoint.
        trainer.save_checkpoint(paths["checkpoint"], weights_only=True)
        train = {"steps": trainer.global_step, "tokens": module.tokens_seen, "seconds": round(seconds, 1),
                 "tokens_per_s": round(module.tokens_seen / seconds, 1),
                 "params": module.model.num_params(), "final_train_loss": train_loss}
        if ckpt:
            train["resumed_from"] = str(self._resume_from(ctx))
        ctx.record.update({"val_ppl_before": before["val/ppl"], "val_ppl_after": after["val/ppl"],
                           "train": train, "checkpoint": str(paths["checkpoint"])})
        print(f"validation perplexity: {before['val/ppl']:.1f} -> {after['val/ppl']:.1f}")


def trained_model(ctx: StageContext):
    """``(model, tokenizer)`` of the pretrain stage: its final checkpoint, the tokenize stage's tokenizer."""
    from mmllm.checkpoint import load_lightning_checkpoint

    model, tok, _ = load_lightning_checkpoint(ctx.output("pretrain", "checkpoint"))
    if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ctx.output("tokenize", "tokenizer")))
    if tok is None:
        raise FileNotFoundError(f"no tokenizer for {ctx.output('pretrain', 'checkpoint')}")
    return model.eval(), tok


class ExportStage(Stage):
    """Writes the trained model and its tokenizer as an HF Llama directory.

    Args:
        dir: the directory, relative to the run directory.
        dtype: weights dtype ("bfloat16", ...); None keeps the training dtype.
    """

    inputs = ("tokenize", "pretrain")

    def __init__(self, *, dir: str = "hf", dtype: str | None = None) -> None:
        self.dir, self.dtype = dir, dtype

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"hf": ctx.run_dir / self.dir}

    def run(self, ctx: StageContext) -> None:
        from mmllm.config import to_dtype
        from mmllm.models.hf import export_hf_checkpoint

        dtype = to_dtype(self.dtype)
        model, tok = trained_model(ctx)
        ctx.record["hf_export"] = str(export_hf_checkpoint(model, self.outputs(ctx)["hf"],
                                                           tokenizer=tok, dtype=dtype))


class EvaluateStage(Stage):
    """Evaluates the trained model: capitals multiple choice (0/3-shot) and perplexity, offline.

    Args:
        limit: examples per task (None: all).
        batch_size: evaluation batch size.
    """

    inputs = ("tokenize", "pretrain")

    def __init__(self, *, limit: int | None = None, batch_size: int = 16) -> None:
        self.limit, self.batch_size = limit, batch_size

    def run(self, ctx: StageContext) -> None:
        from mmllm.eval import pipeline_evaluation

        model, tok = trained_model(ctx)
        ev = pipeline_evaluation(model, tok, {"eval": {"limit": self.limit, "batch_size": self.batch_size}})
        ctx.record["evaluation"] = ev
        for task, metrics in ev.items():
            print(f"{task}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))


class SamplesStage(Stage):
    """Generates a continuation of each prompt with the trained model (seeded by ``seed``).

    Args:
        prompts: the prompts.
        max_new_tokens, temperature, top_k: sampling settings.
    """

    inputs = ("tokenize", "pretrain")
    config_keys = ("seed",)

    def __init__(self, *, prompts: list[str], max_new_tokens: int = 40, temperature: float = 0.8,
                 top_k: int | None = 50) -> None:
        if not prompts:
            raise ValueError("SamplesStage needs at least one prompt")
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.temperature, self.top_k = temperature, top_k

    def run(self, ctx: StageContext) -> None:
        from mmllm.generation import generate

        model, tok = trained_model(ctx)
        outs = generate(model, tok, self.prompts, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_k=self.top_k, seed=ctx.cfg.get("seed"),
                        progress="samples")
        ctx.record["samples"] = [{"prompt": p, "completion": o} for p, o in zip(self.prompts, outs)]
        for p, o in zip(self.prompts, outs):
            print(f"> {p}{o}")

"""``mmllm pipeline``: every stage of the kit, end to end, at tiny scale (conf/pipeline.yaml).

Each stage reads what the previous one wrote to the run directory, like the full-scale flow in
ARCHITECTURE.md; the run ends with ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from mmllm.config import CONF_DIR, save_resolved

log = logging.getLogger(__name__)


def _stage(name: str, summary: dict):
    class _Timer:
        def __enter__(self):
            print(f"\n=== [{name}] ===", flush=True)
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            summary.setdefault("seconds", {})[name] = round(time.perf_counter() - self.t, 1)

    return _Timer()


def curate_stage(cfg: DictConfig, out: Path, summary: dict) -> None:
    """Curates a WARC built from the Wikipedia sample and points the data config at the result."""
    from mmllm.curation import build_demo_warc, run_curation
    from mmllm.data.corpora import write_jsonl

    warc = build_demo_warc(out / "raw")
    result = run_curation([str(warc)], str(out / "curated"))
    docs = list(result.iter_documents())
    write_jsonl((d for i, d in enumerate(docs) if i % 10 != 9), out / "corpus" / "train.jsonl")
    write_jsonl((d for i, d in enumerate(docs) if i % 10 == 9), out / "corpus" / "val.jsonl")
    with open_dict(cfg):
        cfg.data.train_texts = str(out / "corpus" / "train.jsonl")
        cfg.data.val_texts = str(out / "corpus" / "val.jsonl")
    summary["curation"] = result.funnel_summary()


def train_stage(cfg: DictConfig, out: Path, summary: dict):
    from mmllm.train import build

    module, datamodule, trainer = build(cfg)
    datamodule.prepare_data()
    tok = datamodule.tokenizer
    summary["tokenizer"] = {"vocab_size": len(tok), "path": datamodule.tokenizer_dir}
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    summary["val_ppl_before"] = before["val/ppl"]
    print(f"validation perplexity before training: {before['val/ppl']:.1f}")
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - t0
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    summary["val_ppl_after"] = after["val/ppl"]
    summary["train"] = {
        "steps": trainer.global_step, "tokens": module.tokens_seen, "seconds": round(seconds, 1),
        "tokens_per_s": round(module.tokens_seen / seconds, 1),
        "params": module.model.num_params(),
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", math.nan)),
    }
    ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    summary["checkpoint"] = ckpt
    print(f"validation perplexity: {before['val/ppl']:.1f} -> {after['val/ppl']:.1f}")
    return module.model.eval(), tok, ckpt


def export_stage(model, tok, out: Path, summary: dict) -> None:
    from mmllm.models.hf import export_hf_checkpoint

    summary["hf_export"] = str(export_hf_checkpoint(model, out / "hf", tokenizer=tok))


def evaluate_stage(model, tok, cfg: DictConfig, summary: dict) -> None:
    from mmllm.eval import pipeline_evaluation

    summary["evaluation"] = pipeline_evaluation(model, tok, cfg)


def sample_stage(model, tok, cfg: DictConfig, summary: dict) -> None:
    from mmllm.generation import generate

    prompts = list(cfg.pipeline.sample_prompts)
    outs = generate(model, tok, prompts, max_new_tokens=cfg.pipeline.max_new_tokens,
                    temperature=0.8, top_k=50, seed=cfg.seed)
    summary["samples"] = [{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]
    for p, o in zip(prompts, outs):
        print(f"> {p}{o}")


def write_summary(summary: dict, out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = ["# mmllm pipeline run", "",
             f"- validation perplexity: {summary['val_ppl_before']:.1f} -> {summary['val_ppl_after']:.1f}",
             f"- training: {summary['train']['steps']} steps, {summary['train']['tokens']:,} tokens, "
             f"{summary['train']['tokens_per_s']:,.0f} tokens/s, {summary['train']['params']:,} parameters",
             f"- checkpoint: {summary['checkpoint']}", f"- HF export: {summary.get('hf_export')}"]
    if "curation" in summary:
        lines.append(f"- curation: {summary['curation']}")
    if "evaluation" in summary:
        lines.append(f"- evaluation: {json.dumps(summary['evaluation'])}")
    lines += ["", "## Samples", ""] + [f"- **{s['prompt']}**{s['completion']}" for s in summary["samples"]]
    lines += ["", "## Seconds per stage", ""] + [f"- {k}: {v}" for k, v in summary["seconds"].items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def run_pipeline(cfg: DictConfig) -> dict:
    """Runs every stage; returns the summary (also written to the run directory)."""
    out = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    summary: dict = {"output_dir": str(out)}
    if cfg.pipeline.curate:
        with _stage("curate", summary):
            curate_stage(cfg, out, summary)
    save_resolved(cfg, out / "config.yaml")
    with _stage("tokenize + pretrain", summary):
        model, tok, _ = train_stage(cfg, out, summary)
    with _stage("export", summary):
        export_stage(model, tok, out, summary)
    if cfg.pipeline.evaluate:
        with _stage("evaluate", summary):
            evaluate_stage(model, tok, cfg, summary)
    with _stage("generate", summary):
        sample_stage(model, tok, cfg, summary)
    write_summary(summary, out)
    print(f"\nsummary: {out / 'summary.md'}")
    return summary


@hydra.main(config_path=CONF_DIR, config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.set_struct(cfg, True)
    run_pipeline(cfg)


if __name__ == "__main__":
    main()

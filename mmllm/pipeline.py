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
    """Curates a WARC built from the Wikipedia sample and points the data config at the result.

    The demo crawl renders the articles as web pages (navigation, share buttons, cookie banners)
    and plants spam, a blocklisted domain, foreign-language pages, duplicates and corrupt
    records; curation must strip or drop them before the text reaches the tokenizer.
    """
    from mmllm.curation import build_demo_warc, demo_overrides, run_curation
    from mmllm.data.corpora import write_jsonl

    raw = out / "raw"
    warc = build_demo_warc(raw)
    result = run_curation([str(warc)], str(out / "curated"), output_format="jsonl",
                          overrides=demo_overrides(raw))
    docs = [json.loads(line) for shard in result.shards
            for line in Path(shard).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(docs) < 10:
        raise RuntimeError(f"curation kept only {len(docs)} documents: see {result.report_paths}")
    every = int(cfg.pipeline.val_every)
    write_jsonl((d for i, d in enumerate(docs) if i % every != every - 1), out / "corpus" / "train.jsonl")
    write_jsonl((d for i, d in enumerate(docs) if i % every == every - 1), out / "corpus" / "val.jsonl")
    with open_dict(cfg):
        cfg.data.train_texts = str(out / "corpus" / "train.jsonl")
        cfg.data.val_texts = str(out / "corpus" / "val.jsonl")
    funnel = result.report["funnel"]
    summary["curation"] = {
        "input_records": funnel[0].get("docs_in") if funnel else None,
        "output_documents": result.num_documents,
        "output_characters": result.report["output"]["characters"],
        "report": result.report_paths.get("md"),
    }
    print(f"curation: {summary['curation']['input_records']} records -> {len(docs)} documents "
          f"(report: {summary['curation']['report']})")


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
    for task, metrics in summary["evaluation"].items():
        print(f"{task}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))


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
        c = summary["curation"]
        lines.append(f"- curation: {c['input_records']} WARC records -> {c['output_documents']} "
                     f"documents ({c['output_characters']:,} characters); report: {c['report']}")
    if "evaluation" in summary:
        lines += ["", "## Evaluation", ""]
        lines += [f"- {task}: " + ", ".join(f"{k} {v}" for k, v in m.items())
                  for task, m in summary["evaluation"].items()]
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

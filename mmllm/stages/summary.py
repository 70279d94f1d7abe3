"""The last stage of ``mmllm pipeline``: ``summary.json`` and ``summary.md`` from every stage's record."""

from __future__ import annotations

import json
from pathlib import Path

from mmllm.stages.base import Stage, StageContext


def gather(ctx: StageContext) -> dict:
    """The summary: what each earlier stage recorded (in pipeline order) and its seconds."""
    summary: dict = {"output_dir": str(ctx.run_dir)}
    for name, marker in ctx.markers.items():
        for key, value in marker.record.items():
            # Two stages recording the same key must not overwrite each other.
            summary[key if key not in summary else f"{name}/{key}"] = value
    summary["seconds"] = {name: round(m.seconds, 1) for name, m in ctx.markers.items()}
    return summary


def summary_markdown(summary: dict) -> str:
    """The human-readable summary (sections only for the stages the pipeline had)."""
    lines = ["# mmllm pipeline run", ""]
    if "val_ppl_before" in summary:
        t = summary["train"]
        lines += [
            f"- validation perplexity: {summary['val_ppl_before']:.1f} -> {summary['val_ppl_after']:.1f}",
            (f"- training: {t['steps']} steps, {t['tokens']:,} tokens, {t['tokens_per_s']:,.0f} "
             f"tokens/s, {t['params']:,} parameters"),
            f"- checkpoint: {summary['checkpoint']}"]
    lines.append(f"- HF export: {summary.get('hf_export')}")
    if "curation" in summary:
        c = summary["curation"]
        lines.append(f"- curation: {c['input_records']} WARC records -> {c['output_documents']} "
                     f"documents ({c['output_characters']:,} characters); report: {c['report']}")
    if "evaluation" in summary:
        lines += ["", "## Evaluation", ""]
        lines += [f"- {task}: " + ", ".join(f"{k} {v}" for k, v in m.items())
                  for task, m in summary["evaluation"].items()]
    if "samples" in summary:
        lines += ["", "## Samples", ""]
        lines += [f"- **{s['prompt']}**{s['completion']}" for s in summary["samples"]]
    shown = {"output_dir", "val_ppl_before", "val_ppl_after", "train", "checkpoint", "hf_export",
             "curation", "evaluation", "samples", "seconds", "tokenizer"}
    rest = {k: v for k, v in summary.items() if k not in shown}
    if rest:
        lines += ["", "## Later stages", "", "(all of it, with plots and images: report.html)", ""]
        lines += [f"- **{k}**: {_brief(v)}" for k, v in rest.items()]
    lines += ["", "## Seconds per stage", ""] + [f"- {k}: {v}" for k, v in summary["seconds"].items()]
    return "\n".join(lines) + "\n"


def _brief(value, limit: int = 300) -> str:
    """A one-line view of a recorded value: scalars of a mapping first, then the rest abridged."""
    if isinstance(value, dict):
        scalars = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool)) or v is None}
        text = ", ".join(f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in scalars.items())
        text = text or json.dumps(value, default=str)
    else:
        text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


class SummaryStage(Stage):
    """Writes ``summary.json`` and ``summary.md`` from the records of every earlier stage.

    Args:
        json_name, md_name: file names inside the run directory.
    """

    optional_inputs = ("*",)

    def __init__(self, *, json_name: str = "summary.json", md_name: str = "summary.md") -> None:
        self.json_name, self.md_name = json_name, md_name

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"json": ctx.run_dir / self.json_name, "md": ctx.run_dir / self.md_name}

    def run(self, ctx: StageContext) -> None:
        summary, paths = gather(ctx), self.outputs(ctx)
        paths["json"].write_text(json.dumps(summary, indent=2, default=str))
        paths["md"].write_text(summary_markdown(summary))
        print(f"\nsummary: {paths['md']}")

"""The curation report: a RefinedWeb-style funnel, drop reasons, languages, dedup clusters, examples.

Written as ``report.json`` (everything), ``report.png`` (funnel, languages, cluster sizes; matplotlib
with the Agg backend) and ``report.md`` (a summary a person reads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mmllm.curation.base import merge_stats_lists
from mmllm.curation.writer import atomic_write_bytes


def build_report(stage_records: Sequence[dict[str, Any]], *, inputs: Sequence[str],
                 shards: Sequence[str], seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Assemble the report from the per-stage records (pipeline pass + global steps).

    Args:
        stage_records: Merged statistics, one record per stage in pipeline order.
        inputs: Input files.
        shards: Output shards written.
        seconds: Wall times of the run's phases.

    Returns:
        A JSON-serialisable dict with ``funnel``, ``drop_reasons``, ``input_files`` (inputs read,
        empty, unreadable, cut short), ``issues`` (per stage: records and files that could not
        be parsed, by file and line/offset), ``languages``, ``dedup_clusters``, ``examples``,
        ``output`` and ``seconds``.
    """
    records = merge_stats_lists([stage_records])
    first_docs = records[0]["docs_in"] if records else 0
    first_text = next((r["chars_out"] for r in records if r["stage"] == "extract"), None)
    funnel = []
    for r in records:
        funnel.append({
            "stage": r["stage"], "docs_in": r["docs_in"], "docs_out": r["docs_out"],
            "docs_removed": r["docs_in"] - r["docs_out"], "docs_edited": r.get("docs_edited", 0),
            "chars_in": r["chars_in"],
            "chars_out": r["chars_out"],
            "pct_docs_kept_of_input": round(100 * r["docs_out"] / first_docs, 2) if first_docs else 0,
            "seconds": r.get("seconds")})
    languages = next((r["extra"].get("languages") for r in records if "languages" in r["extra"]), {})
    files = next((r["extra"]["files"] for r in records if "files" in r["extra"]), {})
    last = records[-1] if records else {"docs_out": 0, "chars_out": 0}
    return {
        "inputs": list(inputs),
        "funnel": funnel,
        "drop_reasons": {r["stage"]: r["dropped"] for r in records if r["dropped"]},
        "input_files": {"inputs": len(inputs), **{k: files.get(k, 0) for k in
                                                  ("read", "empty", "unreadable", "cut_short")}},
        "issues": {r["stage"]: {"listed": r["issues"], "omitted": r.get("issues_omitted", 0)}
                   for r in records if r.get("issues") or r.get("issues_omitted")},
        "languages": dict(sorted(languages.items(), key=lambda kv: -kv[1])),
        "dedup_clusters": {r["stage"]: r["extra"]["cluster_sizes"] for r in records
                           if "cluster_sizes" in r["extra"]},
        "examples": {r["stage"]: r["examples"] for r in records if r["examples"]},
        "output": {"documents": last["docs_out"], "characters": last["chars_out"],
                   "shards": list(shards),
                   "pct_text_chars_kept_after_extraction":
                       round(100 * last["chars_out"] / first_text, 2) if first_text else None},
        "seconds": dict(seconds or {}),
    }


def plot_report(report: dict[str, Any]) -> bytes:
    """PNG bytes: funnel (% of input documents left after each stage), languages, clusters."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    stages = [f["stage"] for f in report["funnel"]]
    kept = [f["pct_docs_kept_of_input"] for f in report["funnel"]]
    ax = axes[0]
    ax.barh(stages[::-1], kept[::-1], color="#4c72b0")
    for y, v in enumerate(kept[::-1]):
        ax.text(v + 1, y, f"{v:.1f}%", va="center", fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("% of input documents remaining")
    ax.set_title("Curation funnel")
    langs = list(report["languages"].items())[:12]
    axes[1].bar([k for k, _ in langs], [v for _, v in langs], color="#55a868")
    axes[1].set_title("Detected languages")
    axes[1].tick_params(axis="x", rotation=45)
    ax = axes[2]
    clusters = report["dedup_clusters"]
    sizes = sorted({int(s) for hist in clusters.values() for s in hist})
    width = 0.8 / max(1, len(clusters))
    for k, (name, hist) in enumerate(clusters.items()):
        ax.bar([i + k * width for i in range(len(sizes))],
               [hist.get(str(s), 0) for s in sizes], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [str(s) for s in sizes])
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title("Duplicate clusters")
    if clusters:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def markdown_report(report: dict[str, Any]) -> str:
    """A markdown summary: funnel table, top drop reasons, languages, one example per reason."""
    summary = (f"Inputs: {len(report['inputs'])} file(s); output: "
               f"{report['output']['documents']} documents in "
               f"{len(report['output']['shards'])} shard(s).")
    header = ("| stage | docs in | docs out | removed | edited | % of input kept | chars in | "
              "chars out |")
    lines = ["# Curation report", "", summary, "", "## Funnel", "", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in report["funnel"]:
        lines.append(f"| {f['stage']} | {f['docs_in']} | {f['docs_out']} | {f['docs_removed']} | "
                     f"{f['docs_edited']} | {f['pct_docs_kept_of_input']} | {f['chars_in']} | "
                     f"{f['chars_out']} |")
    lines += ["", "## Drop reasons", "", "| stage | reason | docs | chars |", "|---|---|---:|---:|"]
    for stage, reasons in report["drop_reasons"].items():
        for reason, d in sorted(reasons.items(), key=lambda kv: -kv[1]["docs"]):
            lines.append(f"| {stage} | {reason} | {d['docs']} | {d['chars']} |")
    lines += _issue_lines(report)
    lines += ["", "## Languages", "", ", ".join(f"{k}: {v}" for k, v in report["languages"].items())
              or "(no language ID stage)", "", "## Duplicate clusters", ""]
    for name, sizes in report["dedup_clusters"].items():
        lines.append(f"- {name}: " + ", ".join(f"{n} cluster(s) of {s}" for s, n in sizes.items()))
    lines += ["", "## Examples of removed text", ""]
    for stage, reasons in report["examples"].items():
        for reason, exs in reasons.items():
            ex = exs[0]
            text = " ".join(str(ex.get("text", "")).split())[:200]
            lines.append(f"- **{stage} / {reason}** ({ex.get('url')}): {text}")
    return "\n".join(lines) + "\n"


def _issue_lines(report: dict[str, Any], limit: int = 50) -> list[str]:
    """Markdown for the input files and the records/files that could not be parsed."""
    f = report.get("input_files", {})
    summary = (f"{f.get('inputs', 0)} input(s): {f.get('read', 0)} read, "
               f"{f.get('empty', 0)} empty, {f.get('unreadable', 0)} unreadable, "
               f"{f.get('cut_short', 0)} cut short by a read error.")
    lines = ["", "## Input files", "", summary]
    issues = report.get("issues", {})
    if not issues:
        return lines
    lines += ["", "## Unparseable records and files", "", "| stage | file | where | reason | error |",
              "|---|---|---|---|---|"]
    for stage, d in issues.items():
        for i in d["listed"][:limit]:
            error = " ".join(str(i.get("error", "")).split())[:120].replace("|", "\\|")
            lines.append(f"| {stage} | {i['file']} | {i['where']} | {i['reason']} | {error} |")
        more = len(d["listed"][limit:]) + d["omitted"]
        if more:
            lines.append(f"| {stage} | ... | | {more} more (report.json lists "
                         f"{len(d['listed'])}) | |")
    return lines


def write_report(report: dict[str, Any], out_dir: str, storage_options: dict | None = None,
                 ) -> dict[str, str]:
    """Write ``report.json``, ``report.png`` and ``report.md`` atomically into ``out_dir``.

    Returns:
        ``{"json": path, "png": path, "md": path}``.
    """
    base = out_dir.rstrip("/")
    paths = {"json": f"{base}/report.json", "png": f"{base}/report.png", "md": f"{base}/report.md"}
    atomic_write_bytes(paths["json"], json.dumps(report, indent=2, default=str).encode(),
                       storage_options)
    atomic_write_bytes(paths["png"], plot_report(report), storage_options)
    atomic_write_bytes(paths["md"], markdown_report(report).encode(), storage_options)
    return paths

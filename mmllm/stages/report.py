"""The pipeline's report: ``report.html`` and ``report.md`` in the run directory, plots as PNG.

One section per finished stage, in pipeline order, built from what the stage recorded (its
marker's ``record``) and what it left in the run directory:

* scalars as a key/value table, nested mappings as tables, lists of mappings as tables with one
  column per key (evaluation before/after, reward-model accuracy, PPO curves...);
* chat transcripts (lists of ``{"role", "content"}`` messages, e.g. tool calls) as turns;
* images: any recorded string that is the path of an existing ``.png/.jpg/.jpeg/.gif/.webp``
  file (VLM samples, the curation funnel) is copied into ``report_assets/`` and shown;
* curves: every Lightning ``metrics.csv`` under the stage's directory (and the pretraining logs)
  is plotted, one PNG per metric family (loss, reward, KL, accuracy, perplexity, ...), and so is
  every list of numbers a stage recorded (PPO's reward and KL per rollout, ...).

All text is HTML-escaped (records hold model output). The page needs no network; a small inline
script counts images that failed to load and shows a warning (the browser test reads it).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmllm.stages.base import Stage, StageContext
from mmllm.stages.summary import gather

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
CURVE_FAMILIES = ("loss", "reward", "kl", "acc", "ppl", "entropy", "clip", "score", "lr")
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top;font-size:.92em}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #ddd;margin:4px}figure{display:inline-block;margin:4px}
.turn{border-left:4px solid #999;padding:2px 8px;margin:4px 0;white-space:pre-wrap}
.user{border-color:#2a6}.assistant{border-color:#26a}.tool{border-color:#a62}.system{border-color:#888}
#broken{display:none;background:#fdd;padding:.5em}nav{display:flex;flex-wrap:wrap;gap:.2em 1em}"""
_SCRIPT = """<script>window.addEventListener('load',function(){var imgs=document.images,bad=0;
for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0)bad++;}
document.body.setAttribute('data-images',imgs.length);document.body.setAttribute('data-broken',bad);
if(bad){var b=document.getElementById('broken');b.style.display='block';
b.textContent=bad+' image(s) failed to load';}});</script>"""


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and value and all(isinstance(m, Mapping) and "role" in m
                                                     and "content" in m for m in value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


class _Renderer:
    """Renders record values as HTML and markdown, collecting the images it shows."""

    def __init__(self, run_dir: Path, assets: Path) -> None:
        self.run_dir, self.assets = run_dir, assets
        self.images: list[Path] = []

    def image(self, path: Path, caption: str = "") -> tuple[str, str]:
        self.assets.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() == self.assets.resolve():  # a plot drawn for the report
            name = path.name
        else:
            name = f"{len(self.images):03d}_{re.sub(r'[^A-Za-z0-9._-]', '_', path.name)}"
            shutil.copyfile(path, self.assets / name)
        self.images.append(self.assets / name)
        rel = f"{self.assets.name}/{name}"
        cap = html.escape(caption)
        return (f'<figure><img src="{rel}" alt="{cap}"><figcaption>{cap}</figcaption></figure>',
                f"![{caption}]({rel})")

    def _as_image(self, value: Any) -> Path | None:
        if isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES) and len(value) < 4096:
            p = Path(value) if Path(value).is_absolute() else self.run_dir / value
            return p if p.is_file() else None
        return None

    def value(self, value: Any, depth: int = 0) -> tuple[str, str]:
        """``(html, markdown)`` of one recorded value."""
        if (img := self._as_image(value)) is not None:
            return self.image(img, img.name)
        if _is_messages(value):
            h = "".join(f'<div class="turn {html.escape(str(m["role"]))}"><b>{html.escape(str(m["role"]))}'
                        f"</b>: {html.escape(str(m['content']))}</div>" for m in value)
            md = "\n".join(f"> **{m['role']}**: {m['content']}" for m in value)
            return h, md
        if isinstance(value, Mapping) and depth < 3:
            return self.mapping(value, depth + 1)
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value) and depth < 3:
            return self.rows(value, depth + 1)
        if isinstance(value, list) and len(value) <= 20 and depth < 3:
            parts = [self.value(v, depth + 1) for v in value]
            return "<br>".join(p[0] for p in parts), "; ".join(p[1] for p in parts)
        text = _fmt(value) if not isinstance(value, (Mapping, list)) else json.dumps(value, default=str)
        if len(text) > 2000:
            text = text[:2000] + " ..."
        return html.escape(text), text.replace("\n", " ").replace("|", "\\|")

    def mapping(self, value: Mapping, depth: int) -> tuple[str, str]:
        h, md = ["<table>"], ["| key | value |", "| --- | --- |"]
        for k, v in value.items():
            vh, vm = self.value(v, depth)
            h.append(f"<tr><th>{html.escape(str(k))}</th><td>{vh}</td></tr>")
            md.append(f"| {k} | {vm} |")
        return "".join(h) + "</table>", "\n".join(md) if depth <= 1 else "; ".join(md[2:])

    def rows(self, rows: Sequence[Mapping], depth: int) -> tuple[str, str]:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        h = ["<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>"]
        md = ["| " + " | ".join(map(str, cols)) + " |", "|" + " --- |" * len(cols)]
        for r in rows[:200]:
            cells = [self.value(r.get(c, ""), depth) for c in cols]
            h.append("<tr>" + "".join(f"<td>{c[0]}</td>" for c in cells) + "</tr>")
            md.append("| " + " | ".join(c[1] for c in cells) + " |")
        return "".join(h) + "</table>", "\n".join(md)


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSV log (empty cells skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = row.get("step") or row.get("global_step") or i
            for k, v in row.items():
                if k in ("step", "epoch", "global_step") or v in ("", None):
                    continue
                try:
                    series.setdefault(k, []).append((float(step), float(v)))
                except ValueError:
                    continue
    return series


def plot_curves(series: Mapping[str, list[tuple[float, float]]], out_dir: Path, prefix: str,
                ) -> list[tuple[Path, str]]:
    """One PNG per metric family present; returns ``(path, title)`` pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for family in CURVE_FAMILIES:
        names = [k for k in series if family in re.split(r"[/_.\-]", k.lower())]
        names = [k for k in names if len(series[k]) >= 2]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k in names[:8]:
            xs, ys = zip(*series[k])
            ax.plot(xs, ys, label=k)
        ax.set_xlabel("step")
        ax.set_title(f"{prefix}: {family}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{prefix}_{family}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append((path, f"{prefix}: {family}"))
        for k in names:  # a metric is drawn in the first family that matches
            series = {kk: vv for kk, vv in series.items() if kk != k}
    return out


def record_series(record: Mapping, prefix: str = "", depth: int = 0) -> dict[str, list[tuple[float, float]]]:
    """Curves a stage recorded as lists of numbers (e.g. PPO's reward and KL per rollout)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, list) and len(v) >= 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v):
            out[name] = [(float(i), float(x)) for i, x in enumerate(v)]
        elif isinstance(v, Mapping) and depth < 2:
            out.update(record_series(v, f"{name}/", depth + 1))
    return out


def stage_metric_logs(ctx: StageContext, name: str) -> list[Path]:
    """Lightning CSV logs of one stage: under its stage directory, ``<run>/logs/<stage>`` (where
    :func:`mmllm.stages.trainer.stage_trainer` writes) and ``<run>/csv`` for pretrain."""
    marker = ctx.markers[name]
    roots = [ctx.run_dir / "stages" / name, ctx.run_dir / "logs" / name, *[p for p in marker.output_paths(ctx.run_dir).values()
                                                if p.is_dir() and ctx.run_dir in p.parents]]
    if name == "pretrain":
        roots.append(ctx.run_dir / "csv")
    found = {p.resolve() for r in roots if r.is_dir() for p in r.rglob("metrics.csv")}
    return sorted(found)


class ReportStage(Stage):
    """Writes ``report.html`` and ``report.md`` (+ ``report_assets/``) from every earlier stage.

    Args:
        html_name, md_name: file names inside the run directory.
        assets_dir: directory (inside the run directory) for the plots and copied images.
    """

    optional_inputs = ("*",)

    def __init__(self, *, html_name: str = "report.html", md_name: str = "report.md",
                 assets_dir: str = "report_assets") -> None:
        self.html_name, self.md_name, self.assets_dir = html_name, md_name, assets_dir

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"html": ctx.run_dir / self.html_name, "md": ctx.run_dir / self.md_name,
                "assets": ctx.run_dir / self.assets_dir}

    def run(self, ctx: StageContext) -> None:
        paths = self.outputs(ctx)
        shutil.rmtree(paths["assets"], ignore_errors=True)
        r = _Renderer(ctx.run_dir, paths["assets"])
        summary = gather(ctx)
        nav, body, md = [], [], ["# mmllm pipeline report", "", f"Run directory: `{ctx.run_dir}`", ""]
        seconds = [{"stage": k, "seconds": v} for k, v in summary["seconds"].items()]
        sh, sm = r.rows(seconds, 1)
        body.append(f'<section id="stages"><h2>Stages</h2>{sh}</section>')
        md += ["## Stages", "", sm, ""]
        for name, marker in ctx.markers.items():
            sid = re.sub(r"[^a-z0-9_-]", "-", name.lower())
            nav.append(f'<a href="#{sid}">{html.escape(name)}</a>')
            parts_h, parts_m = [], []
            record = dict(marker.record)
            if "curation" in record and isinstance(record["curation"], Mapping):
                md_report = record["curation"].get("report")
                pngs = sorted(Path(md_report).parent.glob("*.png")) if md_report else []
                for p in pngs:
                    h, m = r.image(p, f"curation: {p.stem}")
                    parts_h.append(h)
                    parts_m.append(m)
            for log in stage_metric_logs(ctx, name):
                for png, title in plot_curves(read_metrics(log), paths["assets"], f"{sid}_{len(parts_h)}"):
                    h, m = r.image(png, title)
                    parts_h.append(h)
                    parts_m.append(m)
            for png, title in plot_curves(record_series(record), paths["assets"], f"{sid}_record"):
                h, m = r.image(png, title)
                parts_h.append(h)
                parts_m.append(m)
            if record:
                h, m = r.mapping(record, 1)
                parts_h.insert(0, h)
                parts_m.insert(0, m)
            else:
                parts_h.append("<p>(nothing recorded)</p>")
            body.append(f'<section id="{sid}" class="stage"><h2>{html.escape(name)} '
                        f"<small>({marker.seconds:.1f} s)</small></h2>{''.join(parts_h)}</section>")
            md += [f"## {name} ({marker.seconds:.1f} s)", "", *parts_m, ""]
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mmllm report</title>"
                f"<style>{_CSS}</style></head><body><h1>mmllm pipeline report</h1>"
                f"<p>Run directory: <code>{html.escape(str(ctx.run_dir))}</code></p>"
                f'<div id="broken"></div><nav>{"".join(nav)}</nav>{"".join(body)}{_SCRIPT}</body></html>')
        paths["html"].write_text(page, encoding="utf-8")
        paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
        ctx.record["report"] = {"html": str(paths["html"]), "images": len(r.images)}
        print(f"report: {paths['html']}")

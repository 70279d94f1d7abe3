"""The pipeline report: every stage's section, curves as PNG, images copied, text escaped, and the
page rendered by headless Chromium with no broken image."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf
from PIL import Image

from mmllm.stages.base import Marker, StageContext
from mmllm.stages.report import ReportStage, read_metrics

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _marker(name: str, record: dict, outputs: dict | None = None) -> Marker:
    return Marker(stage=name, target="x.Y", fingerprint="f", run_id=name, started_at="",
                  finished_at="", seconds=1.5, outputs=outputs or {}, record=record,
                  config_updates={}, config={})


@pytest.fixture
def run(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "step,train/loss,val/ppl,lr-AdamW\n" + "".join(f"{i},{5 - i * 0.1},,0.001\n" for i in range(20))
        + "20,,30.5,\n")
    ppo = tmp_path / "stages" / "ppo" / "logs"
    ppo.mkdir(parents=True)
    (ppo / "metrics.csv").write_text("step,ppo/reward_mean,ppo/kl\n0,0.1,0.0\n1,0.3,0.02\n2,0.5,0.03\n")
    img = tmp_path / "stages" / "vlm_stage2" / "astronaut.png"
    img.parent.mkdir(parents=True)
    Image.new("RGB", (32, 24), (200, 30, 30)).save(img)
    markers = {
        "pretrain": _marker("pretrain", {"val_ppl_before": 2048.0, "val_ppl_after": 30.5,
                                         "train": {"steps": 20, "tokens": 1000}}),
        "evaluate": _marker("evaluate", {"evaluation": {"capitals_0shot": {"acc": 0.25},
                                                         "ppl": {"ppl": 30.5}}}),
        "ppo": _marker("ppo", {"ppo": {"reward": [0.1, 0.3, 0.5], "kl": [0, 0.02, 0.03]}}),
        "vlm_stage2": _marker("vlm_stage2", {"samples": [
            {"image": str(img), "question": "What is shown?", "answer": "<script>alert(1)</script>"}]}),
        "tools": _marker("tools", {"transcript": [
            {"role": "user", "content": "What is 12*7?"},
            {"role": "assistant", "content": 'calculator({"expression": "12*7"})'},
            {"role": "tool", "content": "84"}, {"role": "assistant", "content": "84"}]}),
    }
    ctx = StageContext(name="report", run_dir=tmp_path, cfg=OmegaConf.create({}), markers=markers)
    ReportStage().run(ctx)
    return tmp_path, ctx


def test_report_files(run):
    run_dir, ctx = run
    page = (run_dir / "report.html").read_text()
    for name in ("pretrain", "evaluate", "ppo", "vlm_stage2", "tools"):
        assert f'id="{name}"' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == ctx.record["report"]["images"] >= 4  # curves (loss, ppl, lr, ppo) + the image
    assert all((run_dir / s).is_file() for s in srcs)
    assert any("astronaut" in s for s in srcs)
    assert any("pretrain" in s and "loss" in s for s in srcs)
    assert any("ppo" in s and "reward" in s for s in srcs)
    assert any("ppo_record" in s and "kl" in s for s in srcs)  # the recorded per-rollout lists
    md = (run_dir / "report.md").read_text()
    assert "## ppo" in md and "report_assets/" in md and "**tool**: 84" in md


def test_read_metrics_skips_empty_cells(run):
    series = read_metrics(run[0] / "csv" / "metrics.csv")
    assert len(series["train/loss"]) == 20 and series["val/ppl"] == [(20.0, 30.5)]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (scripts/setup.sh installs it)")
def test_report_renders_in_headless_chromium(run):
    run_dir, _ = run

    def dump() -> str:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--allow-file-access-from-files", "--virtual-time-budget=5000",
                               "--dump-dom", (run_dir / "report.html").as_uri()],
                              capture_output=True, text=True, timeout=120).stdout

    dom = dump()
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-broken="0"' in body, body
    n = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert n >= 4
    for name in ("pretrain", "evaluate", "ppo", "vlm_stage2", "tools"):
        assert re.search(rf'<section id="{name}"[^>]*>\s*<h2>', dom)
    assert "alert(1)" in dom and "<script>alert(1)" not in dom
    # The check can fail: a missing image is counted and announced.
    next((run_dir / "report_assets").glob("*astronaut*")).unlink()
    broken = dump()
    assert 'data-broken="1"' in re.search(r"<body[^>]*>", broken).group(0)
    assert "1 image(s) failed to load" in broken

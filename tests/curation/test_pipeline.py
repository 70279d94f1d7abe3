"""The whole curation run in-process (LocalExecutor): funnel, outputs, report, rerun, resume,
config composition and the ``mmllm curate`` Hydra entry point."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from curation_testdata import MAX_PAYLOAD, SHARED_PASSAGE

from mmllm.curation.pipeline import CONF_DIR, build_components, load_config, run_curation

LIGHTHOUSE = (
    "Lighthouse keepers once lived in small houses at the foot of the tower and climbed the "
    "stairs several times every night. They trimmed the wick, wound the clockwork that turned "
    "the lens and wrote the weather in a logbook. In fog they rang a bell or started a horn so "
    "that ships could hear the coast even when they could not see it. The work was lonely, and "
    "families often shared it, with children learning to read the barometer before they could "
    "ride a bicycle. Most lights are automatic now, and many of the old houses have become "
    "museums where visitors can climb the same stairs and look out over the water.")


def overrides(blocklist_dir: Path) -> list[str]:
    return [f"stages.read.max_payload_bytes={MAX_PAYLOAD}",
            f"stages.url_filter.blocklist_paths=[{blocklist_dir}]"]


def expected_drops(pages) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for p in pages:
        if isinstance(p["expect"], tuple):
            stage, reason = p["expect"]
            out.setdefault(stage, Counter())[reason] += 1
    return {s: dict(c) for s, c in out.items()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, warc_path, blocklist_dir):
    out = tmp_path_factory.mktemp("curated")
    return run_curation(str(warc_path), out, executor="local", overrides=overrides(blocklist_dir))


def test_funnel_matches_planted_defects(local_run, pages):
    report = local_run.report
    got = {stage: {r: d["docs"] for r, d in reasons.items()}
           for stage, reasons in report["drop_reasons"].items()}
    assert got == expected_drops(pages)
    funnel = {f["stage"]: f for f in report["funnel"]}
    assert list(funnel) == ["read", "url_filter", "extract", "langid", "gopher_repetition",
                            "gopher_quality", "refinedweb_lines", "url_dedup", "exact_dedup",
                            "minhash_dedup", "substring_dedup"]
    assert funnel["read"]["docs_in"] == len(pages) == 25
    assert funnel["substring_dedup"]["docs_edited"] == 1
    for a, b in zip(report["funnel"], report["funnel"][1:]):
        assert a["docs_out"] == b["docs_in"]
    assert report["languages"] == {"en": 13, "de": 1, "fr": 1}
    assert report["dedup_clusters"]["minhash_dedup"] == {"2": 1}
    ex = report["examples"]["minhash_dedup"]["near_duplicate"][0]
    assert ex["url"] == "https://mirror.example/bread-copy"
    assert ex["duplicate_of"] == "https://www.homebaking.example/bread"


def test_output_shards_and_report_files(local_run, pages):
    [shard] = local_run.shards
    df = pd.read_json(shard, lines=True)
    kept = [p["url"] for p in pages if p["expect"] in (None, "substring_edit")]
    assert df["url"].tolist() == kept and local_run.num_documents == 7
    assert {"text", "url", "language", "language_score", "source_file"} <= set(df.columns)
    assert not [c for c in df.columns if c.startswith("_")]
    texts = dict(zip(df["url"], df["text"]))
    assert SHARED_PASSAGE in texts["https://roasters.example/coffee"]  # first occurrence
    assert SHARED_PASSAGE[:60] not in texts["https://birders.example/start"]
    assert all("12 likes" not in t and "\n\n\n" not in t for t in df["text"])
    out = Path(local_run.output_dir)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| minhash_dedup | 8 | 7 | 1 | 0 |" in md and "url_score" in md
    assert json.loads((out / "report.json").read_text())["output"]["documents"] == 7
    assert not list(out.rglob(".tmp-*"))  # atomic writes leave no temporaries


def test_rerun_reuses_finished_output(local_run, warc_path, blocklist_dir):
    out = Path(local_run.output_dir)
    stage1 = sorted((out / "_work" / "stage1").glob("*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in stage1]
    again = run_curation(str(warc_path), out, executor="local", overrides=overrides(blocklist_dir))
    assert again.reused and again.shards == local_run.shards
    assert again.report["funnel"] == local_run.report["funnel"]
    assert [p.stat().st_mtime_ns for p in stage1] == mtimes


def test_format_change_reruns_only_global_steps(tmp_path, warc_path, blocklist_dir):
    run1 = run_curation(str(warc_path), tmp_path, executor="local",
                        overrides=overrides(blocklist_dir))
    urls = pd.read_json(run1.shards[0], lines=True)["url"].tolist()
    stage1 = next((tmp_path / "_work" / "stage1").glob("*.parquet"))
    mtime = stage1.stat().st_mtime_ns
    run2 = run_curation(str(warc_path), tmp_path, executor="local", output_format="parquet",
                        overrides=overrides(blocklist_dir))
    assert not run2.reused and stage1.stat().st_mtime_ns == mtime
    assert [Path(s).suffix for s in run2.shards] == [".parquet"]
    assert not list((tmp_path / "data").glob("*.jsonl"))  # the stale JSONL shard is gone
    assert pd.read_parquet(run2.shards[0])["url"].tolist() == urls


def test_resume_processes_only_unfinished_inputs(tmp_path, warc_path, blocklist_dir):
    jsonl = tmp_path / "in" / "extra.jsonl"
    jsonl.parent.mkdir()
    pd.DataFrame({"text": [LIGHTHOUSE], "url": ["https://j.example/v"]}).to_json(
        jsonl, orient="records", lines=True)
    out = tmp_path / "out"
    inputs = [str(warc_path), str(jsonl)]
    run_curation(inputs, out, executor="local", overrides=overrides(blocklist_dir))
    stage1 = out / "_work" / "stage1"
    warc_shard = next(p for p in stage1.glob("crawl*.parquet"))
    mtime = warc_shard.stat().st_mtime_ns
    next(stage1.glob("extra*.stats.json")).unlink()  # as if the run died before this shard
    again = run_curation(inputs, out, executor="local", overrides=overrides(blocklist_dir))
    assert not again.reused and warc_shard.stat().st_mtime_ns == mtime
    assert next(stage1.glob("extra*.stats.json")).exists()
    assert again.num_documents == 8
    urls = [u for s in again.shards for u in pd.read_json(s, lines=True)["url"]]
    assert "https://j.example/v" in urls


def test_every_curation_config_composes_and_instantiates():
    groups = {g: sorted(p.stem for p in (CONF_DIR / "curation" / g).glob("*.yaml"))
              for g in ("extractor", "executor", "c4")}
    assert groups["extractor"] == ["justext", "resiliparse", "trafilatura"]
    for group, names in groups.items():
        for name in names:
            cfg = load_config(["input=x", "output=/tmp/y", f"curation/{group}={name}"])
            parts = build_components(cfg)
            assert parts["stages"][0].name == "read"
            assert ("c4" in [s.name for s in parts["stages"]]) == (cfg.stages.c4 is not None)
            assert len(parts["dedup"]) == 4
    cfg = load_config(["input=x", "output=y", "dedup.substring=null", "stages.c4=null"])
    assert [d.name for d in build_components(cfg)["dedup"]] == ["url_dedup", "exact_dedup",
                                                                "minhash_dedup"]


def test_bad_config_is_a_clear_error(tmp_path, warc_path):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="bands\\*rows"):
        load_and_build(["dedup.minhash.bands=20"])
    with pytest.raises(FileNotFoundError, match="No input files"):
        run_curation(str(tmp_path / "missing*.warc.gz"), tmp_path / "o", executor="local")
    with pytest.raises(ValueError, match="output_format"):
        run_curation(str(warc_path), tmp_path / "o", executor="local", output_format="csv")


def load_and_build(extra):
    return build_components(load_config(["input=x", "output=y", *extra]))


def test_cli_entry_point_runs_hydra_app(tmp_path, warc_path, blocklist_dir, monkeypatch, capsys):
    from mmllm.curation import cli

    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["mmllm-curate", f"input={warc_path}", f"output={out}",
                                      "curation/executor=local", "output_format=parquet",
                                      *overrides(blocklist_dir)])
    cli.main()
    assert "25 input documents -> 7 kept" in capsys.readouterr().out
    assert len(list((out / "data").glob("*.parquet"))) == 1
    [saved] = list((out / "_work" / "hydra").glob("*/.hydra/config.yaml"))
    assert "max_payload_bytes: 200000" in saved.read_text()  # resolved config beside the run
    assert os.getcwd() != str(out)  # hydra.job.chdir is off

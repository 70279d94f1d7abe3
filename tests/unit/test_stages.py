"""The stage runner (mmllm.stages) with dummy stages: markers, skips, reruns, subsets, failures."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmllm.stages import Marker, Stage, StageContext, StageError, build_stages, run_stages
from mmllm.stages.base import config_diff, fingerprint
from mmllm.stages.capture import CapturedOutput

HERE = __name__  # the _target_ prefix of the dummy stages below


def _calls(run: Path) -> list[str]:
    f = run / "calls.txt"
    return f.read_text().split() if f.exists() else []


class Echo(Stage):
    """Writes ``<name>.txt``: its text plus the text of every input (so content flows downstream)."""

    config_keys = ("data",)

    def __init__(self, *, text: str = "x", reads: list[str] = (), fail: bool = False,
                 ignore: list[str] = ()):
        self.text, self.fail = text, fail
        self.inputs, self.config_ignore = tuple(reads), tuple(ignore)

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"file": ctx.run_dir / f"{self.name}.txt"}

    def run(self, ctx: StageContext) -> None:
        with open(ctx.run_dir / "calls.txt", "a") as f:
            f.write(self.name + "\n")
        print(f"{self.name}: working on {self.text}")
        if self.fail:
            raise ValueError(f"{self.name} was told to fail")
        upstream = [ctx.output(d, "file").read_text() for d in self.inputs]
        self.outputs(ctx)["file"].write_text("+".join([*upstream, self.text]))
        ctx.record[self.name] = self.text


class Writes(Stage):
    """Writes ``paths``; records which of them existed when it started."""

    def __init__(self, *, paths: list[str]):
        self.paths = [Path(p) for p in paths]

    def outputs(self, ctx):
        return {str(i): p for i, p in enumerate(self.paths)}

    def run(self, ctx):
        ctx.record["existed"] = [p.exists() for p in self.paths]
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("new")


class SetsConfig(Stage):
    def outputs(self, ctx):
        return {}

    def run(self, ctx):
        ctx.update_config("data.source", "made by " + self.name)


class ReadsConfig(Stage):
    inputs = ("setter",)
    config_keys = ("data",)

    def run(self, ctx):
        ctx.record["seen"] = ctx.cfg.data.source


class Flaky(Stage):
    """Fails while ``<run>/fail`` exists; records whether it was resuming an unfinished attempt."""

    config_keys = ("data",)

    def run(self, ctx):
        ctx.record["resuming"] = ctx.resuming
        if (ctx.run_dir / "fail").exists():
            raise RuntimeError("flag file present")


def _nodes(**stages) -> dict:
    return {name: {"_target_": f"{HERE}.{cls}", **opts} for name, (cls, opts) in stages.items()}


# a <- b <- c, a <- d (each reads the stage(s) after the arrow)
CHAIN = {"a": ("Echo", {"text": "A"}), "b": ("Echo", {"text": "B", "reads": ["a"]}),
         "c": ("Echo", {"text": "C", "reads": ["b"]}), "d": ("Echo", {"text": "D", "reads": ["a"]})}


def _run(run: Path, nodes: dict, *, data=None, **kw):
    cfg = OmegaConf.create({"data": data or {"v": 1}})
    return {s.name: s.status for s in run_stages(build_stages(nodes), cfg, run, **kw)}


def test_full_run_writes_markers_and_a_rerun_skips_everything(tmp_path, capsys):
    nodes = _nodes(**CHAIN)
    assert _run(tmp_path, nodes) == dict.fromkeys("abcd", "ran")
    assert (tmp_path / "c.txt").read_text() == "A+B+C"
    m = Marker.read(tmp_path, "c")
    assert m.outputs == {"file": "c.txt"} and m.record == {"c": "C"} and m.seconds >= 0
    assert m.config["inputs"] == {"b": Marker.read(tmp_path, "b").run_id}
    assert "[pipeline] stage 3/4 c: ran" in capsys.readouterr().out
    assert _run(tmp_path, nodes) == dict.fromkeys("abcd", "skipped")
    assert _calls(tmp_path) == ["a", "b", "c", "d"]  # nothing ran twice
    assert "[pipeline] stage 1/4 a: skipped" in capsys.readouterr().out


def test_changed_option_reruns_the_stage_and_its_downstream_only(tmp_path, capsys):
    _run(tmp_path, _nodes(**CHAIN))
    changed = _nodes(**{**CHAIN, "b": ("Echo", {"text": "B2", "reads": ["a"]})})
    assert _run(tmp_path, changed) == {"a": "skipped", "b": "ran", "c": "ran", "d": "skipped"}
    assert (tmp_path / "c.txt").read_text() == "A+B2+C"
    out = capsys.readouterr().out
    assert "=== [b] === (changed stage.text)" in out and "=== [c] === (input b reran)" in out
    # A config section a stage reads (config_keys) is part of its fingerprint: all rerun ...
    assert set(_run(tmp_path, changed, data={"v": 2}).values()) == {"ran"}
    # ... except the keys it ignores (config_ignore).
    ignoring = _nodes(**{**CHAIN, "a": ("Echo", {"text": "A", "ignore": ["data.batch"]})})
    _run(tmp_path, ignoring, data={"v": 2, "batch": 1})
    assert _run(tmp_path, ignoring, data={"v": 2, "batch": 8}) == {"a": "skipped", "b": "ran", "c": "ran",
                                                                  "d": "ran"}  # b-d read all of data
    assert _run(tmp_path, ignoring, data={"v": 3, "batch": 8})["a"] == "ran"


def test_failed_stage_is_named_keeps_earlier_work_and_the_rerun_resumes_from_it(tmp_path, capsys):
    broken = _nodes(**{**CHAIN, "b": ("Echo", {"text": "B", "reads": ["a"], "fail": True})})
    with pytest.raises(StageError) as err:
        _run(tmp_path, broken)
    msg = str(err.value)
    assert err.value.stage == "b" and msg.startswith("stage 'b' failed: ValueError: b was told to fail")
    assert "b: working on B" in msg and err.value.tail == ["b: working on B"]  # the last lines printed
    assert "b: working on B" in (tmp_path / "stages" / "b" / "log.txt").read_text()
    assert "[pipeline] stage 2/4 b: failed" in capsys.readouterr().out
    assert Marker.read(tmp_path, "a") is not None and (tmp_path / "a.txt").is_file()
    assert Marker.read(tmp_path, "b") is None and Marker.read(tmp_path, "c") is None
    assert _calls(tmp_path) == ["a", "b"]  # c and d never started
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.stage, str(again), again.tail) == ("b", msg, err.value.tail)
    assert _run(tmp_path, _nodes(**CHAIN)) == {"a": "skipped", "b": "ran", "c": "ran", "d": "ran"}


def test_a_stage_alone_reads_earlier_outputs_or_names_the_missing_stage(tmp_path):
    nodes = _nodes(**CHAIN)
    with pytest.raises(StageError, match=r"stage 'b' needs the outputs of stage 'a', which has not finished"):
        _run(tmp_path, nodes, select=["b"])
    assert _calls(tmp_path) == []
    rest = dict.fromkeys("cd", "outdated")
    assert _run(tmp_path, nodes, select=["a"]) == {"a": "ran", "b": "outdated", **rest}
    assert _run(tmp_path, nodes, select=["b"]) == {"a": "skipped", "b": "ran", **rest}
    assert (tmp_path / "b.txt").read_text() == "A+B"
    # An input whose config changed since it ran is out of date: refused, not silently used.
    changed = _nodes(**{**CHAIN, "a": ("Echo", {"text": "A2"})})
    with pytest.raises(StageError, match=r"needs the outputs of stage 'a' \(through b\), which is out of "
                                         r"date \(changed stage.text\): .* stages=\[a,b,c\]"):
        _run(tmp_path, changed, select=["c"])
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['nope'\]"):
        _run(tmp_path, nodes, select=["nope"])


def test_force_missing_outputs_and_corrupt_markers_rerun(tmp_path):
    nodes = _nodes(**CHAIN)
    _run(tmp_path, nodes)
    assert _run(tmp_path, nodes, force=["d"]) == {"a": "skipped", "b": "skipped", "c": "skipped", "d": "ran"}
    (tmp_path / "c.txt").unlink()  # an output deleted by hand
    assert _run(tmp_path, nodes)["c"] == "ran"
    (tmp_path / "stages" / "a" / "DONE.json").write_text('{"stage": "a", "trunc')  # a torn write
    assert _run(tmp_path, nodes) == dict.fromkeys("abcd", "ran")


def test_config_updates_reach_later_stages_also_when_the_setter_is_skipped(tmp_path):
    nodes = _nodes(setter=("SetsConfig", {}), reader=("ReadsConfig", {}))
    _run(tmp_path, nodes)
    assert Marker.read(tmp_path, "reader").record == {"seen": "made by setter"}
    assert Marker.read(tmp_path, "setter").config_updates == {"data.source": "made by setter"}
    assert _run(tmp_path, nodes, force=["reader"]) == {"setter": "skipped", "reader": "ran"}
    assert Marker.read(tmp_path, "reader").record == {"seen": "made by setter"}


def test_a_stage_knows_when_it_resumes_its_own_unfinished_attempt(tmp_path):
    nodes = _nodes(flaky=("Flaky", {}))
    assert _run(tmp_path, nodes) == {"flaky": "ran"}
    assert Marker.read(tmp_path, "flaky").record == {"resuming": False}
    assert not (tmp_path / "stages" / "flaky" / "ATTEMPT.json").exists()
    (tmp_path / "fail").touch()
    with pytest.raises(StageError, match="flag file present"):
        _run(tmp_path, nodes, force=["flaky"])
    assert (tmp_path / "stages" / "flaky" / "ATTEMPT.json").is_file()
    (tmp_path / "fail").unlink()
    assert _run(tmp_path, nodes) == {"flaky": "ran"}
    assert Marker.read(tmp_path, "flaky").record == {"resuming": True}
    # force=[...] starts over; an attempt with another config is not continued either.
    (tmp_path / "fail").touch()
    with pytest.raises(StageError):
        _run(tmp_path, nodes, data={"v": 2})
    (tmp_path / "fail").unlink()
    _run(tmp_path, nodes, force=["flaky"], data={"v": 2})
    assert Marker.read(tmp_path, "flaky").record == {"resuming": False}


def test_rerun_removes_stale_outputs_inside_the_run_dir_only(tmp_path):
    outside = tmp_path / "shared.txt"
    outside.write_text("cache")
    run = tmp_path / "run"
    nodes = _nodes(w=("Writes", {"paths": [str(run / "inside.txt"), str(outside)]}))
    _run(run, nodes)
    (run / "stale").write_text("left by the first run")
    (run / "inside.txt").write_text("stale")
    _run(run, nodes, force=["w"])
    assert Marker.read(run, "w").record == {"existed": [False, True]}  # inside removed, outside kept


def test_marker_is_written_whole_and_atomically(tmp_path):
    m = Marker(stage="s", target="t", fingerprint="f", run_id="r", started_at="0", finished_at="1",
               seconds=1.0, outputs={}, record={"x": [1, 2]}, config_updates={}, config={})
    path = m.write(tmp_path)
    assert path == tmp_path / "stages" / "s" / "DONE.json"
    assert json.loads(path.read_text())["record"] == {"x": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["DONE.json"]  # no temporary file left
    assert Marker.read(tmp_path, "s") == m and Marker.read(tmp_path, "other") is None


def test_build_stages_checks_the_order_and_the_targets():
    with pytest.raises(ValueError, match="reads stage 'b', which is listed after it"):
        build_stages(_nodes(a=("Echo", {"reads": ["b"]}), b=("Echo", {})))
    with pytest.raises(ValueError, match="reads stage 'z', which is not in pipeline.stages"):
        build_stages(_nodes(a=("Echo", {"reads": ["z"]})))
    with pytest.raises(TypeError, match="is not a mmllm.stages.Stage"):
        build_stages({"a": {"_target_": "builtins.dict"}})
    nodes = {**_nodes(a=("Echo", {}), b=("Echo", {})), "a": None}  # a null node removes a stage
    assert [p.name for p in build_stages(nodes)] == ["b"]


def test_fingerprint_and_diff():
    assert fingerprint({"a": 1, "b": {"c": 2}}) == fingerprint({"b": {"c": 2}, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    old, new = {"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}, "e": 0}
    assert config_diff(old, new) == ["b.c", "b.d", "e"]


def test_captured_output_keeps_the_last_lines_and_collapses_progress_bars(tmp_path):
    import logging
    import sys

    log = logging.getLogger("mmllm.test_capture")
    console = logging.StreamHandler(sys.stdout)  # like Hydra's console handler
    log.addHandler(console)
    # Not to the root logger: a handler an earlier test left there may hold a closed stream.
    log.propagate = False
    try:
        with CapturedOutput(tmp_path / "log.txt", n=4) as out:
            print("one")
            sys.stderr.write("bar 10%\rbar 50%\rbar 100%\n")
            print("two\nthree")
            log.warning("logged")
        assert console.stream is sys.stdout  # the handler writes to the console again
    finally:
        log.removeHandler(console)
        log.propagate = True
    assert out.tail == ["bar 100%", "two", "three", "logged"]  # each line once
    assert (tmp_path / "log.txt").read_text().startswith("one\nbar 10%")


def test_the_configured_pipeline_builds_in_dependency_order(tmp_path):
    from mmllm.config import compose_config

    cfg = compose_config("pipeline", [], output_dir=tmp_path / "run")
    stages = build_stages(cfg.pipeline.stages)
    names = [p.name for p in stages]
    assert names == ["curate", "tokenize", "pretrain", "export", "evaluate", "samples",
                     "self_instruct", "sft", "reward_model", "ppo", "rlhf_round",
                     "vision_pretrain", "vlm_stage1", "vlm_stage2", "tools", "chat", "summary", "report"]
    deps = {p.name: p.deps for p in stages}
    assert deps["tokenize"] == ["curate"] and deps["pretrain"] == ["tokenize"]
    assert deps["vision_pretrain"] == []  # the ViT trains on images alone
    assert {"pretrain", "self_instruct"} <= set(deps["sft"])
    assert {"sft", "reward_model"} <= set(deps["ppo"])
    assert {"vision_pretrain", "sft"} <= set(deps["vlm_stage1"]) and "vlm_stage1" in deps["vlm_stage2"]
    assert "sft" in deps["tools"]
    assert {"vlm_stage2", "tools"} <= set(deps["chat"])  # the final turn: the VLM with the tools LM
    # every stage reads only stages before it; the summary reads every stage, the report also the summary
    for i, name in enumerate(names):
        assert set(deps[name]) <= set(names[:i]), name
    assert deps["summary"] == names[:names.index("summary")]
    assert deps["report"] == names[:names.index("report")]
    no_curation = compose_config("pipeline", ["pipeline.stages.curate=null"], output_dir=tmp_path / "run")
    assert {p.name: p.deps for p in build_stages(no_curation.pipeline.stages)}["tokenize"] == []

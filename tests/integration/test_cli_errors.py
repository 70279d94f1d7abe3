"""Errors that say what to do: every CLI command ends a failure with a short message and a fix."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmllm.config import CONF_DIR, check_config, compose_config
from mmllm.errors import ConfigError, MissingDependencyError, UserError, report, translate


def _mmllm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MMLLM_DEBUG")}
    return subprocess.run([sys.executable, "-m", "mmllm", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=600, env={**full, **(env or {})})


def _tail(res: subprocess.CompletedProcess) -> str:
    """The error message: from the "mmllm <command>: error:" line to the end (a few lines)."""
    lines = res.stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("mmllm ") and ": error: " in line]
    assert starts, res.stderr[-3000:]
    message = lines[starts[-1]:]
    assert len(message) <= 6, message
    return "\n".join(message)


# ---------------------------------------------------------------------- one process per command
CASES = {
    "train-unknown-key": (["train", "debug=tiny", "trainer.max_stepz=3"],
                          ["Key 'max_stepz' is not in struct", "mmllm train --help"]),
    "train-type": (["train", "debug=tiny", "trainer.max_steps=abc"],
                   ["trainer.max_steps='abc'", "expects int", "fix: give trainer.max_steps a value of type int"]),
    "train-groups": (["train", "debug=tiny", "data=pretrain"],
                     ["config groups conflict: debug=tiny sets data.vocab_size", "data=pretrain",
                      "~data.vocab_size"]),
    "pipeline-groups": (["pipeline", "data=pretrain"],
                        ["config groups conflict: pipeline.yaml sets data.train_texts", "data=pretrain"]),
    "pipeline-stage-input": (["pipeline", "stages=[pretrain]"],
                             ["stage 'pretrain' needs the outputs of stage 'curate' (through tokenize)",
                              "mmllm pipeline stages=[curate,tokenize,pretrain]"]),
    "generate-type": (["generate", "checkpoint=smollm2", "max_new_tokens=abc"],
                      ["max_new_tokens='abc'", "expected int", "max_new_tokens=64"]),
    "eval-type": (["eval", "checkpoint=smollm2", "batch_size=many"],
                  ["batch_size='many'", "expected int"]),
    "curate-type": (["curate", "input=x.warc.gz", "output=out", "max_examples=lots"],
                    ["max_examples='lots'", "expected int"]),
    "export-missing": (["export", "checkpoint=no/such/run", "output_dir=hf"],
                       ["cannot load a model from 'no/such/run': no such file or directory",
                        "fix: pass a .ckpt file"]),
    # The commands added with SFT, RLHF, vision-language and tool use.
    "serve-type": (["serve", "checkpoint=smollm2", "port=abc"], ["port='abc'", "expected int", "port=8000"]),
    "chat-missing": (["chat", "checkpoint=no/such/run"],
                     ["cannot load a model from 'no/such/run'", "fix: pass a .ckpt file"]),
    "rlhf-round-prompts": (["rlhf-round", "run_dir=r", "policy=smollm2", "prompts=no_prompts.jsonl", "labeller=ai"],
                           ["prompts=no_prompts.jsonl: no such file", "fix: pass prompts="]),
    "plan-gpu": (["plan", "cluster.gpu=tpu9000"], ["unknown gpu 'tpu9000'", "fix: cluster.gpu=h100"]),
    "synth-mode": (["synth", "mode=bogus"], ["mode='bogus': not a synth mode", "fix: mmllm synth mode=self_instruct"]),
}
# The other bad options / paths of every command are checked in-process below
# (test_bad_options_and_paths_end_with_a_fix): one subprocess per case would cost ~10 s each.


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_error_is_the_last_thing_printed(tmp_path, case):
    args, expected = CASES[case]
    res = _mmllm(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode != 0
    tail = _tail(res)
    assert tail.startswith(f"mmllm {args[0]}: error: "), res.stderr[-2000:]
    for text in expected:
        assert text in tail, tail
    assert "Traceback" not in res.stderr  # it went to the log file named in the last line
    log = Path(tail.splitlines()[-1].split("full traceback: ")[1].split(" (")[0])
    assert "Traceback" in log.read_text()


@pytest.mark.slow
def test_cli_not_a_checkpoint_and_debug_flag(tmp_path):
    bogus = tmp_path / "weights.ckpt"
    bogus.write_text("these are not weights\n")
    res = _mmllm("generate", f"checkpoint={bogus}", cwd=tmp_path)
    assert res.returncode != 0
    assert f"{bogus} is not a checkpoint" in _tail(res), res.stderr[-2000:]
    res = _mmllm("generate", f"checkpoint={bogus}", cwd=tmp_path, env={"MMLLM_DEBUG": "1"})
    assert res.returncode != 0 and "Traceback (most recent call last)" in res.stderr
    assert "CheckpointError" in res.stderr


@pytest.mark.slow
def test_cli_out_of_memory_and_traceback_in_the_run_log(tmp_path, shared_data_dir):
    run = tmp_path / "run"
    # A 2**40-wide embedding: the CPU allocator refuses it at once (no memory is touched).
    res = _mmllm("train", "debug=tiny", "model.lm.dim=1099511627776",
                 f"hydra.run.dir={run}", f"paths.data_dir={shared_data_dir}", cwd=tmp_path)
    assert res.returncode != 0
    tail = _tail(res)
    assert "mmllm train: error: out of memory" in tail, res.stderr[-3000:]
    assert "fix: lower data.batch_size" in tail
    assert f"full traceback: {run / 'train.log'}" in tail
    assert "Traceback" in (run / "train.log").read_text()


# -------------------------------------------------------------------------- the layer in-process
def _fix_of(exc: BaseException, command: str) -> list[str]:
    stream = io.StringIO()
    report(exc, command=command, stream=stream)
    return stream.getvalue().strip().splitlines()[:2]


def test_bad_options_and_paths_end_with_a_fix(tmp_path):
    """Bad options / paths of synth, curate (and pipeline's curate stage), rlhf-round and the
    train/inspect-batch data: each names the key or file and ends with a fix line."""
    from mmllm.curation.pipeline import resolve_inputs, run_curation
    from mmllm.data.text_corpus import TextCorpusDataModule
    from mmllm.rlhf.round import round_inputs
    from mmllm.synth.cli import run as synth
    from mmllm.synth.common import load_seed_tasks
    from mmllm.synth.evol_instruct import load_instructions

    cases = []
    for overrides in (["mode=bogus"], [f"self_instruct.seed_tasks={tmp_path}/no_seeds.jsonl"]):
        with pytest.raises(Exception) as info:  # before any teacher is built or called
            synth(compose_config("synth", overrides, output_dir=tmp_path / "synth"))
        cases.append(("synth", info.value))
    for call in (lambda: load_seed_tasks("no_seeds.jsonl"), lambda: load_instructions("no_rows.jsonl"),
                 lambda: resolve_inputs(str(tmp_path / "crawl-*.warc.gz")),
                 lambda: run_curation("x.warc.gz", tmp_path / "out", output_format="csv"),
                 lambda: TextCorpusDataModule(train_texts="no_train.jsonl", cache_dir=str(tmp_path), seq_len=8,
                                              batch_size=1),
                 lambda: TextCorpusDataModule(train_texts=str(tmp_path / "no_train.jsonl"), val_texts="v.jsonl",
                                              cache_dir=str(tmp_path), seq_len=8, batch_size=1).prepare_data(),
                 lambda: round_inputs(compose_config("rlhf_round", ["run_dir=r", "policy=p", "prompts=[a]",
                                                                    "labeller=robot"]), tmp_path, 0)):
        with pytest.raises(UserError) as info:
            call()
        cases.append(("cmd", info.value))
    expected = [("mode='bogus': not a synth mode", "mmllm synth mode=self_instruct"),
                ("no_seeds.jsonl: no such file", "pass a JSONL of {instruction, instances"),
                ("seed_tasks=no_seeds.jsonl: no such file (relative to", "null for the shipped seed tasks"),
                ("instructions=no_rows.jsonl: no such file", "instruction / prompt / messages rows"),
                ("No input files match", "pass existing WARC/WET/JSONL/Parquet files"),
                ("output_format must be 'jsonl' or 'parquet', got 'csv'", "output_format=jsonl"),
                ("val_texts is required", "data.val_texts=<held-out"),
                ("data.train_texts=", "pass JSONL/Parquet files with a text field"),
                ("labeller='robot': not a labeller", "labeller=human")]
    for (command, exc), (message, fix) in zip(cases, expected, strict=True):
        assert isinstance(translate(exc), UserError), exc  # Hydra wraps the constructor's error
        first, second = _fix_of(exc, command)
        assert message in first, first
        assert second.startswith("  fix: ") and fix in second, second
    # The curation errors keep their builtin types (callers catch FileNotFoundError / ValueError).
    assert isinstance(cases[4][1], FileNotFoundError) and isinstance(cases[5][1], ValueError)


def test_translate_known_exceptions():
    assert translate(RuntimeError("something else")) is None
    err = translate(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert err.message.startswith("out of memory: CUDA out of memory") and "batch_size" in err.fix
    flash = ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
    try:
        try:
            raise flash
        except ImportError as exc:
            raise RuntimeError("could not build the attention kernel") from exc
    except RuntimeError as wrapped:
        err = translate(wrapped)  # found through the cause chain
    assert isinstance(err, MissingDependencyError) and "pip install flash-attn" in err.fix
    assert "attn_backend=sdpa" in err.fix
    err = translate(ModuleNotFoundError("No module named 'cudf'", name="cudf"))
    assert "RAPIDS" in err.fix and "backend=cpu" in err.fix
    err = translate(FileNotFoundError(2, "No such file or directory", "bwrap"))
    assert err.message == "the program 'bwrap' is not installed" and "apt-get install bubblewrap" in err.fix
    assert translate(FileNotFoundError(2, "No such file or directory", "data.txt")) is None


def test_report_prints_a_few_lines_last_and_logs_the_traceback():
    stream = io.StringIO()
    try:
        raise UserError("the thing is wrong", fix="do the other thing")
    except UserError as exc:
        assert report(exc, command="train", stream=stream) == 1
    lines = stream.getvalue().strip().splitlines()
    assert lines[:2] == ["mmllm train: error: the thing is wrong", "  fix: do the other thing"]
    log = Path(lines[2].split("full traceback: ")[1].split(" (")[0])
    assert "Traceback" in log.read_text() and "the thing is wrong" in log.read_text()


def test_check_config_names_key_type_and_conflicting_groups():
    cfg = compose_config("train", ["debug=tiny", "trainer.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"trainer.max_steps='abc' \(str\): .*Trainer expects int"):
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices))
    over = ["debug=tiny", "data=pretrain"]
    cfg = compose_config("train", over)
    with pytest.raises(ConfigError, match="debug=tiny sets data.vocab_size, but data=pretrain"):
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices), overrides=over)
    over = ["data=pretrain", "data.vocab_sise=3"]
    cfg = compose_config("train", ["data=pretrain", "+data.vocab_sise=3"])
    with pytest.raises(ConfigError, match="takes no argument 'vocab_sise'"):
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices), overrides=over)


def _group_options() -> list[tuple[str, str]]:
    conf = Path(CONF_DIR)
    out = []
    for f in sorted(conf.rglob("*.yaml")):
        rel = f.relative_to(conf)
        if len(rel.parts) > 1 and rel.parts[0] not in ("hydra", "curation", "eval", "teacher", "tools"):
            out.append((str(rel.parent), f.stem))
    return out


@pytest.mark.slow
def test_every_shipped_config_passes_the_check():
    # No false alarms: each primary config, and train with each group option swapped in.
    for name in ("train", "pipeline", "generate", "export", "eval", "curate", "serve"):
        cfg = compose_config(name, [])
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices), primary=name)
    for group, option in _group_options():
        over = [f"{group}={option}"]
        cfg = compose_config("train", over)
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices), overrides=over, primary="train")

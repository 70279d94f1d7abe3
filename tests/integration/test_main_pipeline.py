"""`mmllm pipeline` (the README's first command): its stages end to end, reruns, subsets, failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmllm.config import compose_config
from mmllm.stages import Marker, StageError

STAGES = ["tokenize", "pretrain", "export", "evaluate", "samples", "summary", "report"]
# The later stages (their own tests run each at tiny scale); the end-to-end test runs them all.
LATER = ["self_instruct", "sft", "reward_model", "ppo", "rlhf_round", "vision_pretrain", "vlm_stage1",
         "vlm_stage2", "tools", "chat"]


def _tiny(data_dir: Path) -> list[str]:
    """A pipeline of seconds: no curation, a tiny model, a few steps, the shared tokenized corpus."""
    return ["pipeline.stages.curate=null", "trainer.max_steps=10", "trainer.val_check_interval=5",
            "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=5", "data.vocab_size=512",
            "data.seq_len=64", "data.batch_size=8", f"data.cache_dir={data_dir}/wiki_bpe512",
            "model.lm.dim=32", "model.lm.n_layers=2", "pipeline.stages.evaluate.limit=8",
            "pipeline.stages.samples.max_new_tokens=8", *[f"pipeline.stages.{s}=null" for s in LATER]]


def _mmllm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmllm", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, check=False)


def _run(run: Path, overrides: list[str]) -> dict[str, str]:
    from mmllm.pipeline import run_pipeline

    return {s.name: s.status for s in run_pipeline(compose_config("pipeline", overrides, output_dir=run))}


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    res = _mmllm("pipeline", f"hydra.run.dir={run}", "trainer.max_steps=60", "trainer.val_check_interval=30",
                 "data.vocab_size=512", "model.lm.dim=64", "model.lm.n_layers=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_ppl_after"] < 0.5 * summary["val_ppl_before"]
    assert summary["train"]["steps"] == 60
    assert len(summary["samples"]) == 3 and all(s["completion"] for s in summary["samples"])
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    assert (run / "summary.md").read_text().startswith("# mmllm pipeline run")
    assert "validation perplexity" in res.stdout
    # The text came through curation: boilerplate pages in, clean documents out, with a report.
    cur = summary["curation"]
    assert cur["input_records"] > cur["output_documents"] >= 80
    assert (run / "curated" / "report.md").is_file()
    train_text = (run / "corpus" / "train.jsonl").read_text()
    assert "Sign in" not in train_text and "uses cookies to improve" not in train_text
    # And the trained model was evaluated.
    ev = summary["evaluation"]
    assert {"capitals", "capitals_3shot"} <= set(ev) and 0.0 <= ev["capitals"]["acc"] <= 1.0
    # Every stage left its marker; the tokenizer trained on the curated corpus.
    assert all(Marker.read(run, s) for s in ["curate", *STAGES])
    order = ["curate", *STAGES[:5], *LATER]
    assert list(summary["seconds"]) == order
    updates = Marker.read(run, "curate").config_updates
    assert updates["data.train_texts"] == str(run / "corpus" / "train.jsonl")
    # The later stages: SFT, reward model, PPO, one online round, vision-language, tools.
    assert all(Marker.read(run, s) for s in LATER)
    assert summary["sft"]["val_loss_after"] < summary["sft"]["val_loss_before"]
    assert summary["reward_model"] and summary["ppo"] and summary["rlhf_round"]["round"] == 0
    assert summary["vision_pretrain"]["final_loss"] < summary["vision_pretrain"]["first_loss"]
    assert summary["vlm_stage2"]["final_loss"] < summary["vlm_stage2"]["first_loss"]
    assert (run / "stages" / "vlm_stage2" / "llava" / "config.json").is_file()
    # The tools stage's turn and the final turn (an image + a question): the model's own call or
    # none (never a forced one), recorded with the transcript.
    assert summary["tool_turn"]["call_source"] in ("model", "none")
    chat = summary["chat"]
    assert chat["call_source"] in ("model", "none") and Path(chat["image"]).is_file()
    roles = [m["role"] for m in summary["chat/transcript"]]
    assert "user" in roles and roles[-1] == "assistant"
    assert ("tool" in roles) == (chat["call_source"] == "model")
    page = (run / "report.html").read_text()
    assert all(f'id="{s}"' in page for s in order) and "<img" in page


@pytest.mark.slow
def test_tiny_pipeline_writes_every_marker_and_a_rerun_skips_every_stage(tmp_path, shared_data_dir):
    run = tmp_path / "run"
    res = _mmllm("pipeline", f"run_dir={run}", *_tiny(shared_data_dir), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    for i, name in enumerate(STAGES, 1):
        assert f"[pipeline] stage {i}/{len(STAGES)} {name}: ran" in res.stdout
    markers = {s: Marker.read(run, s) for s in STAGES}
    assert all(markers.values())
    assert markers["pretrain"].outputs["checkpoint"] == "checkpoints/final.ckpt"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["steps"] == 10 and summary["val_ppl_after"] < summary["val_ppl_before"]
    assert summary["tokenizer"]["vocab_size"] == 512 and len(summary["samples"]) == 3
    assert list(summary["seconds"]) == STAGES[:-2] and "curation" not in summary
    assert (run / "hf" / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    md = (run / "summary.md").read_text()
    assert md.startswith("# mmllm pipeline run") and "## Evaluation" in md and "## Samples" in md

    # The same run directory again (Hydra's own way to name it): nothing reruns.
    res = _mmllm("pipeline", f"hydra.run.dir={run}", *_tiny(shared_data_dir), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    for i, name in enumerate(STAGES, 1):
        assert f"[pipeline] stage {i}/{len(STAGES)} {name}: skipped" in res.stdout
    assert "===" not in res.stdout  # no stage started
    assert {s: Marker.read(run, s).run_id for s in STAGES} == {s: m.run_id for s, m in markers.items()}


@pytest.mark.slow
def test_failed_stage_resumes_and_a_changed_option_reruns_only_what_reads_it(tmp_path, shared_data_dir):
    run, tiny = tmp_path / "run", _tiny(shared_data_dir)
    with pytest.raises(StageError) as err:
        _run(run, [*tiny, "pipeline.stages.export.dtype=bogus"])
    assert err.value.stage == "export"
    assert str(err.value).startswith("stage 'export' failed: unknown dtype 'bogus'")
    assert err.value.fix.startswith("set the dtype option to float32") and "to resume from 'export'" in err.value.fix
    assert Marker.read(run, "tokenize") and Marker.read(run, "pretrain")
    assert (run / "checkpoints" / "final.ckpt").is_file()
    assert not any(Marker.read(run, s) for s in ["export", "evaluate", "samples", "summary", "report"])

    # Fixed: the rerun resumes from the failed stage.
    assert _run(run, tiny) == {"tokenize": "skipped", "pretrain": "skipped", "export": "ran",
                               "evaluate": "ran", "samples": "ran", "summary": "ran", "report": "ran"}
    before = json.loads((run / "summary.json").read_text())

    # One stage's option: that stage and what reads it (the summary) rerun, nothing else.
    assert _run(run, [*tiny, "pipeline.stages.evaluate.limit=4"]) == {
        "tokenize": "skipped", "pretrain": "skipped", "export": "skipped", "evaluate": "ran",
        "samples": "skipped", "summary": "ran", "report": "ran"}
    after = json.loads((run / "summary.json").read_text())
    assert after["samples"] == before["samples"] and after["train"] == before["train"]
    assert Marker.read(run, "evaluate").config["stage"]["limit"] == 4


@pytest.mark.slow
def test_stages_subset_reads_earlier_outputs_and_names_a_missing_stage(tmp_path, shared_data_dir):
    run, tiny = tmp_path / "run", _tiny(shared_data_dir)
    with pytest.raises(StageError, match=r"stage 'pretrain' needs the outputs of stage 'tokenize', "
                                         r"which has not finished"):
        _run(run, [*tiny, "stages=[pretrain]"])
    assert _run(run, [*tiny, "stages=[tokenize]"])["tokenize"] == "ran"
    assert [s for s in STAGES if Marker.read(run, s)] == ["tokenize"]
    status = _run(run, [*tiny, "stages=[pretrain,samples]"])
    assert status == {"tokenize": "skipped", "pretrain": "ran", "export": "outdated", "evaluate": "outdated",
                      "samples": "ran", "summary": "outdated", "report": "outdated"}
    samples = Marker.read(run, "samples").record["samples"]
    assert len(samples) == 3 and all(s["completion"] for s in samples)
    assert not (run / "hf").exists() and not (run / "summary.json").exists()
    # A data key that does not change the tokenizer or the shards outdates pretrain, not tokenize.
    status = _run(run, [*tiny, "data.batch_size=4", "stages=[tokenize]"])
    assert status["tokenize"] == "skipped" and status["pretrain"] == "outdated"


@pytest.mark.slow
def test_an_interrupted_pretrain_continues_from_its_last_checkpoint(tmp_path, shared_data_dir, monkeypatch):
    from mmllm.modules.causal_lm import CausalLMModule

    run, tiny = tmp_path / "run", [*_tiny(shared_data_dir), "stages=[tokenize,pretrain]"]
    step = CausalLMModule.training_step

    def crash_at_step_7(self, batch, batch_idx):
        if self.global_step == 7:
            raise RuntimeError("simulated crash")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CausalLMModule, "training_step", crash_at_step_7)
    with pytest.raises(StageError, match="stage 'pretrain' failed: RuntimeError: simulated crash"):
        _run(run, tiny)
    assert (run / "checkpoints" / "last.ckpt").is_file() and Marker.read(run, "pretrain") is None
    monkeypatch.undo()
    assert _run(run, tiny)["pretrain"] == "ran"
    train = Marker.read(run, "pretrain").record["train"]
    assert train["steps"] == 10 and train["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert "resuming training from" in (run / "stages" / "pretrain" / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_two_process_pretrain_stage_joins_the_pipeline(tmp_path, shared_data_dir):
    """`mmllm pipeline trainer.devices=2`: Lightning reruns the command for rank 1, which joins
    only the pretrain stage; rank 0 alone runs the other stages and writes the markers."""
    run = tmp_path / "run"
    res = _mmllm("pipeline", f"hydra.run.dir={run}", *_tiny(shared_data_dir), "trainer.max_steps=4",
                 "stages=[tokenize,pretrain]", "trainer=cpu", "trainer.devices=2", "strategy=ddp",
                 "trainer.enable_progress_bar=false", cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out  # both ranks trained
    train = Marker.read(run, "pretrain").record["train"]
    assert train["steps"] == 4 and train["tokens"] == 4 * 8 * 64 * 2  # batches of both ranks counted
    assert (run / "checkpoints" / "final.ckpt").is_file()
    assert out.count("stage 2/") == 1  # rank 0 alone reports the pipeline's stages
    assert Marker.read(run, "export") is None  # not selected: neither rank ran it

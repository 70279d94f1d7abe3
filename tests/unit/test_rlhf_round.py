"""``mmllm rlhf-round`` (mmllm.rlhf.round) with fake trainers, a fake policy and a scripted AI judge:
a whole round, resuming after a failed step, the next round from the last one's outputs, a human
round finished by another writer; and the ``rlhf_round`` pipeline stage on a tiny real checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from mmllm.config import compose_config
from mmllm.rlhf.labels import LabelStore
from mmllm.rlhf.round import last_metrics, load_prompts, run_round

HERE = __name__
PROMPTS = ["Name a colour.", "Name a fruit.", "Say hello.", "Count to three."]


class FakeSampler:
    """K responses per prompt whose lengths differ (the judge below prefers longer ones)."""

    calls = 0

    def __init__(self, *, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def __call__(self, prompts, n):
        FakeSampler.calls += 1
        tag = Path(self.checkpoint).name
        return [[f"{tag} {p} " + "x" * (i + 1) for i in range(n - 1)] + [f"{tag} {p} x"] for p in prompts]


class LengthScorer:
    def __init__(self, *, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def __call__(self, prompts, responses):
        return [0.1 * len(r) for r in responses]


class LengthTeacher:
    """A judge that prefers the longer response, whatever the order (answers in its format)."""

    model = "length"

    def __init__(self) -> None:
        self.closed = False

    def chat_many(self, conversations, **kw):
        out = []
        for messages in conversations:
            user = messages[-1]["content"]
            a = user.split("[Start of response A]\n")[1].split("\n[End of response A]")[0]
            b = user.split("[Start of response B]\n")[1].split("\n[End of response B]")[0]
            out.append(f"A has {len(a)} chars, B {len(b)}.\nVerdict: {'A' if len(a) > len(b) else 'B'}")
        return out

    def close(self) -> None:
        self.closed = True


class FakeTrain:
    """Records each call; writes a marker where the checkpoint would be; can fail once."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls, self.fail_on = [], fail_on

    def __call__(self, overrides, output_dir):
        kind = overrides[0].removeprefix("experiment=")
        self.calls.append((kind, list(overrides), str(output_dir)))
        if kind == self.fail_on:
            self.fail_on = None
            raise RuntimeError(f"{kind} crashed")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "trained.txt").write_text(" ".join(overrides))
        return {"train/loss": 0.5}


def round_cfg(run_dir: Path, *extra: str):
    """The round config on fakes; ``extra`` overrides replace the defaults here by key."""
    opts = {"run_dir": str(run_dir), "policy": f"{run_dir}/sft", "labeller": "ai",
            "prompts": json.dumps(PROMPTS), "prompts_per_round": "3", "samples_per_prompt": "3", "budget": "4"}
    opts.update(e.split("=", 1) for e in extra)
    cfg = compose_config("rlhf_round", [f"{k}={v}" for k, v in opts.items()])
    with open_dict(cfg):
        cfg.teacher = OmegaConf.create({"_target_": f"{HERE}.LengthTeacher"})
        cfg.sampler = OmegaConf.create({"_target_": f"{HERE}.FakeSampler", "_partial_": True})
        cfg.scorer = OmegaConf.create({"_target_": f"{HERE}.LengthScorer", "_partial_": True})
    return cfg


def test_a_round_with_the_ai_judge_resumes_and_the_next_round_builds_on_it(tmp_path):
    FakeSampler.calls = 0
    train = FakeTrain(fail_on="ppo")
    with pytest.raises(RuntimeError, match="ppo crashed"):
        run_round(round_cfg(tmp_path), train=train)
    state = json.loads((tmp_path / "rounds/0/round.json").read_text())
    assert state["status"] == "running" and "ppo" not in state["steps"]
    assert state["steps"]["select"]["metrics"]["strategy"] == "random"  # no reward model yet
    state = run_round(round_cfg(tmp_path), train=train)  # resumes at ppo
    assert FakeSampler.calls == 1 and [c[0] for c in train.calls] == ["reward_model", "ppo", "ppo"]
    assert state["status"] == "finished" and list(state["steps"]) == [
        "sample", "select", "label", "merge", "reward_model", "ppo"]
    rm_dir, policy_dir = tmp_path / "rounds/0/reward_model", tmp_path / "rounds/0/policy"
    assert state["outputs"]["reward_model"] == str(rm_dir) and state["outputs"]["policy"] == str(policy_dir)
    comparisons = tmp_path / "rounds/0/comparisons.jsonl"
    assert train.calls[0][1] == ["experiment=reward_model",
                                 f"data.sources=[{{name: comparisons, path: '{comparisons}'}}]",
                                 f"data.tokenizer={tmp_path}/sft",
                                 f"module.init_from={tmp_path}/sft"]  # round 0: init from the policy
    assert train.calls[-1][1] == ["experiment=ppo", f"policy={tmp_path}/sft", f"reward={rm_dir}"]
    recs = [json.loads(ln) for ln in comparisons.read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["chosen"]) > len(r["rejected"]) for r in recs)  # the judge's choice
    label = state["steps"]["label"]["metrics"]
    assert label["agree"] == 3 and label["position_bias"] == 0.0 and label["counts"]["ai"] == 3
    assert state["steps"]["select"]["metrics"]["duplicates"] == 3  # "x" twice per prompt

    state1 = run_round(round_cfg(tmp_path), train=train)  # round=null: the next round
    assert state1["round"] == 1 and state1["inputs"]["policy"] == str(policy_dir)
    assert state1["inputs"]["reward_model"] == str(rm_dir)
    assert state1["steps"]["select"]["metrics"]["strategy"] == "uncertainty"
    assert state1["inputs"]["prompts"] == [PROMPTS[3], PROMPTS[0], PROMPTS[1]]  # the next slice
    assert train.calls[-2][1][3] == f"module.init_from={rm_dir}"  # the RM continues from the last one
    assert state1["steps"]["merge"]["metrics"]["preference_pairs"] == 6  # both rounds merged
    with LabelStore(tmp_path / "labels.sqlite") as store:
        assert store.rounds() == [0, 1]
        assert all(c.meta["policy"] == str(policy_dir) for c in store.comparisons(1))
        # round 1's pairs were ordered by the previous reward model: most uncertain first
        pr = [c.meta["priority"] for c in store.comparisons(1)]
        assert pr == sorted(pr)


def test_a_changed_input_on_resume_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        run_round(round_cfg(tmp_path), train=FakeTrain(fail_on="reward_model"))
    with pytest.raises(ValueError, match=r"other inputs \(\['budget'\]\)"):
        run_round(round_cfg(tmp_path, "budget=2"), train=FakeTrain())


def test_no_decisive_label_is_an_error_unless_allowed(tmp_path):
    cfg = round_cfg(tmp_path, "samples_per_prompt=1")  # one response per prompt: no pairs at all
    with pytest.raises(RuntimeError, match="no decisive"):
        run_round(cfg, train=FakeTrain())
    state = run_round(round_cfg(tmp_path / "b", "samples_per_prompt=1", "require_preferences=false"),
                      train=(train := FakeTrain()))
    assert train.calls == [] and state["outputs"]["policy"] == f"{tmp_path}/b/sft"
    assert state["steps"]["ppo"]["metrics"] == {"skipped": "no preference pairs"}


def test_human_round_waits_for_the_budget_answered_by_any_writer(tmp_path):
    cfg = round_cfg(tmp_path, "labeller=human", "label_server.port=0", "label_server.poll_s=0.05")
    result, errors = {}, []

    def work():
        try:
            result.update(run_round(cfg, train=FakeTrain()))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    with LabelStore(tmp_path / "labels.sqlite") as store:  # a second labeller answers everything
        answered = 0
        while thread.is_alive() and answered < 3:
            for c in store.comparisons(0, pending=True):
                store.answer(c.id, "a", labeller="bob")
                answered += 1
            thread.join(0.05)
    thread.join(120)
    assert not errors and result["status"] == "finished"
    assert result["steps"]["label"]["metrics"]["answered"] == 3
    assert result["steps"]["label"]["metrics"]["stopped_early"] is False


def test_stopping_the_page_early_pauses_the_round_until_resumed(tmp_path, monkeypatch):
    from mmllm.rlhf import label_server

    def stopped(store, round, **kw):  # the labeller answered one, then pressed Ctrl-C
        store.answer(store.next_pending(round).id, "a", labeller="ann")
        answered, total = store.progress(round)
        return {"answered": answered, "total": total, "answers": 1, "stopped_early": True,
                "stopped_by_signal": True}

    monkeypatch.setattr(label_server, "serve_labels", stopped)
    cfg = round_cfg(tmp_path, "labeller=human")
    train = FakeTrain()
    state = run_round(cfg, train=train)
    assert state["status"] == "paused" and "label" not in state["steps"] and train.calls == []
    state = run_round(round_cfg(tmp_path, "labeller=human", "label_server.accept_partial=true"), train=train)
    assert state["status"] == "finished" and state["round"] == 0  # the paused round, not a new one
    assert state["steps"]["merge"]["metrics"]["preference_pairs"] == 2


def test_prompt_sources_and_metrics_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    (tmp_path / "p.txt").write_text("a\n\nb\n")
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"] == load_prompts(str(tmp_path / "p.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "m.csv").write_text("step,train/loss,val/loss\n1,2.0,\n2,1.5,\n2,,1.7\n")
    assert last_metrics(tmp_path / "m.csv") == {"step": 2.0, "train/loss": 1.5, "val/loss": 1.7}


# --------------------------------------------------------------------- the pipeline stage
TEXT = ("The capital of France is Paris. Name a colour: blue. Name a fruit: apple. Hello there! "
        "Verdict: A. Verdict: B. One, two, three. Response A is better than response B.") * 30


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, write_tiny_checkpoint) -> Path:
    """A random tiny DecoderLM saved as a kit training checkpoint, its tokenizer recorded."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TEXT, max_seq_len=512, name="final.ckpt")


def stage_ctx(run: Path, ckpt: Path):
    from mmllm.stages.base import Marker, StageContext

    def marker(name, outputs):
        return Marker(stage=name, target="x", fingerprint="f", run_id=name, started_at="", finished_at="",
                      seconds=0.0, outputs=outputs, record={}, config_updates={}, config={})

    return StageContext(name="rlhf_round", run_dir=run, cfg=OmegaConf.create({"seed": 3}),
                        markers={"tokenize": marker("tokenize", {}),
                                 "pretrain": marker("pretrain", {"checkpoint": str(ckpt)})})


def test_stage_labels_with_the_local_logprob_judge_and_retrains(tmp_path, tiny_ckpt):
    """The tiny model's text never parses, but its token probabilities label every comparison:
    the round retrains the reward model and runs PPO for real (in-process, a few steps)."""
    import torch

    from mmllm.checkpoint import load_model, resolve_ckpt
    from mmllm.modules.reward import load_reward_model
    from mmllm.stages.rlhf_round import RLHFRoundStage

    stage = RLHFRoundStage(prompts=["Name a colour.", "Say hello."], samples_per_prompt=3, budget=4,
                           max_new_tokens=6, reward_steps=2, ppo_rollouts=1, require_preferences=True)
    ctx = stage_ctx(tmp_path, tiny_ckpt)
    stage.run(ctx)
    rec = ctx.record["rlhf_round"]
    assert rec["selected"] == 4 and rec["strategy"] == "random" and rec["judge_scoring"] == "logprob"
    assert rec["judged"] == 4 and sum(rec["judge"].values()) == 4 and rec["judge"]["failed"] == 0
    assert rec["labels"]["a"] + rec["labels"]["b"] == rec["preference_pairs"] > 0
    samples = [json.loads(ln) for ln in (tmp_path / "rlhf/rounds/0/samples.jsonl").read_text().splitlines()]
    assert [len(s["responses"]) for s in samples] == [3, 3]
    with LabelStore(tmp_path / "rlhf/labels.sqlite") as store:
        labelled = store.comparisons(0, pending=False)
    assert len(labelled) == 4 and all(c.source == "ai" and c.rationale.startswith("[A first]\nP(A)=")
                                      for c in labelled)
    # Both training steps ran: their metrics are recorded and their checkpoints load.
    assert rec["trained"] and 0.0 <= rec["reward_model_train_acc"] <= 1.0 and rec["reward_model_loss"] > 0
    assert isinstance(rec["ppo_reward_mean"], float)
    for out, steps in ((rec["reward_model"], 2), (rec["policy"], 1)):  # the stage's pipeline-scale steps
        assert torch.load(resolve_ckpt(out), map_location="cpu", weights_only=False)["global_step"] == steps
    scores = load_reward_model(rec["reward_model"])(["Say hello."], ["Hello there!"])
    assert scores.shape == (1,) and bool(torch.isfinite(scores).all())
    assert type(load_model(rec["policy"])[0]).__name__ == "DecoderLM"


def test_stage_trains_on_what_a_decisive_judge_labels(tmp_path, tiny_ckpt):
    from mmllm.stages.rlhf_round import RLHFRoundStage

    train = FakeTrain()
    stage = RLHFRoundStage(prompts=["Name a colour.", "Say hello."], samples_per_prompt=3, budget=4,
                           max_new_tokens=8, train=train, require_preferences=True, judge_scoring="text",
                           overrides=["selection.max_pairs_per_prompt=1"])
    cfg = stage.round_config(stage_ctx(tmp_path, tiny_ckpt))
    assert cfg.teacher._target_ == "mmllm.teacher.LocalTeacher" and cfg.teacher.checkpoint == str(tiny_ckpt)
    assert cfg.judge.scoring == "text" and "trainer.max_steps=4" in cfg.reward_train.overrides
    with open_dict(cfg):  # the same round with a judge that always decides
        cfg.teacher = OmegaConf.create({"_target_": f"{HERE}.LengthTeacher"})
    state = run_round(cfg, train=train)
    assert [c[0] for c in train.calls] == ["reward_model", "ppo"]
    assert state["steps"]["select"]["metrics"]["selected"] == 2  # the override: one pair per prompt
    assert state["steps"]["merge"]["metrics"]["preference_pairs"] == 2


def test_scalar_head_scorer_batches_with_padding_like_one_at_a_time(tiny_ckpt, monkeypatch):
    import functools

    import torch
    from transformers import AutoTokenizer

    from mmllm.data.chat import ChatRenderer
    from mmllm.models.decoder_lm import DecoderLM
    from mmllm.models.heads import DecoderWithScalarHead
    from mmllm.nn.heads import ScalarHead
    from mmllm.rlhf import policy

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt.parent / "tokenizer"))
    decoder = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                        max_seq_len=256)
    rm = DecoderWithScalarHead(decoder=decoder, head=functools.partial(ScalarHead, init_std=1.0)).eval()
    monkeypatch.setattr(policy, "_load", lambda *a: (rm, tok, ChatRenderer(tok), "cpu"))
    scorer = policy.ScalarHeadScorer(checkpoint="rm", batch_size=3)
    prompts, responses = ["Say hello."] * 2 + ["Name a colour."] * 2, ["Hello there!", "Hi", "blue", "It is blue."]
    got = scorer(prompts, responses)
    renderer = ChatRenderer(tok)
    with torch.no_grad():
        want = [rm(torch.tensor([renderer([{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                                 .input_ids])).scores.item() for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-5) and len(set(got)) == 4
    monkeypatch.setattr(policy, "_load", lambda *a: (decoder, tok, ChatRenderer(tok), "cpu"))
    with pytest.raises(TypeError, match="not a reward model"):
        policy.ScalarHeadScorer(checkpoint="lm")(prompts, responses)


def test_round_config_passes_the_config_check(tmp_path):
    from mmllm.config import check_config

    overrides = [f"run_dir={tmp_path}", "policy=smollm2", "prompts=[a,b]", "teacher=local"]
    cfg = compose_config("rlhf_round", overrides)
    check_config(cfg, choices=dict(cfg.hydra.runtime.choices), overrides=overrides, primary="rlhf_round")
    bad = [*overrides, "+judge.bogus=1"]  # the check does read the round's targets
    cfg = compose_config("rlhf_round", bad)
    with pytest.raises(Exception, match="PairwiseJudge takes no argument 'bogus'"):
        check_config(cfg, choices=dict(cfg.hydra.runtime.choices), overrides=bad, primary="rlhf_round")


def test_train_cli_command_resume_and_errors(tmp_path, monkeypatch):
    """The default trainer's plumbing (the subprocess faked): command, resume, failure, no checkpoint."""
    import subprocess
    import types

    from mmllm.errors import MissingFileError
    from mmllm.rlhf import round as round_mod

    seen, rc = [], {"value": 0}

    def fake_run(cmd, check, stdout, stderr):
        seen.append(cmd)
        stdout.write(b"training...\nboom: bad override\n" if rc["value"] else b"ok\n")
        return types.SimpleNamespace(returncode=rc["value"])

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = tmp_path / "rm"
    rc["value"] = 1
    with pytest.raises(RuntimeError, match="(?s)failed \\(exit 1\\).*boom: bad override"):
        round_mod.train_cli(["experiment=reward_model"], out)
    assert seen[-1][1:] == ["-m", "mmllm", "train", "experiment=reward_model", f"hydra.run.dir={out}"]
    rc["value"] = 0
    with pytest.raises(MissingFileError):  # "succeeded" but saved nothing to load
        round_mod.train_cli(["experiment=reward_model"], out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (out / "csv").mkdir()
    (out / "csv" / "metrics.csv").write_text("step,val/loss\n3,0.25\n")
    assert round_mod.train_cli(["experiment=reward_model"], out) == {"step": 3.0, "val/loss": 0.25}
    assert "ckpt_path=last" in seen[-1]  # an earlier attempt's last.ckpt: resumed

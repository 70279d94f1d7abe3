"""PPOModule on tiny policies: reward goes up with bounded KL, PPO-ptx, hooks, rollout layout,
checkpoints, the prompt datamodule and ``mmllm train experiment=ppo debug=tiny``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmllm.generation import DecodeSession, SamplingParams
from mmllm.models import DecoderLM, DecoderWithScalarHead
from mmllm.modules.ppo import PPOModule, TokenFractionReward, gathered, pad_rollout
from mmllm.nn.heads import ScalarHead

V, TARGET, EOS = 32, 7, 2
POLICY = {"vocab_size": V, "dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64, "max_seq_len": 64}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def loader(items: list[list[int]], batch_size: int = 16) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, shuffle=True, drop_last=True,
                      collate_fn=lambda rows: {"prompt_ids": [list(r) for r in rows]})


def module(cls=PPOModule, seed: int = 0, **kwargs) -> PPOModule:
    torch.manual_seed(seed)
    opts = {"model": DecoderLM(**POLICY), "reward_fn": TokenFractionReward(token_ids=[TARGET]),
            "optimizer": partial(torch.optim.AdamW, lr=5e-3), "max_new_tokens": 6, "ppo_epochs": 2,
            "num_minibatches": 2, "kl_coef": 0.05, "eos_token_id": EOS, "probe_every": 0}
    return cls(**{**opts, **kwargs})


def fit(m: PPOModule, rollouts: int, data=None, seed: int = 0) -> PPOModule:
    L.seed_everything(seed, verbose=False)
    steps = rollouts * m.ppo_epochs * m.num_minibatches
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(m, train_dataloaders=data if data is not None else loader(prompts(64)))
    return m


@pytest.fixture(scope="module")
def trained() -> PPOModule:
    # Adaptive KL control towards 1 nat per response.
    return fit(module(kl_target=1.0, kl_horizon=200), rollouts=12)


def test_ppo_raises_reward_while_kl_stays_bounded(trained):
    h = trained.history
    assert len(h) == 12
    first = sum(r["reward_mean"] for r in h[:3]) / 3
    last = sum(r["reward_mean"] for r in h[-3:]) / 3
    # A random policy says the target token ~1/32 of the time.
    assert first < 0.15 and last > first + 0.2, [round(r["reward_mean"], 3) for r in h]
    assert max(r["kl"] for r in h) < 12.0
    # beta followed the adaptive controller over the measured KLs (16 samples per rollout).
    from mmllm.losses.ppo import AdaptiveKLController

    replay = AdaptiveKLController(kl_coef=0.05, target=1.0, horizon=200)
    for r in h:
        assert r["beta"] == pytest.approx(replay.value, rel=1e-5)
        replay.update(r["kl"], 16)
    assert len({round(r["beta"], 6) for r in h}) > 2  # it moved
    for key in ("entropy", "clip_frac", "approx_kl", "value_loss", "response_len", "reward_std", "lr"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in h), key


def ptx_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    # A counting pattern the LM loss can learn: token t is followed by t + 1.
    ids = (torch.arange(17)[None] + torch.arange(4)[:, None]) % (V - 3) + 3
    return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}] * n


def lm_loss(m: PPOModule) -> float:
    from mmllm.losses import causal_lm_loss

    b = ptx_batches(1)[0]
    with torch.no_grad():
        return float(causal_lm_loss(m.policy(b["input_ids"]).logits, b["labels"])[0])


def test_ptx_keeps_the_pretraining_loss_lower():
    base = fit(module(seed=1), rollouts=2, seed=1)
    ptx = fit(module(seed=1, ptx_coef=1.0, ptx_data=ptx_batches()), rollouts=2, seed=1)
    assert "ptx_loss" in ptx.history[-1] and "ptx_loss" not in base.history[-1]
    assert lm_loss(ptx) < lm_loss(base) - 0.5, (lm_loss(ptx), lm_loss(base))


class LengthPenalty(PPOModule):
    """Overrides one hook: the reward is minus the response length."""

    def score(self, roll):
        return -roll.mask.sum(-1).float()


def test_an_overridden_hook_is_used():
    m = fit(module(LengthPenalty), rollouts=1)
    assert m.history[0]["reward_mean"] == pytest.approx(-m.history[0]["response_len"])


def test_old_logprobs_match_the_decode_session():
    """The forward over [left-padded prompt | right-padded response] gives the log-probabilities
    the cached decode sampled with (same positions, same temperature)."""
    m = module(temperature=0.7)
    m.configure_model()
    m.eos_token_id = None
    ps = prompts(5, seed=3)
    session = DecodeSession(m.policy.eval(), max_rows=5, max_len=20, logprobs=True,
                            generator=torch.Generator().manual_seed(0))
    rows = session.add_rows(ps, max_new_tokens=4 + 0, sampling=SamplingParams(0.7))
    while session.step():
        pass
    responses = [session.rows[r].tokens[: 1 + i % 4] for i, r in enumerate(rows)]  # ragged
    roll = pad_rollout(ps, responses, 0, torch.device("cpu"))
    assert roll.response.shape == (5, 4) and roll.mask.sum(-1).tolist() == [1, 2, 3, 4, 1]
    with torch.no_grad():
        logprobs, values, entropy = m.forward_policy(roll.input_ids, roll.attention_mask, roll.response)
    expected = torch.zeros(5, 4)
    for i, r in enumerate(rows):
        expected[i, :len(responses[i])] = torch.tensor(session.rows[r].logprobs[:len(responses[i])])
    torch.testing.assert_close(logprobs * roll.mask, expected, atol=1e-4, rtol=0)
    assert values.shape == entropy.shape == (5, 4)


def test_reward_model_scores_the_last_response_token():
    torch.manual_seed(0)
    rm = DecoderWithScalarHead(decoder=DecoderLM(**POLICY), head=ScalarHead(dim=32, init_std=0.5))
    m = module(reward_model=rm)
    m.configure_model()
    ps, rs = [[1, 5, 6], [1, 9]], [[4, 4, 4], [8]]
    roll = pad_rollout(ps, rs, 0, torch.device("cpu"))
    with torch.no_grad():
        got = m.score(roll)
        alone = [float(rm(torch.tensor([p + r])).scores) for p, r in zip(ps, rs)]
    torch.testing.assert_close(got, torch.tensor(alone), atol=1e-5, rtol=0)
    assert m.reward_fn is None  # a reward model wins over the rule reward
    with pytest.raises(ValueError, match="no score head"):
        module(reward_model=DecoderLM(**POLICY)).configure_model()


def test_separate_critic_and_checkpoints(tmp_path, trained):
    from mmllm.checkpoint import load_model

    m = fit(module(critic="separate"), rollouts=1)
    assert m.critic is not None and torch.isfinite(torch.tensor(m.history[0]["value_loss"]))
    m.save_policy(tmp_path / "policy.ckpt")
    loaded, _ = load_model(tmp_path / "policy.ckpt")
    for k, v in m.policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A Lightning checkpoint of the shared-trunk module loads as the policy, and resumes.
    trained.trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded, _ = load_model(tmp_path / "run.ckpt")
    assert torch.equal(loaded.lm_head.weight, trained.policy.lm_head.weight)
    ckpt = torch.load(tmp_path / "run.ckpt", weights_only=False)
    fresh = module()
    fresh.configure_model()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    assert fresh.kl_ctl.value == trained.kl_ctl.value and fresh.rollouts == 12
    assert torch.equal(fresh.model.head.proj.weight, trained.model.head.proj.weight)


def test_gathered_is_a_noop_unsharded():
    model = DecoderLM(**POLICY)
    before = copy.deepcopy(model.state_dict())
    with gathered(model) as m:
        assert m is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


TEXTS = ["the cat sat on the mat and the dog sat on the log", "a bird in the hand is worth two",
         "the quick brown fox jumps over the lazy dog"] * 20


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """A kit run directory holding a tiny policy checkpoint and its (trained BPE) tokenizer."""
    from mmllm.data.tokenizer import train_bpe_tokenizer

    run = tmp_path_factory.mktemp("sft")
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, show_progress=False)
    tok.save_pretrained(str(run / "tokenizer"))
    torch.manual_seed(0)
    lm = DecoderLM(**{**POLICY, "vocab_size": len(tok)})
    (run / "checkpoints").mkdir()
    torch.save({"mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": lm.config,
                          "tokenizer": "../tokenizer"},
                "state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()}},
               run / "checkpoints" / "last.ckpt")
    return run, tok


def test_prompt_datamodule(tmp_path, policy_run):
    from mmllm.data.chat import render_prompt
    from mmllm.data.prompts import PromptDataModule

    run, tok = policy_run
    rows = [{"prompt": f"the cat {i}"} for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "woof"}]},
             {"bad": 1}, {"prompt": "the " * 50}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.raises(ValueError, match="p.jsonl:8"):
        PromptDataModule(path=str(f), tokenizer=str(run / "checkpoints" / "last.ckpt")).setup()
    dm = PromptDataModule(path=str(f), tokenizer=str(run), seq_len=24, batch_size=3, probe_size=2,
                          on_bad_row="skip", vocab_size=len(tok))
    dm.setup()
    assert dict(dm.counts) == {"bad_row": 2, "overlong_truncate": 1, "train": 6, "probe": 2}
    everything = dm.encode_all()
    assert everything[0] == [tok.bos_token_id] + tok("the cat 0", add_special_tokens=False)["input_ids"]
    assert everything[6] == render_prompt([{"role": "user", "content": "the dog"}], tok)  # the answer dropped
    assert len(everything[7]) == 24  # truncated on the left
    assert sorted(map(tuple, dm.probe_prompts + dm._train)) == sorted(map(tuple, everything))
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt_ids"]) == 3
    with pytest.raises(ValueError, match="vocab_size"):
        PromptDataModule(prompts=["the cat"], tokenizer=str(run), vocab_size=5, batch_size=1).setup()


def test_mmllm_train_experiment_ppo_debug_tiny(tmp_path, policy_run):
    from mmllm.checkpoint import load_model

    run, _ = policy_run
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"the {w}"}) for w in TEXTS[0].split() * 3))
    out = tmp_path / "ppo"
    proc = subprocess.run([sys.executable, "-m", "mmllm", "train", "experiment=ppo", "debug=tiny",
                           f"policy={run}", f"data.path={f}", "module.max_new_tokens=6",
                           f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (out / "csv" / "metrics.csv").read_text()
    for key in ("ppo/reward_mean", "ppo/kl", "ppo/beta", "probe/score_mean", "ppo/clip_frac"):
        assert key in metrics, key
    policy, tok = load_model(out / "checkpoints" / "last.ckpt")
    assert isinstance(policy, DecoderLM) and tok is not None


def test_ppo_stage(tmp_path, policy_run):
    """The stage alone: the pretrain stage's checkpoint, no reward model (rule reward), PPO-ptx
    on the pipeline's data, curves in the record, a loadable policy checkpoint."""
    from omegaconf import OmegaConf

    from mmllm.checkpoint import load_model
    from mmllm.stages import Marker, StageContext
    from mmllm.stages.ppo import PPOStage

    run, tok = policy_run
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    cfg = OmegaConf.create({"seed": 0, "data": {
        "_target_": "mmllm.data.text_corpus.TextCorpusDataModule", "train_texts": str(texts),
        "val_texts": str(texts), "cache_dir": str(tmp_path / "cache"), "tokenizer": str(run / "tokenizer"),
        "seq_len": 16, "batch_size": 4}})
    marker = Marker(stage="pretrain", target="x", fingerprint="f", run_id="r", started_at="",
                    finished_at="", seconds=0.0, outputs={"checkpoint": str(run / "checkpoints" / "last.ckpt")},
                    record={}, config_updates={}, config={})
    ctx = StageContext(name="ppo", run_dir=tmp_path, cfg=cfg, markers={"pretrain": marker})
    stage = PPOStage(rollouts=2, batch_size=4, probe_size=2, max_new_tokens=6)
    stage.run(ctx)
    r = ctx.record["ppo"]
    assert r["rollouts"] == 2 and len(r["reward_mean"]) == len(r["kl"]) == 2 and r["ptx"]
    assert "rule reward" in r["reward"] and len(r["ptx_loss"]) == 2 and r["probe"]
    policy, _ = load_model(stage.outputs(ctx)["checkpoint"])
    assert isinstance(policy, DecoderLM) and policy.vocab_size == len(tok)
    assert r["prompts"] == {"files": [], "inline": 16, "train": 14, "probe": 2}

    # A prompt file (a user's own data) instead of the built-in prompts; a bad row is counted.
    rows = [{"prompt": t[:20]} for t in TEXTS[:6]] + [{"messages": [{"role": "user", "content": "Hi"}]}, {"nope": 1}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    ctx = StageContext(name="ppo", run_dir=tmp_path / "file", cfg=cfg, markers={"pretrain": marker})
    PPOStage(path=str(prompts), on_bad_row="skip", rollouts=1, batch_size=4, probe_size=2,
             max_new_tokens=4, ptx_coef=0.0).run(ctx)
    counts = ctx.record["ppo"]["prompts"]
    assert counts == {"files": [str(prompts)], "inline": 0, "bad_row": 1, "train": 5, "probe": 2}

    # The self_instruct stage's instructions (SFT rows: the answers are dropped) as the prompts.
    made = tmp_path / "si" / "sft.jsonl"
    made.parent.mkdir()
    made.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t[:15]},
                                                       {"role": "assistant", "content": "ok"}]}) for t in TEXTS[:7]))
    si = Marker(stage="self_instruct", target="x", fingerprint="f", run_id="r", started_at="", finished_at="",
                seconds=0.0, outputs={"sft": str(made)}, record={}, config_updates={}, config={})
    ctx = StageContext(name="ppo", run_dir=tmp_path / "si_run", cfg=cfg,
                       markers={"pretrain": marker, "self_instruct": si})
    PPOStage(prompts=[], self_instruct=True, rollouts=1, batch_size=4, probe_size=2,
             max_new_tokens=4, ptx_coef=0.0).run(ctx)
    assert ctx.record["ppo"]["prompts"] == {"files": [str(made)], "inline": 0, "train": 5, "probe": 2}

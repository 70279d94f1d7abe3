"""The DPO-vs-PPO measurement (components/dpo/measure.py): a 2-step smoke of every arm, and the
layout it scores the reward model with is the one PPO scores sampled responses with."""

from __future__ import annotations

import pytest
import torch

from components.dpo import measure as M


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("measure")
    return out, M.measure(out, warmup_steps=2, dpo_steps=2, rm_steps=2, ppo_rollouts=1, samples=1,
                          dpo_lrs=(1e-3,), max_new_tokens=6)


def test_every_arm_runs_from_the_same_start(result):
    _, r = result
    start, dpo, ppo = r["rows"]
    assert [row["policy"].split()[0] for row in r["rows"]] == ["start", "DPO", "RM"]
    # The start policy against itself: KL exactly 0, no implicit reward to rank with.
    assert start["kl_to_start"] == 0.0 and start["implicit_pair_acc"] is None
    assert start["samples"] == dpo["samples"] == ppo["samples"] == r["held_out_prompts"] > 0
    for row in (dpo, ppo):
        assert 0.0 <= row["implicit_pair_acc"] <= 1.0 and row["gold_kind_words"] >= 0.0
    assert 0.0 <= ppo["rm_pair_acc"] <= 1.0 and 0.0 <= r["rm_pair_acc_as_ppo_scores"] <= 1.0
    assert len(r["ppo_reward_curve"]) == len(r["ppo_kl_curve"]) == 1  # one rollout
    assert r["val_pairs"] == 23 and "| RM + PPO" in M.table([r])


def test_reward_model_is_scored_in_ppos_layout(result):
    """What reward_accuracy_as_ppo_scores feeds the reward model is what PPOModule.score builds
    from a sampled response: the generation prompt's ids, the response (ending at <|im_end|>)
    and the end-of-context token."""
    out, _ = result
    dm = M.preference_data(out, reward_model=False)
    tok = dm.tokenizer
    ex = next(ex for rows in dm.examples.values() for ex in rows if dm.is_val(ex))
    for (ids, labels), response in zip(dm.encoder(ex), ex.responses):
        first = next(i for i, t in enumerate(labels) if t >= 0)
        last = max(i for i, t in enumerate(labels) if t >= 0)
        assert ids[:first + 1] == dm.encoder.renderer.prompt(ex.prompt)
        sampled = ids[first + 1:last + 2]
        assert sampled[-1] == tok.convert_tokens_to_ids(M.END)
        assert tok.decode(sampled, skip_special_tokens=True).strip() == response

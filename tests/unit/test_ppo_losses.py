"""The PPO losses (mmllm.losses.ppo) against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from mmllm.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    shape_rewards,
    token_logprobs,
    value_loss,
)

t = torch.tensor


def close(got: torch.Tensor, expected, tol: float = 1e-5) -> None:
    torch.testing.assert_close(got.float(), torch.as_tensor(expected, dtype=torch.float32),
                               atol=tol, rtol=0)


def test_kl_estimators():
    # policy p = 0.5, reference q = 0.25 on the sampled token: log r = log(q / p) = -ln 2.
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    close(kl_penalty(lp, ref, "k1"), [0.693147])  # -log r
    close(kl_penalty(lp, ref, "k2"), [0.240227])  # (ln 2)^2 / 2
    close(kl_penalty(lp, ref, "k3"), [0.193147])  # (0.5 - 1) + ln 2
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(lp, ref, "k4")


def test_shape_rewards_puts_the_score_on_the_last_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # beta 0.5: -0.05, -0.1, -0.15 + 1 | -0.25, 0 + 2, padding 0 (its KL of 9 is ignored).
    close(shape_rewards(t([1.0, 2.0]), kl, mask, 0.5), [[-0.05, -0.1, 0.85], [-0.25, 2.0, 0.0]])
    with pytest.raises(ValueError, match="at least one token"):
        shape_rewards(t([1.0]), t([[0.1]]), t([[0]]), 0.5)


def test_gae_with_masks():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 99.0]])  # 99: a padding value, must not leak
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: d2 = 1 - .7 = .3; d1 = .7 - .6 = .1 -> A1 = .1 + .5 * .3 = .25; A0 = .1 + .5 * .25
    # row 1: A2 = 0 (padding); d1 = 2 - .5 = 1.5 = A1; d0 = .5 - 1 = -.5 -> A0 = -.5 + .75
    close(adv, [[0.225, 0.25, 0.3], [0.25, 1.5, 0.0]])
    close(ret, [[0.725, 0.85, 1.0], [1.25, 2.0, 0.0]])
    # gamma discounts the bootstrapped value and the next advantage: A0 = 1 + 0.9 * 1 = 1.9.
    adv, _ = gae(t([[1.0, 1.0]]), t([[0.0, 0.0]]), t([[1, 1]]), gamma=0.9, lam=1.0)
    close(adv, [[1.9, 1.0]])


def test_masked_whiten_and_mean():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(masked_mean(x, mask), 2.5)
    # real values 1..4: mean 2.5, unbiased variance 5/3, std 1.290994.
    close(masked_whiten(x, mask), [[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False)[0, 0], 2.5 - 1.161895)


def test_clipped_policy_loss():
    # ratios 1.2, 0.6, 1.05; advantages 1, -2, 1; eps 0.1; the fourth token is padding.
    logprobs = torch.log(t([0.6, 0.3, 0.525, 0.9]))[None]
    old = torch.log(t([0.5, 0.5, 0.5, 0.1]))[None]
    adv, mask = t([[1.0, -2.0, 1.0, 50.0]]), t([[1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.1)
    # max(-A r, -A clip(r)): max(-1.2, -1.1) = -1.1 | max(1.2, 1.8) = 1.8 | -1.05 (not clipped)
    close(loss, (-1.1 + 1.8 - 1.05) / 3)
    close(stats["clip_frac"], 2 / 3)
    # k3 of KL(old || new) per token: (1/r - 1) + ln r = 0.015655, 0.155841, 0.001171
    close(stats["approx_kl"], (0.015655 + 0.155841 + 0.001171) / 3, tol=1e-5)
    close(stats["ratio"], (1.2 + 0.6 + 1.05) / 3)


def test_clipped_value_loss():
    values, old = t([[1.0, 0.0, 7.0]]), t([[0.5, 0.5, 0.0]])
    returns, mask = t([[2.0, 0.0, 0.0]]), t([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69; token 1: 0 vs (0.3 - 0)^2 = 0.09
    close(loss, 0.5 * (1.69 + 0.09) / 2)
    close(stats["clip_frac"], 1.0)
    close(stats["error"], 0.5)
    loss, _ = value_loss(values, old, returns, mask, clip_range=None)
    close(loss, 0.5 * (1.0 + 0.0) / 2)


def test_entropy_and_token_logprobs():
    logits = torch.log(t([[0.5, 0.5], [0.75, 0.25]]))
    # ln 2; -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    close(entropy_from_logits(logits), [0.693147, 0.562335])
    close(token_logprobs(logits[None], t([[0, 1]])), [[math.log(0.5), math.log(0.25)]])
    # temperature 2 on logits (ln 3, 0): softmax of (ln 3 / 2, 0) = (sqrt 3, 1) / (sqrt 3 + 1)
    close(token_logprobs(t([[[math.log(3.0), 0.0]]]), t([[0]]), temperature=2.0),
          [[math.log(math.sqrt(3) / (math.sqrt(3) + 1))]])


def test_kl_controllers():
    ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9: error 0.5 clipped to 0.2 -> beta * (1 + 0.2 * 256 / 10000) = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    # KL 5.4: error -0.1 -> beta * (1 - 0.1 * 1000 / 10000) = 0.100512 * 0.99
    assert ctl.update(5.4, 1000) == pytest.approx(0.09950688)
    assert FixedKLController(kl_coef=0.05).update(100.0, 10) == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(kl_coef=0.1, target=0.0, horizon=10)

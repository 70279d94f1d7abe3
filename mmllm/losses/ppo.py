"""PPO for language models (RLHF), as pure functions of tensors.

The per-token quantities of a rollout are (B, R) tensors over the response positions with a
(B, R) mask (1 for response tokens, 0 for the padding after a response that ended early):

* :func:`kl_penalty`: per-token KL estimate between the policy and the frozen reference
  (Schulman's k1/k2/k3 estimators, http://joschu.net/blog/kl-approx.html);
* :func:`shape_rewards`: the reward model's score on the last response token, -beta * KL on
  every token (Ziegler et al. 2019; Stiennon et al. 2020);
* :func:`gae`: generalised advantage estimation (Schulman et al. 2016) with the masks;
* :func:`masked_whiten`: advantages normalised over the real tokens only;
* :func:`policy_loss` / :func:`value_loss`: PPO's clipped surrogate and clipped value loss, with
  the approx-KL and clip-fraction statistics;
* :func:`entropy_from_logits`; :class:`AdaptiveKLController` / :class:`FixedKLController`.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (over ``dim``, or all of them)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("an unbiased variance needs at least 2 masked positions")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions; padding positions come out 0.

    Args:
        shift_mean: subtract the mean (False keeps it: only the scale is normalised).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    With ``log r = ref_logprob - logprob`` (the tokens are sampled from the policy):
    k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased, >= 0, low variance).

    Returns:
        The estimate, same shape as the inputs.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}: expected one of {KL_ESTIMATORS}")
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` everywhere, plus the score on the last response token.

    Args:
        scores: (B,) reward-model score of every response.
        kl: (B, R) per-token KL estimates (:func:`kl_penalty`).
        mask: (B, R) response mask (each row's tokens first, then its padding).
        kl_coef: beta.

    Returns:
        (B, R) rewards, 0 on padding.

    Raises:
        ValueError: a response without any token (it has no last token to score).
    """
    mask = mask.to(kl.dtype)
    lengths = mask.sum(-1).long()
    if (lengths < 1).any():
        raise ValueError("every response needs at least one token to carry its score")
    rewards = -kl_coef * kl * mask
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over variable-length responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where the value and advantage after a response's last token are 0 (the episode ends there).

    Args:
        rewards, values: (B, R) per-token rewards and values of the states before each token.
        mask: (B, R) response mask.

    Returns:
        ``(advantages, returns)``, each (B, R), 0 on padding; ``returns = advantages + values``
        (the value targets).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    R = rewards.shape[-1]
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(R)):
        # mask[t + 1] is 0 after the last token: nothing is bootstrapped past the end.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``, masked mean.

    Args:
        logprobs: (B, R) log-probabilities under the policy being trained.
        old_logprobs: (B, R) log-probabilities under the policy that sampled the rollout.
        advantages: (B, R).
        mask: (B, R) response mask.
        clip_range: epsilon.

    Returns:
        ``(loss, stats)``; stats (detached): ``clip_frac`` (share of tokens whose clipped term
        was taken), ``approx_kl`` (k3 estimate of KL(old || new)), ``ratio`` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                 "approx_kl": masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, *, clip_range: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ``0.5 * max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)``, masked mean.

    Args:
        values: (B, R) current values; old_values: (B, R) values at rollout time.
        returns: (B, R) targets (:func:`gae`).
        clip_range: c; None disables clipping (plain squared error).

    Returns:
        ``(loss, stats)``; stats: ``clip_frac`` (share of tokens where the clipped error was
        larger), ``error`` (mean squared error of the unclipped values).
    """
    err = (values - returns) ** 2
    if clip_range is None:
        loss_tok, frac = err, torch.zeros_like(err)
    else:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        err_clipped = (clipped - returns) ** 2
        loss_tok, frac = torch.maximum(err, err_clipped), (err_clipped > err).to(err.dtype)
    loss = 0.5 * masked_mean(loss_tok, mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean(frac, mask), "error": masked_mean(err, mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of (..., V) logits: ``logsumexp(z) - sum(softmax(z) * z)``, (...)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``tokens`` (B, R) under (B, R, V) ``logits / temperature`` (fp32)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    # log_softmax(z)[y] = z[y] - logsumexp(z): no (B, R, V) log-probability tensor is kept.
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


class FixedKLController:
    """A constant KL coefficient beta.

    Args:
        kl_coef: beta.
    """

    def __init__(self, *, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``.

    Args:
        kl_coef: the initial beta.
        target: the KL (per sequence, summed over its tokens) beta steers towards.
        horizon: how many samples a full proportional correction takes.
    """

    def __init__(self, *, kl_coef: float, target: float, horizon: int) -> None:
        if kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"kl_coef ({kl_coef}), target ({target}) and horizon ({horizon}) "
                             "must be positive")
        self.value, self.target, self.horizon = float(kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Updates beta after ``n_steps`` samples whose mean KL was ``current_kl``; returns it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

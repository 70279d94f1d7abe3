"""Preference losses (pure functions): K-wise ranking loss of a reward model, DPO / IPO.

Responses of a batch are flat: every response ``n`` has a score (reward, or DPO's implicit
reward), the prompt it answers (``group[n]``) and its rank among that prompt's responses
(``rank[n]``: 0 = best; equal ranks are ties). :func:`ranked_pairs` lists every pair (i ranked
above j) of every prompt and weights them so that each prompt counts once (mean over a prompt's
pairs, then mean over prompts): a prompt with K = 9 ranked answers (36 pairs) weighs as much as a
chosen/rejected pair. The pairwise case (K = 2) is the special case of one pair per prompt.

Ranking loss (InstructGPT, Ouyang et al. 2022, eq. 1; Anthropic, Bai et al. 2022)::

    loss = mean_prompts mean_{(i, j): i above j} -log sigmoid(r_i - r_j - margin)

DPO (Rafailov et al. 2023) with implicit rewards ``beta * (log pi(y|x) - log ref(y|x))``::

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with conservative label smoothing eps (cDPO: ``-(1-eps) log s(z) - eps log s(-z)``) or the IPO
loss (Azar et al. 2023): ``((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmllm.losses.lm import IGNORE_INDEX

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class RankedPairs:
    """The ordered pairs of a batch of ranked responses.

    Attributes:
        better, worse: (P,) indices of the higher- and lower-ranked response of every pair.
        weight: (P,) 1 / (pairs of its prompt) / (prompts with a pair): sums to 1.
        num_prompts: prompts with at least one pair (prompts whose responses all tie have none).
    """

    better: torch.Tensor
    worse: torch.Tensor
    weight: torch.Tensor
    num_prompts: int

    def __len__(self) -> int:
        return int(self.better.numel())


def ranked_pairs(group: torch.Tensor, rank: torch.Tensor) -> RankedPairs:
    """Every pair (i, j) of responses to the same prompt with ``rank[i] < rank[j]`` (ties excluded).

    Args:
        group: (N,) prompt index of each response (any integers; equal = same prompt).
        rank: (N,) rank of each response within its prompt, 0 = best (any ordered numbers).

    Returns:
        :class:`RankedPairs` (empty when no prompt has two differently ranked responses).
    """
    if group.shape != rank.shape or group.dim() != 1:
        raise ValueError(f"group and rank must be (N,) tensors of one shape, got {tuple(group.shape)} "
                         f"and {tuple(rank.shape)}")
    same = group[:, None] == group[None, :]  # (N, N)
    above = rank[:, None] < rank[None, :]  # (N, N) i ranked above j
    better, worse = torch.nonzero(same & above, as_tuple=True)
    if better.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=group.device)
        return RankedPairs(empty, empty, torch.zeros(0, device=group.device), 0)
    _, pair_group = torch.unique(group[better], return_inverse=True)  # (P,) dense prompt ids
    per_prompt = torch.bincount(pair_group).float()  # pairs of each prompt
    weight = 1.0 / per_prompt[pair_group] / per_prompt.numel()
    return RankedPairs(better, worse, weight, int(per_prompt.numel()))


def pairwise_logistic_loss(diff: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-log sigmoid(diff)`` per pair, with label smoothing eps: ``-(1-eps) log s(d) - eps log s(-d)``.

    Args:
        diff: (P,) score of the preferred minus score of the other (any float dtype).
        label_smoothing: the probability that a label is flipped (cDPO / robust RM training).

    Returns:
        (P,) fp32 losses (``logsigmoid``: no overflow for large |diff|).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    diff = diff.float()
    loss = -F.logsigmoid(diff)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-diff)
    return loss


def ranking_loss(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor, *,
                 margin: float | torch.Tensor = 0.0, label_smoothing: float = 0.0,
                 pairs: RankedPairs | None = None) -> tuple[torch.Tensor, RankedPairs]:
    """K-wise ranking loss of a reward model (see the module docstring).

    Args:
        scores: (N,) reward of every response.
        group, rank: (N,) prompt index and rank (0 = best) of every response.
        margin: subtracted from every pair's score difference: a float, or (N,) per-response
            margins whose difference ``margin[i] - margin[j]`` is the pair's margin (e.g. a
            preference strength turned into a score, Llama 2's margin loss).
        label_smoothing: see :func:`pairwise_logistic_loss`.
        pairs: precomputed :func:`ranked_pairs` of ``group``/``rank``.

    Returns:
        ``(loss, pairs)``: the fp32 scalar loss (0 with a gradient path when there is no pair) and
        the pairs it was computed over.
    """
    pairs = ranked_pairs(group, rank) if pairs is None else pairs
    if len(pairs) == 0:
        return scores.float().sum() * 0.0, pairs
    diff = scores[pairs.better].float() - scores[pairs.worse].float()  # (P,)
    if isinstance(margin, torch.Tensor):
        margin = margin[pairs.better].float() - margin[pairs.worse].float()
    losses = pairwise_logistic_loss(diff - margin, label_smoothing=label_smoothing)
    return (losses * pairs.weight).sum(), pairs


def pairwise_ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
                          margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """The K = 2 case: mean over pairs of ``-log sigmoid(chosen - rejected - margin)``.

    Args:
        chosen, rejected: (B,) rewards of the preferred and the other response of each prompt.
        margin: a float or (B,) per-pair margins.
    """
    return pairwise_logistic_loss(chosen.float() - rejected.float() - margin).mean()


def pair_accuracy(scores: torch.Tensor, pairs: RankedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(correct, total)``: pairs whose better response scores strictly higher, and all pairs
    (unweighted counts, so that sums over batches and ranks give the accuracy over all pairs)."""
    correct = (scores[pairs.better] > scores[pairs.worse]).sum()
    return correct, torch.tensor(len(pairs), device=scores.device)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, *,
                      ignore_index: int = IGNORE_INDEX, average: bool = False) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens.

    Labels are aligned with the logits (label t is the token after input t, the kit's
    convention: :func:`mmllm.losses.causal_lm_loss`); ``ignore_index`` positions (prompt,
    padding) are not counted.

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids or ``ignore_index``.
        average: the mean log-probability per counted token instead of the sum.

    Returns:
        (B,) fp32 log-probabilities (0 for a row without labels).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    mask = labels != ignore_index  # (B, T)
    target = labels.masked_fill(~mask, 0)
    # log_softmax in fp32: bf16 logits lose the small differences DPO lives on.
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[..., None]).squeeze(-1)
    total = (logp * mask).sum(-1)  # (B,)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_pair_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
                    label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO (or IPO) losses from sequence log-probabilities (all (P,)).

    Args:
        policy_chosen, policy_rejected: log pi of the preferred / other response.
        ref_chosen, ref_rejected: the same under the frozen reference model.
        beta: DPO's KL strength (IPO: the target log-ratio gap is 1 / (2 beta)).
        label_smoothing: cDPO's flip probability (sigmoid loss only).
        loss_type: "sigmoid" (DPO) or "ipo".

    Returns:
        (P,) fp32 losses.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected one of {DPO_LOSSES}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logits = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid (DPO) loss, not IPO")
        return (logits - 1.0 / (2.0 * beta)) ** 2
    return pairwise_logistic_loss(beta * logits, label_smoothing=label_smoothing)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, **kwargs) -> torch.Tensor:
    """Mean of :func:`dpo_pair_losses` over the pairs (same arguments)."""
    return dpo_pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs).mean()


def dpo_ranking_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, group: torch.Tensor,
                     rank: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
                     loss_type: str = "sigmoid") -> tuple[torch.Tensor, RankedPairs, torch.Tensor]:
    """DPO over ranked lists: every ordered pair of a prompt, prompts weighted as in
    :func:`ranking_loss` (for K = 2 this is :func:`dpo_loss`).

    Args:
        policy_logps, ref_logps: (N,) sequence log-probabilities of every response.
        group, rank: (N,) prompt index and rank (0 = best).

    Returns:
        ``(loss, pairs, rewards)``: the scalar loss, the pairs, and the (N,) implicit rewards
        ``beta * (policy - ref)`` (detached; for margins and accuracy).
    """
    pairs = ranked_pairs(group, rank)
    rewards = (beta * (policy_logps.float() - ref_logps.float())).detach()
    if len(pairs) == 0:
        return policy_logps.float().sum() * 0.0, pairs, rewards
    b, w = pairs.better, pairs.worse
    losses = dpo_pair_losses(policy_logps[b], policy_logps[w], ref_logps[b], ref_logps[w], beta=beta,
                             label_smoothing=label_smoothing, loss_type=loss_type)
    return (losses * pairs.weight).sum(), pairs, rewards

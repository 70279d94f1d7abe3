"""Preference losses against values computed by hand (log(1 + e^-d) = -log sigmoid(d))."""

from __future__ import annotations

import math

import pytest
import torch

from mmllm.losses.ranking import (
    dpo_loss,
    dpo_pair_losses,
    dpo_ranking_loss,
    pair_accuracy,
    pairwise_ranking_loss,
    ranked_pairs,
    ranking_loss,
    sequence_logprobs,
)

# -log sigmoid(d) for the differences below, by hand: log(1 + e^-d).
NLS = {1.0: 0.313262, 1.5: 0.201413, 3.0: 0.048587, 0.5: 0.474077, 2.0: 0.126928, -1.0: 1.313262,
       0.0: 0.693147}


def test_k4_ranking_by_hand():
    # One prompt, K = 4 responses ranked in order, rewards 2, 1, 0.5, -1: 6 pairs with
    # differences 1, 1.5, 3 (first above the rest), 0.5, 2 (second), 1.5 (third above fourth).
    # Mean of the 6 losses: (0.313262 + 0.201413 + 0.048587 + 0.474077 + 0.126928 + 0.201413) / 6
    #                     = 1.365680 / 6 = 0.227613.
    scores = torch.tensor([2.0, 1.0, 0.5, -1.0])
    loss, pairs = ranking_loss(scores, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert len(pairs) == 6 and pairs.num_prompts == 1
    assert loss.item() == pytest.approx(0.227613, abs=1e-5)


def test_prompts_count_once_and_rank_order_is_by_rank_not_position():
    # Prompt 0: the K = 4 list above, shuffled (ranks carry the order). Prompt 1: a pair whose
    # preferred response scores 0 and the other 1 (difference -1: 1.313262). Each prompt counts
    # once: (0.227613 + 1.313262) / 2 = 0.770438 (not (1.365680 + 1.313262) / 7).
    scores = torch.tensor([0.5, 2.0, 1.0, 1.0, -1.0, 0.0])
    group = torch.tensor([0, 0, 1, 0, 0, 1])
    rank = torch.tensor([2, 0, 1, 1, 3, 0])
    loss, pairs = ranking_loss(scores, group, rank)
    assert len(pairs) == 7 and pairs.num_prompts == 2
    assert pairs.weight.sum().item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(0.770438, abs=1e-5)


def test_ties_are_excluded():
    # Ranks 0, 0, 1 with rewards 1, 0, 0: pairs (0, 2) and (1, 2) only, differences 1 and 0:
    # (0.313262 + 0.693147) / 2 = 0.503204. A prompt whose responses all tie has no pair.
    scores = torch.tensor([1.0, 0.0, 0.0, 5.0, 7.0])
    loss, pairs = ranking_loss(scores, torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 2, 2]))
    assert sorted(zip(pairs.better.tolist(), pairs.worse.tolist())) == [(0, 2), (1, 2)]
    assert loss.item() == pytest.approx(0.503204, abs=1e-5)
    empty_loss, empty = ranking_loss(scores[3:].requires_grad_(), torch.tensor([1, 1]), torch.tensor([2, 2]))
    assert len(empty) == 0 and empty_loss.item() == 0.0
    empty_loss.backward()  # a batch without pairs still has a (zero) gradient path


def test_margin_and_pairwise_special_case():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # Differences 1 and -1, margin 0.5: -log s(0.5) and -log s(-1.5) = 0.474077, 1.701413.
    assert pairwise_ranking_loss(chosen, rejected, margin=0.5).item() == pytest.approx(
        (0.474077 + 1.701413) / 2, abs=1e-5)
    # The K-wise loss on K = 2 lists is the pairwise loss.
    scores = torch.stack([chosen, rejected], 1).reshape(-1)  # c0, r0, c1, r1
    group, rank = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    loss, _ = ranking_loss(scores, group, rank, margin=0.5)
    assert loss.item() == pytest.approx(pairwise_ranking_loss(chosen, rejected, margin=0.5).item(), abs=1e-6)
    # Per-response margins: pair margin = margin[better] - margin[worse] = 1.5 - 0.5 = 1.
    per = torch.tensor([1.5, 0.5, 1.5, 0.5])
    assert ranking_loss(scores, group, rank, margin=per)[0].item() == pytest.approx(
        pairwise_ranking_loss(chosen, rejected, margin=1.0).item(), abs=1e-6)


def test_label_smoothing_by_hand():
    # eps = 0.1, difference 1: 0.9 * 0.313262 + 0.1 * (-log s(-1) = 1.313262) = 0.413262.
    loss, _ = ranking_loss(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 1]),
                           label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.413262, abs=1e-5)


def test_pair_accuracy_counts_all_pairs():
    scores = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, 1.0])
    pairs = ranked_pairs(torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 3, 0, 1]))
    correct, total = pair_accuracy(scores, pairs)
    assert (int(correct), int(total)) == (6, 7)


def test_sequence_logprobs_by_hand():
    # Vocabulary of 2, logits (0, log 3): p = (1/4, 3/4). Row 0 labels (1, 0, ignore):
    # log 3/4 + log 1/4 = -0.287682 - 1.386294 = -1.673976; mean over its 2 tokens -0.836988.
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(2, 3, 2)
    labels = torch.tensor([[1, 0, -100], [-100, -100, -100]])
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx([-1.673976, 0.0], abs=1e-5)
    assert sequence_logprobs(logits, labels, average=True)[0].item() == pytest.approx(-0.836988, abs=1e-5)


def test_dpo_by_hand():
    # pi_c - ref_c = -1 - (-2) = 1, pi_r - ref_r = -3 - (-2.5) = -0.5: gap 1.5.
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    # beta 2: -log s(3) = 0.048587; beta 1: -log s(1.5) = 0.201413.
    assert dpo_loss(pc, pr, rc, rr, beta=2.0).item() == pytest.approx(0.048587, abs=1e-5)
    assert dpo_loss(pc, pr, rc, rr, beta=1.0).item() == pytest.approx(0.201413, abs=1e-5)
    # cDPO eps 0.1, beta 1: 0.9 * 0.201413 + 0.1 * (-log s(-1.5) = 1.701413) = 0.351413.
    assert dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.1).item() == pytest.approx(0.351413, abs=1e-5)
    # IPO, beta 0.25: (1.5 - 1 / 0.5)^2 = 0.25.
    assert dpo_pair_losses(pc, pr, rc, rr, beta=0.25, loss_type="ipo").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge-ish")


def test_dpo_ranking_reduces_to_pairwise():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(6, generator=g), torch.randn(6, generator=g)
    group, rank = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 0, 1, 0, 1])
    loss, _pairs, rewards = dpo_ranking_loss(pol, ref, group, rank, beta=0.5)
    c, r = torch.tensor([1, 2, 4]), torch.tensor([0, 3, 5])
    assert loss.item() == pytest.approx(dpo_loss(pol[c], pol[r], ref[c], ref[r], beta=0.5).item(), abs=1e-6)
    assert torch.allclose(rewards, 0.5 * (pol - ref))

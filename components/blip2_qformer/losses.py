"""BLIP-2 stage-1 losses (Li et al. 2023, section 3.2) on already-computed embeddings and logits.

* ITC: image-text contrastive. Each image has M query embeddings, the text one [CLS] embedding;
  the pair's similarity is the highest query-text cosine (max over queries); InfoNCE in both
  directions with a learnable temperature.
* ITM: image-text matching, a 2-way classifier on (image, text) pairs: the positives and, per
  image and per text, one hard negative drawn with probability softmax(ITC similarity) over the
  in-batch non-positives.
* ITG: image-grounded text generation, next-token cross-entropy on the text.

Several images of a batch may share a caption (augmented copies): ``positives`` (B, B) marks
every matching pair, ITC then spreads its target over them and mining never draws one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itc_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Image-to-text similarity matrix, max over queries.

    Args:
        image_embeds: (B, M, E) L2-normalised projected query outputs.
        text_embeds: (B', E) L2-normalised projected [CLS] outputs.

    Returns:
        (B, B') ``sim[i, j] = max_m <image_i,m, text_j>``.
    """
    return torch.einsum("ime,je->ijm", image_embeds, text_embeds).amax(dim=-1)


def _soft_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    target = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def itc_loss(sim: torch.Tensor, temp: torch.Tensor | float,
             positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    Args:
        sim: (B, B) image-to-text similarities (:func:`itc_similarity`).
        temp: temperature (a scalar tensor to learn it).
        positives: (B, B) bool matching pairs (None: the diagonal).

    Returns:
        Scalar loss.
    """
    pos = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device) if positives is None else positives
    if not bool(pos.diagonal().all()):
        raise ValueError("positives must include the diagonal (each image matches its own text)")
    logits = sim / temp
    return (_soft_ce(logits, pos) + _soft_ce(logits.t(), pos.t())) / 2


def mine_hard_negatives(sim: torch.Tensor, positives: torch.Tensor | None = None, *,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row, drawn with probability softmax(sim) over the non-positives.

    Args:
        sim: (B, B) image-to-text similarities divided by the temperature (no gradient needed).
        positives: (B, B) bool matching pairs (None: the diagonal).
        generator: for reproducible draws.

    Returns:
        ``(neg_text_for_image (B,), neg_image_for_text (B,))`` indices; -1 where a row has no
        non-positive (e.g. every caption of the batch is the same), which ITM then skips.
    """
    B = sim.shape[0]
    pos = torch.eye(B, dtype=torch.bool, device=sim.device) if positives is None else positives.bool()

    def draw(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        w = s.detach().float().softmax(dim=1).masked_fill(p, 0.0)  # positives: probability 0
        has_neg = (~p).any(dim=1)
        w[~has_neg] = 1.0  # placeholder row, replaced by -1 below
        idx = torch.multinomial(w, 1, generator=generator).squeeze(1)
        return torch.where(has_neg, idx, torch.full_like(idx, -1))

    return draw(sim, pos), draw(sim.t(), pos.t())


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """2-way cross-entropy of the ITM head: ``logits`` (P, 2), ``labels`` (P,) 1 = match."""
    return F.cross_entropy(logits.float(), labels.long())


def itg_loss(logits: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1 (the first token, [DEC], is only
    input); padding is ignored.

    Args:
        logits: (B, T, V) LM logits of the text positions.
        text_ids: (B, T) the input ids.
        text_mask: (B, T) True at real tokens.

    Returns:
        Scalar mean over the predicted tokens.
    """
    labels = text_ids[:, 1:].masked_fill(~text_mask[:, 1:].bool(), -100)  # (B, T-1)
    if not bool((labels != -100).any()):
        raise ValueError("ITG needs at least one text token after [DEC]")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)

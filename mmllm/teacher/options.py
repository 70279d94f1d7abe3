"""Option log-probabilities from a causal LM: how likely a reply is to begin with each option.

For a prompt ``p`` (the conversation rendered up to and including the assistant header) and an
option tokenised as ``o = (o_1, ..., o_n)``:

    log P(o | p) = sum_j log P(o_j | p, o_<j)

An option that is a proper token prefix of a longer one ("1" of "10", where the tokenizer
splits "10") must also *end* there, else its probability would include the longer option's:

    log P(o, then not a longer option) = log P(o | p) + log(1 - sum_t P(t | p, o))

over the tokens ``t`` that continue ``o`` into a longer option. The results are renormalised
over the options (:func:`mmllm.teacher.base.renormalise`).

Every distribution needed is read from a few rows ``p + o[:-1]``, one forward each; a row that
is a prefix of another is dropped (with causal attention the longer row's positions give the
same logits), so single-token options (letters, digits) cost one row per conversation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class OptionPlan:
    """The rows to run for one prompt.

    Attributes:
        prompt_len: tokens of the prompt (every row starts with it).
        rows: token rows (prompt + a longest option's tokens but its last).
        row_of: per option, the index of a row that holds ``prompt + option[:-1]``.
    """

    prompt_len: int
    rows: list[list[int]]
    row_of: list[int]


def plan_rows(prompt: Sequence[int], options: Sequence[Sequence[int]]) -> OptionPlan:
    """The fewest rows that give every distribution the options need (see the module doc)."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if any(not o for o in options) or len({tuple(o) for o in options}) != len(options):
        raise ValueError("the options must tokenise to distinct non-empty token sequences")
    needed = [list(prompt) + list(o[:-1]) for o in options]
    rows: list[list[int]] = []
    for seq in sorted(needed, key=len, reverse=True):  # longest first: shorter ones are prefixes
        if not any(r[:len(seq)] == seq for r in rows):
            rows.append(seq)
    row_of = [next(k for k, r in enumerate(rows) if r[:len(seq)] == seq) for seq in needed]
    return OptionPlan(prompt_len=len(prompt), rows=rows, row_of=row_of)


def score_options(plan: OptionPlan, options: Sequence[Sequence[int]],
                  row_logprobs: Sequence[torch.Tensor]) -> list[float]:
    """``log P(option, ending there | prompt)`` per option (not renormalised).

    Args:
        plan: from :func:`plan_rows` on the same prompt and options.
        options: the options' token ids.
        row_logprobs: per row, the (len(row) - prompt_len + 1, V) next-token log-softmax at
            positions ``prompt_len - 1 .. len(row) - 1`` (entry j predicts option token j).
    """
    out = []
    for i, o in enumerate(options):
        lp = row_logprobs[plan.row_of[i]]
        total = sum(float(lp[j, t]) for j, t in enumerate(o))
        longer = [k for k, q in enumerate(options) if len(q) > len(o) and list(q[:len(o)]) == list(o)]
        if longer:  # the reply must stop being a longer option after o
            nxt = sorted({options[k][len(o)] for k in longer})
            cont = row_logprobs[plan.row_of[longer[0]]]  # its row holds prompt + o + more
            p_more = float(torch.logsumexp(cont[len(o), nxt], 0).exp())
            total += math.log1p(-p_more) if p_more < 1.0 else -math.inf
        out.append(total)
    return out


@torch.inference_mode()
def rows_logprobs(model, plans: Sequence[OptionPlan], *, device, pad_id: int = 0) -> list[list[torch.Tensor]]:
    """Runs every row of ``plans`` in one right-padded forward; returns each plan's row logprobs.

    Right padding leaves the real positions untouched (causal attention), so no mask is needed.
    Only the positions the options read go through the LM head (``return_hidden``), not (B, T, V).

    Args:
        model: a :class:`~mmllm.models.DecoderLM` (``return_hidden``, ``lm_head``).
        plans: the conversations' plans (their rows are batched together).
        device: where the model is.
    """
    flat = [(p, r) for p in plans for r in p.rows]
    width = max(len(r) for _, r in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    for b, (_, r) in enumerate(flat):
        ids[b, :len(r)] = torch.tensor(r)
    hidden = model(ids.to(device), return_hidden=True, return_logits=False).hidden  # (B, T, C)
    out: list[list[torch.Tensor]] = [[] for _ in plans]
    index = {id(p): k for k, p in enumerate(plans)}
    for b, (p, r) in enumerate(flat):
        h = hidden[b, p.prompt_len - 1:len(r)]  # (n, C): the positions that predict option tokens
        out[index[id(p)]].append(torch.log_softmax(model.lm_head(h).float(), dim=-1).cpu())
    return out

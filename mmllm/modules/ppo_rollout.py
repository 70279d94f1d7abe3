"""PPO's rollout pieces: the sampled batch and its layout, sampling on the decode session, the
reward model (loading, scoring), the probe's score summary, gathering FSDP2 parameters for
decoding, and a rule reward.

Everything here is importable from :mod:`mmllm.modules.ppo` too (the module that uses it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmllm.generation import DecodeSession, SamplingParams, decode


class TokenFractionReward:
    """A rule reward for tests and demos: the fraction of response tokens in a set.

    Args:
        token_ids: the rewarded ids.
        strings: or strings whose tokens are rewarded (needs ``tokenizer``).
        tokenizer: a tokenizer source (``mmllm.data.prompts.load_policy_tokenizer``) or object.
        scale: multiplies the fraction.
    """

    def __init__(self, *, token_ids: Sequence[int] = (), strings: Sequence[str] = (),
                 tokenizer=None, scale: float = 1.0) -> None:
        ids = {int(t) for t in token_ids}
        if strings:
            if tokenizer is None:
                raise ValueError("TokenFractionReward(strings=...) needs a tokenizer")
            if isinstance(tokenizer, str):
                from mmllm.data.prompts import load_policy_tokenizer

                tokenizer = load_policy_tokenizer(tokenizer)
            ids |= {t for s in strings for t in tokenizer(s, add_special_tokens=False)["input_ids"]}
        if not ids:
            raise ValueError("TokenFractionReward needs at least one token id (token_ids or strings)")
        self.token_ids, self.scale = frozenset(ids), scale

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([self.scale * sum(t in self.token_ids for t in r) / max(len(r), 1)
                             for r in responses])


@dataclass
class Rollout:
    """One batch of sampled responses, laid out ``[left-padded prompt | right-padded response]``.

    Attributes:
        prompts / responses: token ids per row (the response includes its eos).
        input_ids, attention_mask: (B, P + R) the whole sequences.
        response: (B, R) response ids; mask: (B, R) 1 for response tokens.
        scores: (B,) rewards; logprobs, ref_logprobs, values: (B, R) at rollout time.
        kl, advantages, returns: (B, R) filled by :meth:`PPOModule.compute_advantages`.
    """

    prompts: list[list[int]]
    responses: list[list[int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    scores: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response.shape[1]

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of rows ``idx`` (a minibatch)."""
        names = ("input_ids", "attention_mask", "response", "mask", "logprobs", "values",
                 "advantages", "returns")
        return {n: getattr(self, n)[idx] for n in names}


def pad_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                device: torch.device) -> Rollout:
    """Lays out prompts (left padding) and responses (right padding) in one (B, P + R) batch."""
    P, R = max(map(len, prompts)), max(map(len, responses))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros(B, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P], ids[i, P:P + len(r)] = torch.tensor(p), torch.tensor(r, dtype=torch.long)
        attn[i, P - len(p):P + len(r)] = 1
    ids, attn = ids.to(device), attn.to(device)
    return Rollout(prompts, responses, ids, attn, ids[:, P:], attn[:, P:])


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside: every FSDP2 unit of ``model`` holds its full parameters and keeps them through
    forwards (no all-gather per forward, so ranks can run different numbers of forwards, as
    decoding does). Costs the full model's memory per rank while open. A no-op unsharded."""
    units = fsdp_modules(model)
    if units and units[0] is model:
        # FSDP2 makes the first unit to run forward its root; decoding calls the decoder inside
        # the root directly, so the root is settled first (a no-op once it is).
        model._get_fsdp_state()._lazy_init()
    # Whether each unit reshards after forward (FSDP2 keeps it as its post-forward mesh info).
    before = [getattr(getattr(m._get_fsdp_state(), "_fsdp_param_group", None),
                      "post_forward_mesh_info", True) is not None for m in units]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m, reshard in zip(units, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)


def response_end_ids(tokenizer) -> list[int]:
    """The ids that end a sampled response: the tokenizer's eos and ChatML's ``<|im_end|>``."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return sorted({i for i in (tokenizer.eos_token_id, end) if i is not None})


@torch.no_grad()
def sample_responses(policy: nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                     sampling: SamplingParams, eos_token_id: int | list[int] | None, pad_token_id: int,
                     generator: torch.Generator | None, progress: bool | str = False) -> list[list[int]]:
    """One response per prompt (its eos included), all rows batched on one decode session
    (``progress``: a tqdm bar over the token budget)."""
    session = DecodeSession(policy, max_rows=len(prompts), max_len=max(map(len, prompts)) + max_new_tokens + 1,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
    rows = session.add_rows(prompts, max_new_tokens=max_new_tokens, sampling=sampling)
    decode(session, rows, progress=progress)
    return [session.rows[r].tokens for r in rows]


def probe_summary(scores: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """The probe's statistics: mean, std and 10/50/90 % quantiles of the scores, mean length."""
    s = scores.float()
    q = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9], device=s.device))
    return {"probe/score_mean": s.mean().item(), "probe/score_std": s.std(unbiased=False).item(),
            "probe/score_q10": q[0].item(), "probe/score_q50": q[1].item(),
            "probe/score_q90": q[2].item(), "probe/response_len": lengths.float().mean().item()}


def load_reward(source: str | nn.Module) -> tuple[nn.Module, int | None]:
    """The frozen reward model of ``source`` and the end-of-context token it reads its score at
    (a RewardModelModule checkpoint records it; None for a module given as is)."""
    from mmllm.models import DecoderLM

    rm, end_id = source, None
    if isinstance(source, str):  # a RewardModelModule checkpoint: its scorer knows the end token
        from mmllm.modules.reward import load_reward_model

        scorer = load_reward_model(source)
        rm, end_id = scorer.model, scorer.encoder.end_id
    if isinstance(rm, DecoderLM):  # a wrong value of the reward_model option: ValueError
        raise ValueError(f"reward_model={source!r} is a plain DecoderLM (no score head): pass a "  # noqa: TRY004
                         "reward-model checkpoint (DecoderWithScalarHead)")
    return rm.eval().requires_grad_(False), end_id


@torch.no_grad()
def reward_model_scores(model: nn.Module, roll: Rollout, end_id: int | None) -> torch.Tensor:
    """(B,) fp32 reward-model scores of a rollout's responses.

    With ``end_id`` (a checkpoint's end-of-context token) they are scored as the reward model was
    trained: prompt + response + that token, read at it (the policy and the reward model share
    the SFT tokenizer); without, at the last response token of the rollout's layout.
    """
    if end_id is not None:
        from mmllm.modules.reward import score_sequences

        seqs = [[*p, *r, end_id] for p, r in zip(roll.prompts, roll.responses)]
        return score_sequences(model, seqs, batch_size=len(seqs))
    return model(roll.input_ids, attention_mask=roll.attention_mask).scores.float()

"""Checkpoint-backed sampler and scorer: the callables pair selection takes.

* :class:`PolicySampler` (``sample(prompts, n) -> list[list[str]]``): n sampled responses per
  prompt from a policy checkpoint, each prompt rendered as a user turn the way training renders
  chats (:class:`mmllm.data.chat.ChatRenderer`), decoded with :func:`mmllm.generation.generate_ids`.
* :class:`ScalarHeadScorer` (``score(prompts, responses) -> list[float]``): rewards from a
  checkpoint whose model returns per-sequence scores
  (:class:`mmllm.models.heads.DecoderWithScalarHead`, e.g. a reward model trained by
  ``mmllm train experiment=reward_model``), on the rendered prompt + response.

Both load with :func:`mmllm.checkpoint.load_model`, so any source it takes works.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mmllm.config import to_dtype


def _load(checkpoint: str, dtype: str, device: str | None):
    from mmllm.checkpoint import load_model
    from mmllm.data.chat import ChatRenderer

    model, tokenizer = load_model(checkpoint, dtype=to_dtype(dtype))
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer recorded: cannot render prompts")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, ChatRenderer(tokenizer), device


class PolicySampler:
    """Samples responses from a policy checkpoint.

    Args:
        checkpoint: the policy (any :func:`mmllm.checkpoint.load_model` source).
        max_new_tokens, temperature, top_k, top_p: sampling settings.
        batch_size: sequences decoded together.
        seed: seeds the sampling generator (the same seed gives the same samples).
        dtype, device: where the policy runs (device default: cuda if available).
    """

    def __init__(self, *, checkpoint: str, max_new_tokens: int = 128, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float | None = None, batch_size: int = 32,
                 seed: int = 0, dtype: str = "float32", device: str | None = None) -> None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0: greedy decoding gives identical samples to compare")
        self.checkpoint = str(checkpoint)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.batch_size, self.seed = batch_size, seed
        self.model, self.tokenizer, self.renderer, self.device = _load(self.checkpoint, dtype, device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], n: int) -> list[list[str]]:
        """``n`` responses per prompt (eos and special tokens stripped)."""
        from mmllm.generation import generate_ids

        tok = self.tokenizer
        ids = [self.renderer.prompt([{"role": "user", "content": p}]) for p in prompts for _ in range(n)]
        limit = getattr(self.model, "max_seq_len", None)
        if limit and any(len(x) + self.max_new_tokens > limit for x in ids):
            raise ValueError(f"a prompt + max_new_tokens={self.max_new_tokens} exceeds the policy's "
                             f"context ({limit}): shorten the prompts or max_new_tokens")
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        texts = []
        batches = range(0, len(ids), self.batch_size)
        for i in tqdm(batches, desc="sampling responses", unit="batch", disable=len(batches) < 2, leave=False):
            new = generate_ids(self.model, ids[i:i + self.batch_size], max_new_tokens=self.max_new_tokens,
                               temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               eos_token_id=tok.eos_token_id, pad_token_id=pad, generator=gen,
                               progress="sampling responses" if len(batches) < 2 else False)
            texts += [tok.decode(x, skip_special_tokens=True).strip() for x in new]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class ScalarHeadScorer:
    """Rewards from a checkpoint whose forward returns ``.scores`` (one per sequence).

    Args:
        checkpoint: the reward model (any :func:`mmllm.checkpoint.load_model` source).
        batch_size: sequences scored together.
        dtype, device: where it runs.
    """

    def __init__(self, *, checkpoint: str, batch_size: int = 16, dtype: str = "float32",
                 device: str | None = None) -> None:
        self.checkpoint, self.batch_size = str(checkpoint), batch_size
        self.model, self.tokenizer, self.renderer, self.device = _load(self.checkpoint, dtype, device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        rows = [self.renderer([{"role": "user", "content": p}, {"role": "assistant", "content": r}]).input_ids
                for p, r in zip(prompts, responses, strict=True)]
        out: list[float] = []
        batches = range(0, len(rows), self.batch_size)
        for i in tqdm(batches, desc="scoring responses", unit="batch", disable=len(batches) < 2, leave=False):
            batch = rows[i:i + self.batch_size]
            width = max(len(r) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for j, r in enumerate(batch):  # right padding; the head reads the last real token
                ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
            result = self.model(ids.to(self.device), attention_mask=mask.to(self.device))
            scores = getattr(result, "scores", None)
            if scores is None or scores.dim() != 1:
                raise TypeError(f"{self.checkpoint} is not a reward model: its forward returns no "
                                "per-sequence `scores` (expected a DecoderWithScalarHead)")
            out += scores.float().cpu().tolist()
        return out

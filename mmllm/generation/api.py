"""Batch generation on a :class:`~mmllm.generation.session.DecodeSession`: ids in / ids out, text in / text out."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mmllm.generation.progress import Progress, decode
from mmllm.generation.sampling import SamplingParams
from mmllm.generation.session import DecodeSession


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 stop_fn: Callable[[int, list[int]], bool] | None = None,
                 stop: Sequence[str] | None = None, tokenizer=None,
                 progress: Progress = False) -> list[list[int]]:
    """Generates continuations of token-id prompts (all rows in one session).

    Args:
        model: a DecoderLM (anything :class:`DecodeSession` accepts).
        prompts: token ids per prompt (non-empty).
        eos_token_id: id(s) that end a row (the eos is kept in the output).
        use_cache: decode with a KV cache (False recomputes the whole prefix each step).
        stop_fn: ``stop_fn(row, new_ids) -> bool`` to end a row early.
        stop: strings that end a row, found incrementally (needs ``tokenizer``); the tokens of
            the stop string are kept.
        progress: a tqdm bar over the token budget (True, or its name as a string); see
            :mod:`mmllm.generation.progress`.

    Returns:
        The new token ids of every prompt (prompt excluded).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    session = DecodeSession(model, max_rows=len(prompts),
                            max_len=max(len(p) for p in prompts) + max_new_tokens + 1,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            tokenizer=tokenizer, generator=generator, recompute=not use_cache)
    rows = session.add_rows(prompts, max_new_tokens=max_new_tokens, stop=stop,
                            sampling=SamplingParams(temperature, top_k, top_p))
    index = {r: i for i, r in enumerate(rows)}

    def check_stops(new: dict[int, int]) -> None:
        for r in new:
            if not session.rows[r].finished and stop_fn(index[r], session.rows[r].tokens):
                session.finish(r)

    decode(session, rows, progress=progress, on_step=check_stops if stop_fn is not None else None)
    return [session.rows[r].tokens for r in rows]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = False,
                   add_bos: bool | None = None) -> list[list[int]]:
    """Token ids of string prompts, optionally as user turns of the tokenizer's chat template."""
    if chat:
        encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                 add_generation_prompt=True) for p in prompts]
        return [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
    kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
    return [tokenizer(p, **kwargs)["input_ids"] for p in prompts]


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop: Sequence[str] | None = None, seed: int | None = None, use_cache: bool = True,
             chat: bool = False, add_bos: bool | None = None, progress: Progress = False) -> list[str]:
    """Generates text for a batch of string prompts.

    Args:
        tokenizer: an HF tokenizer (its eos ends a row; its pad id pads).
        stop: strings that end a row; the returned text is cut before the first one.
        seed: seeds sampling for reproducible outputs.
        chat: wrap each prompt as a user turn with the tokenizer's chat template.
        add_bos: prepend BOS (default: the tokenizer's own setting).
        progress: a tqdm bar over the token budget (True, or its name as a string).

    Returns:
        The generated continuation of every prompt (prompt excluded, stop strings cut).
    """
    encoded = encode_prompts(tokenizer, prompts, chat=chat, add_bos=add_bos)
    stop = [s for s in stop or [] if s]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    new = generate_ids(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=pad, use_cache=use_cache, generator=generator,
                       stop=stop or None, tokenizer=tokenizer, progress=progress)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return [_cut_at_stop(t, stop)[0] for t in texts]

"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop strings.

Prompts of different lengths are left-padded into one batch; the attention mask hides the padding
and positions count real tokens only, so each row decodes as if it were alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Picks one token per row from (B, V) logits; temperature 0 means greedy (argmax).

    Returns:
        (B,) token ids.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass *before* it already reaches top_p (the top-1 always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
            mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 stop_fn=None) -> list[list[int]]:
    """Generates continuations of token-id prompts.

    Args:
        model: a DecoderLM (anything with the same forward / ``new_kv_cache``).
        prompts: token ids per prompt (non-empty).
        eos_token_id: id(s) that end a row (the eos is kept in the output).
        use_cache: decode with a KV cache (False recomputes the whole prefix each step).
        stop_fn: ``stop_fn(row, new_ids) -> bool`` to end a row early (stop strings).

    Returns:
        The new token ids of every prompt (prompt excluded).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    device = next(model.parameters()).device
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    ids, mask = _left_pad(prompts, pad_token_id, device)
    padded = bool((mask == 0).any())
    B, width = ids.shape
    cache = model.new_kv_cache(B, width + max_new_tokens) if use_cache else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids = ids
    for _ in range(max_new_tokens):
        feed = step_ids if use_cache else ids
        logits = model(feed, attention_mask=mask if padded else None, kv_cache=cache).logits[:, -1]
        nxt = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        for row in (~done).nonzero().flatten().tolist():
            tok = int(nxt[row])
            out[row].append(tok)
            if tok in eos or (stop_fn is not None and stop_fn(row, out[row])):
                done[row] = True
        step_ids = nxt[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        if bool(done.all()):
            break
    return out


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop: Sequence[str] | None = None, seed: int | None = None, use_cache: bool = True,
             chat: bool = False, add_bos: bool | None = None) -> list[str]:
    """Generates text for a batch of string prompts.

    Args:
        tokenizer: an HF tokenizer (its eos ends a row; its pad id pads).
        stop: strings that end a row; the returned text is cut before the first one.
        seed: seeds sampling for reproducible outputs.
        chat: wrap each prompt as a user turn with the tokenizer's chat template.
        add_bos: prepend BOS (default: the tokenizer's own setting).

    Returns:
        The generated continuation of every prompt (prompt excluded, stop strings cut).
    """
    if chat:
        encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                 add_generation_prompt=True) for p in prompts]
        encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
    else:
        kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
        encoded = [tokenizer(p, **kwargs)["input_ids"] for p in prompts]
    stop = list(stop or [])
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def stop_fn(row: int, new_ids: list[int]) -> bool:
        return bool(stop) and _cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), stop)[1]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    new = generate_ids(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=pad, use_cache=use_cache, generator=generator, stop_fn=stop_fn)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    return [_cut_at_stop(t, stop)[0] for t in texts]

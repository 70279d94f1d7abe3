"""Token log-probabilities in OpenAI's response shapes (chat ``content`` entries, completions lists).

The numbers are the raw model distribution's, log_softmax of the logits before temperature /
top-k / top-p (OpenAI's and vLLM's convention), computed by the decode session
(:class:`~mmllm.generation.session.TokenLogprob`). This module only names the tokens:

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}``, the k alternatives most likely first;
* completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``,
  each ``top_logprobs`` dict holding the k alternatives and the chosen token (so up to k + 1
  entries, as OpenAI documents); with ``echo`` the prompt tokens come first, the first one's
  logprob and alternatives None (nothing predicts it).

A token's "token" is its own decoded text (a byte-level piece of a multi-byte character decodes
to U+FFFD), its "bytes" the exact bytes it stands for (byte-level BPE pieces mapped back through
the GPT-2 byte alphabet, SentencePiece ``<0xNN>`` byte tokens as that byte).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmllm.generation.logprobs import TokenLogprob

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> ``(text, bytes)`` for one tokenizer, cached (ids repeat across responses).

    Args:
        tokenizer: an HF tokenizer.
    """

    def __init__(self, tokenizer) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._unbyte = {c: b for b, c in bytes_to_unicode().items()} if byte_level else None
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            found = self._cache[token] = self._lookup(token)
        return found

    def _lookup(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        raw = None
        if token not in self._special:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            byte = _BYTE_TOKEN.fullmatch(piece or "")
            if byte:
                raw = bytes([int(byte.group(1), 16)])
            elif self._unbyte is not None and piece and all(c in self._unbyte for c in piece):
                raw = bytes(self._unbyte[c] for c in piece)
        return text, list(raw if raw is not None else text.encode())


def chat_logprobs(entries: Sequence[TokenLogprob], names: TokenText) -> dict:
    """A chat choice's ``logprobs``: one ``content`` entry per token."""
    def one(token: int, logprob: float) -> dict:
        text, raw = names(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob | None], offsets: Sequence[int],
                        names: TokenText, *, tokens: Sequence[int] | None = None) -> dict:
    """A completion choice's ``logprobs`` lists (None entries: a first prompt token, whose id is
    then taken from ``tokens``)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": list(offsets)}
    for i, e in enumerate(entries):
        if e is None:
            out["tokens"].append(names(tokens[i])[0])
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {}
        for t, lp in e.top:
            top.setdefault(names(t)[0], lp)
        top.setdefault(names(e.token)[0], e.logprob)  # the chosen token is always listed
        out["tokens"].append(names(e.token)[0])
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)
    return out


def prompt_offsets(tokenizer, ids: Sequence[int], *, skip_special: bool) -> list[int]:
    """Where each prompt token's text starts in the decoded prompt (characters)."""
    return [len(tokenizer.decode(list(ids[:i]), skip_special_tokens=skip_special,
                                 clean_up_tokenization_spaces=False)) for i in range(len(ids))]


def echo_choice(tokenizer, names: TokenText, prompt: Sequence[int], prompt_text: str | None,
                text: str, logprobs: dict | None, prompt_logprobs: list | None) -> tuple[str, dict | None]:
    """The text and ``logprobs`` of an echoed completion choice: prompt first, then completion.

    Args:
        prompt: the prompt's token ids; prompt_text: the prompt as the client sent it (None: ids).
        text / logprobs: the completion's text and its :func:`completion_logprobs` (or None).
        prompt_logprobs: the prompt's entries (None when logprobs were not asked).
    """
    skip = prompt_text is not None  # a string prompt echoes as sent: an added BOS has no text
    echoed = prompt_text if skip else tokenizer.decode(list(prompt), skip_special_tokens=False,
                                                       clean_up_tokenization_spaces=False)
    if logprobs is None or prompt_logprobs is None:
        return echoed + text, logprobs
    head = completion_logprobs(prompt_logprobs, prompt_offsets(tokenizer, prompt, skip_special=skip),
                               names, tokens=prompt)
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        head[key] += logprobs[key]
    head["text_offset"] += [len(echoed) + o for o in logprobs["text_offset"]]
    return echoed + text, head

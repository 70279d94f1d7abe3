"""The kit's special tokens, defined once.

Every stage that needs a special token (pretraining shards, chat templates, tool calls, image
placeholders) reads it from :data:`SPECIAL_TOKENS` so the tokenizer, the data and the model agree.

Groups:
    base:  ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``.
    chat:  ``<|im_start|>`` / ``<|im_end|>`` delimit a turn (ChatML); role names ("system",
           "user", "assistant", "tool") are plain text after ``<|im_start|>``.
    tool:  ``<tool_call>`` ... ``</tool_call>`` wraps a call the model emits,
           ``<tool_result>`` ... ``</tool_result>`` wraps what the tool returned.
    image: ``<image>`` is the placeholder replaced by image features, ``<im_start>`` /
           ``<im_end>`` delimit the image span (LLaVA's names).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

GROUPS = ("base", "chat", "tool", "image")


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token strings, by role. Frozen: the vocabulary depends on them."""

    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"
    unk: str = "<unk>"
    chat_start: str = "<|im_start|>"
    chat_end: str = "<|im_end|>"
    tool_call_start: str = "<tool_call>"
    tool_call_end: str = "</tool_call>"
    tool_result_start: str = "<tool_result>"
    tool_result_end: str = "</tool_result>"
    image: str = "<image>"
    image_start: str = "<im_start>"
    image_end: str = "<im_end>"

    def group(self, name: str) -> tuple[str, ...]:
        """The tokens of one group ("base", "chat", "tool" or "image"), in a fixed order."""
        members = {
            "base": (self.bos, self.eos, self.pad, self.unk),
            "chat": (self.chat_start, self.chat_end),
            "tool": (self.tool_call_start, self.tool_call_end, self.tool_result_start,
                     self.tool_result_end),
            "image": (self.image, self.image_start, self.image_end),
        }
        if name not in members:
            raise ValueError(f"unknown special-token group {name!r}; choose from {GROUPS}")
        return members[name]

    def tokens(self, groups: Iterable[str] = GROUPS) -> list[str]:
        """The tokens of ``groups`` in order, without duplicates."""
        out: list[str] = []
        for name in groups:
            out += [t for t in self.group(name) if t not in out]
        return out

    def as_dict(self) -> dict[str, str]:
        """Role -> token string."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


SPECIAL_TOKENS = SpecialTokens()


def special_token_list(groups: Iterable[str] = GROUPS,
                       tokens: SpecialTokens = SPECIAL_TOKENS) -> list[str]:
    """All special tokens of ``groups`` (default: every group), base tokens first.

    This is the list a newly trained tokenizer reserves at ids 0..n-1.
    """
    return tokens.tokens(groups)


def add_special_tokens(tokenizer, groups: Iterable[str] = ("chat", "tool", "image"), *,
                       tokens: SpecialTokens = SPECIAL_TOKENS) -> int:
    """Adds the special tokens of ``groups`` that ``tokenizer`` lacks.

    The chat/tool/image tokens become extra special tokens (never split, skippable in decode). With
    the "base" group, bos/eos/pad/unk roles that are unset are set to the kit's tokens; a role the
    tokenizer already fills (GPT-2's ``<|endoftext|>``) is kept, since changing it would change what
    the pretrained model was trained on.

    Args:
        tokenizer: a ``transformers`` tokenizer (modified in place).
        groups: which groups to add.
        tokens: the token strings.

    Returns:
        How many tokens were added to the vocabulary; the caller resizes the model's embeddings to
        ``len(tokenizer)`` (see ``DecoderLM.resize_token_embeddings``).
    """
    groups = tuple(groups)
    before = len(tokenizer)
    roles: dict[str, str] = {}
    if "base" in groups:
        for role, token in zip(("bos", "eos", "pad", "unk"), tokens.group("base")):
            if getattr(tokenizer, f"{role}_token", None) is None:
                roles[f"{role}_token"] = token
    vocab = tokenizer.get_vocab()
    present = set(tokenizer.all_special_tokens)
    extra = [t for t in tokens.tokens(g for g in groups if g != "base")
             if t not in present or t not in vocab]
    request: dict = dict(roles)
    if extra:
        request["extra_special_tokens"] = extra
    if request:
        # replace_extra_special_tokens=False: keep the tokenizer's own extra special tokens.
        tokenizer.add_special_tokens(request, replace_extra_special_tokens=False)
    return len(tokenizer) - before

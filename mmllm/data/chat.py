"""Chat rendering with loss masks computed once, turn by turn, and checked.

A conversation is a list of OpenAI-style messages ``{"role": ..., "content": ...}`` with roles
``system``, ``user``, ``assistant`` and ``tool``. :func:`render_chat` turns it into token ids, a
per-token loss mask and explicit :class:`Span` offsets, using the tokenizer's own chat template
(an imported model's HF template, e.g. SmolLM2's) or the kit's ChatML template
(:data:`CHATML_TEMPLATE`, set on every tokenizer the kit trains)::

    <|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n
                                                                   ^^^^^^^^^^^ supervised

How the mask cannot go wrong silently:

* The template is rendered for every prefix ``messages[:k+1]``; each rendering must start with the
  previous one character for character, so the text a message adds is known exactly. A template
  that rewrites history (drops earlier reasoning, renders the last turn differently, inserts
  text depending on what follows) fails this check with an error naming the turn.
* Inside the text a message adds, its content is located by rendering it once more with a
  sentinel in place of the content; a template that transforms the content is refused.
* Template text (headers, end tokens) is tokenised with special tokens parsed; content is
  tokenised as text with ``split_special_tokens=True``, so a literal ``"<|im_end|>"`` typed by a
  user never becomes a control token. Pieces are tokenised separately, so token ids never shift
  with neighbouring text and rendering(messages[:k+1]) starts with rendering(messages[:k])
  token for token, by construction.
* Supervised = the content of assistant turns plus their end token (the footer through its
  first special token, e.g. ``<|im_end|>``), never the role header. :class:`ChatRenderer`
  renders many conversations with one tokenizer (template-text ids cached). :func:`check_rendered`
  verifies it independently; :class:`SupervisionStats` counts per-source supervised fractions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmllm.data.special_tokens import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant", "tool")

# The kit's ChatML template (no bos: a conversation starts at the first <|im_start|>).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '" + SPECIAL_TOKENS.chat_start + "' + message['role'] + '\\n' + message['content'] + '"
    + SPECIAL_TOKENS.chat_end + "' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + SPECIAL_TOKENS.chat_start + "assistant\\n' -}}"
    "{%- endif -%}"
)
_SENTINEL = "\u0000MMLLM-CONTENT\u0000"


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered (bad roles/content) or rendered with a sound mask."""


class MaskError(ValueError):
    """A rendered conversation whose loss mask breaks an invariant (see :func:`check_rendered`)."""


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of one part of one message.

    Attributes:
        role: the message's role.
        message: index of the message in the conversation.
        part: "header" (template text before the content, plus any prelude such as a default
            system prompt), "content", "end" (the end-of-turn token(s) of assistant turns) or
            "footer" (template text after the content / end token).
        start, end: token offsets.
        supervised: whether the loss covers these tokens.
    """

    role: str
    message: int
    part: str
    start: int
    end: int
    supervised: bool


@dataclass
class RenderedChat:
    """Token ids, per-token loss mask and spans of one conversation."""

    input_ids: list[int]
    loss_mask: list[bool]
    spans: list[Span]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Next-token labels aligned with ``input_ids`` (the kit's convention, mmllm.losses.lm):
        ``labels[t] = input_ids[t+1]`` where token t+1 is supervised, else ``ignore_index``;
        the last position predicts nothing."""
        ids, mask = self.input_ids, self.loss_mask
        return [ids[t + 1] if mask[t + 1] else ignore_index for t in range(len(ids) - 1)] + [ignore_index]


def validate_messages(messages: Sequence[Mapping]) -> None:
    """Raises :class:`ChatFormatError` for a conversation that must not be trained on.

    Checks: a non-empty list of mappings with a known ``role`` and a string ``content``; at least
    one assistant turn to learn from; no empty assistant turn.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i} ({m['role']}): content must be a string, got "
                                  f"{type(m['content']).__name__} (content parts are not supported)")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatFormatError(f"message {i}: empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("no assistant turn: nothing to supervise")


def chat_template_of(tokenizer, chat_template: str | None = None) -> str:
    """The template used: ``chat_template`` if given, else the tokenizer's, else the kit's ChatML."""
    return chat_template or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def _apply(tokenizer, messages: Sequence[Mapping], template: str, where: int) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
    except Exception as e:  # jinja raise_exception(...) in templates that demand a turn order
        raise ChatFormatError(f"the chat template cannot render messages[:{where}]: {e}") from e


def _split_turn(tokenizer, messages: Sequence[Mapping], k: int, template: str,
                prev: str, starts: Sequence[int] = ()) -> tuple[str, str, str, str]:
    """(text of messages[:k+1], header, content, footer) of message k (checked, see module doc).

    ``starts`` are the character offsets where messages 0..k-1 begin in ``prev`` (to name the
    turn a template rewrites)."""
    text = _apply(tokenizer, messages[:k + 1], template, k + 1)
    role = messages[k]["role"]
    if not text.startswith(prev):
        diverge = next((i for i, (a, b) in enumerate(zip(text, prev)) if a != b), min(len(text), len(prev)))
        j = max([i for i, st in enumerate(starts) if st <= diverge], default=0)
        raise ChatFormatError(
            f"the chat template is not prefix-stable at message {j} ({messages[j]['role']}): "
            f"adding message {k} ({role}) changes how message {j} renders, so the template "
            "rewrites earlier turns (e.g. drops earlier reasoning or marks the last turn) and "
            "a loss mask computed from it would be wrong. Use another chat_template.")
    delta = text[len(prev):]
    probe = [*messages[:k], {**messages[k], "content": _SENTINEL}]
    probed = _apply(tokenizer, probe, template, k + 1)
    if probed.count(_SENTINEL) != 1 or not probed.startswith(prev):
        raise ChatFormatError(f"cannot locate the content of message {k} ({role}) in the "
                              "chat template's output (the template treats it specially)")
    header, footer = probed[len(prev):].split(_SENTINEL)
    content = messages[k]["content"]
    for candidate in (content, content.strip()):
        if header + candidate + footer == delta:
            return text, header, candidate, footer
    raise ChatFormatError(f"the chat template changes the content of message {k} ({role}) "
                          "beyond stripping whitespace; its loss mask cannot be located")


class ChatRenderer:
    """Renders conversations with one tokenizer and template (see the module docstring).

    Holds what every conversation shares: the template, the set of special-token ids (to find
    end tokens) and the token ids of template text seen before (headers and footers repeat), so
    a dataset costs two template renderings per message and one batched tokenizer call for the
    contents of each conversation.

    Args:
        tokenizer: a transformers tokenizer.
        chat_template: a Jinja chat template overriding the tokenizer's (default: the
            tokenizer's own, else :data:`CHATML_TEMPLATE`).
        train_on_all_assistant: supervise every assistant turn; False supervises only the last.
    """

    _CACHE_SIZE = 4096

    def __init__(self, tokenizer, *, chat_template: str | None = None,
                 train_on_all_assistant: bool = True) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template_of(tokenizer, chat_template)
        if self.template == CHATML_TEMPLATE:
            vocab = tokenizer.get_vocab()
            missing = [t for t in SPECIAL_TOKENS.group("chat") if t not in vocab]
            if missing:  # they would be tokenised as plain text: no turn boundaries to learn
                raise ChatFormatError(
                    f"the tokenizer has no chat_template and lacks the ChatML tokens {missing}: "
                    "add them with mmllm.data.add_special_tokens(tokenizer, ['chat']) (and resize "
                    "the model's embeddings), or pass a chat_template")
        self.train_on_all_assistant = train_on_all_assistant
        self._special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self._template_ids: dict[str, list[int]] = {}

    def _encode_template_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Template text, special tokens parsed (``<|im_start|>`` is one control token)."""
        missing = sorted({t for t in texts if t and t not in self._template_ids})
        if missing:
            if len(self._template_ids) > self._CACHE_SIZE:
                self._template_ids.clear()
            encoded = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self._template_ids.update(zip(missing, encoded))
        return [list(self._template_ids[t]) if t else [] for t in texts]

    def _encode_contents(self, texts: Sequence[str]) -> list[list[int]]:
        # split_special_tokens: "<|im_end|>" typed inside a message stays text.
        present = [t for t in texts if t]
        encoded = iter(self.tokenizer(present, add_special_tokens=False, split_special_tokens=True)
                       ["input_ids"] if present else [])
        return [next(encoded) if t else [] for t in texts]

    def _end_length(self, footer_ids: list[int]) -> int:
        """Tokens of an assistant footer that are supervised: through its first special token
        (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), or the whole footer when it has none."""
        for i, t in enumerate(footer_ids):
            if t in self._special:
                return i + 1
        return len(footer_ids)

    def _turns(self, messages: Sequence[Mapping]) -> tuple[list[tuple[str, str, str]], str]:
        """(header, content, footer) of every message, and the whole rendering."""
        turns, prev, starts = [], "", []  # starts: character offset of each message
        for k in range(len(messages)):
            starts.append(len(prev))
            prev, header, content, footer = _split_turn(self.tokenizer, messages, k, self.template,
                                                        prev, starts)
            turns.append((header, content, footer))
        return turns, prev

    def __call__(self, messages: Sequence[Mapping]) -> RenderedChat:
        """Token ids, loss mask and spans of a conversation.

        Args:
            messages: OpenAI-style messages. An assistant message with ``"train": False`` is
                rendered but not supervised (few-shot demonstrations in earlier turns).

        Raises:
            ChatFormatError: a malformed conversation, or a template whose mask cannot be sound.
        """
        validate_messages(messages)
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        turns, _ = self._turns(messages)
        headers = self._encode_template_texts([h for h, _, _ in turns])
        contents = self._encode_contents([c for _, c, _ in turns])
        footers = self._encode_template_texts([f for _, _, f in turns])
        ids: list[int] = []
        mask: list[bool] = []
        spans: list[Span] = []
        for k, msg in enumerate(messages):
            role = msg["role"]
            train = (role == "assistant" and msg.get("train", True) is not False
                     and (self.train_on_all_assistant or k == last_assistant))
            n_end = self._end_length(footers[k]) if role == "assistant" else 0
            parts = [("header", headers[k], False), ("content", contents[k], train),
                     ("end", footers[k][:n_end], train), ("footer", footers[k][n_end:], False)]
            for part, part_ids, supervised in parts:
                if part_ids:
                    spans.append(Span(role, k, part, len(ids), len(ids) + len(part_ids), supervised))
                    ids += part_ids
                    mask += [supervised] * len(part_ids)
        return RenderedChat(input_ids=ids, loss_mask=mask, spans=spans)

    def prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """Token ids of a generation prompt: the conversation plus the assistant header,
        tokenised exactly as training data is."""
        turns, prev = self._turns(messages)
        full = self.tokenizer.apply_chat_template(list(messages), chat_template=self.template,
                                                  tokenize=False, add_generation_prompt=True)
        if not full.startswith(prev):
            raise ChatFormatError("the chat template's generation prompt rewrites the conversation")
        headers = self._encode_template_texts([h for h, _, _ in turns] + [full[len(prev):]])
        contents = self._encode_contents([c for _, c, _ in turns])
        footers = self._encode_template_texts([f for _, _, f in turns])
        ids: list[int] = []
        for h, c, f in zip(headers, contents, footers):
            ids += h + c + f
        return ids + headers[-1]


def render_chat(messages: Sequence[Mapping], tokenizer, *, chat_template: str | None = None,
                train_on_all_assistant: bool = True) -> RenderedChat:
    """One conversation rendered by a :class:`ChatRenderer` (build one to render many)."""
    return ChatRenderer(tokenizer, chat_template=chat_template,
                        train_on_all_assistant=train_on_all_assistant)(messages)


def render_prompt(messages: Sequence[Mapping], tokenizer, *, chat_template: str | None = None) -> list[int]:
    """Token ids of a generation prompt, tokenised as :func:`render_chat` tokenises training data."""
    return ChatRenderer(tokenizer, chat_template=chat_template).prompt(messages)


def check_rendered(rendered: RenderedChat, messages: Sequence[Mapping] | None = None) -> None:
    """Verifies the loss-mask invariants of a rendering; raises :class:`MaskError`.

    * at least one supervised token;
    * every supervised token lies in an assistant span marked supervised, and only in the
      "content" or "end" part (never a role header or template footer);
    * spans tile the tokens exactly, in order;
    * with ``messages``: every supervised span belongs to an assistant message.
    """
    ids, mask = rendered.input_ids, rendered.loss_mask
    if len(ids) != len(mask):
        raise MaskError(f"{len(ids)} tokens but {len(mask)} mask entries")
    if not any(mask):
        raise MaskError("no supervised token in the conversation")
    pos = 0
    for s in rendered.spans:
        if s.start != pos or s.end <= s.start:
            raise MaskError(f"spans do not tile the tokens at {pos}: {s}")
        pos = s.end
        covered = mask[s.start:s.end]
        if s.supervised and (s.role != "assistant" or s.part not in ("content", "end")):
            raise MaskError(f"span {s} is supervised but is not assistant content")
        if messages is not None and s.supervised and messages[s.message]["role"] != "assistant":
            raise MaskError(f"supervised span {s} belongs to a {messages[s.message]['role']} message")
        if any(c != s.supervised for c in covered):
            raise MaskError(f"mask disagrees with span {s}")
    if pos != len(ids):
        raise MaskError(f"spans cover {pos} of {len(ids)} tokens")


@dataclass
class SupervisionStats:
    """Rows and tokens of one source: how much of it the loss sees, and what was skipped.

    Attributes:
        rows: rows kept.
        tokens: tokens of kept rows.
        supervised: supervised tokens of kept rows.
        skipped: reason -> rows skipped.
        examples: up to 5 "where: why" notes of skipped rows (file:line).
    """

    rows: int = 0
    tokens: int = 0
    supervised: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Supervised share of the tokens (0 when there are none)."""
        return self.supervised / self.tokens if self.tokens else 0.0

    def add(self, rendered: RenderedChat) -> None:
        self.rows += 1
        self.tokens += len(rendered)
        self.supervised += rendered.num_supervised

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {detail or reason}")

    def check_fraction(self, name: str, expected: Sequence[float] | None) -> None:
        """Raises :class:`MaskError` when the supervised fraction is outside ``[lo, hi]``."""
        if expected is None or not self.tokens:
            return
        lo, hi = expected
        if not lo <= self.fraction <= hi:
            raise MaskError(f"source {name!r}: supervised fraction {self.fraction:.3f} is outside "
                            f"the expected [{lo}, {hi}] ({self.supervised}/{self.tokens} tokens): "
                            "check the chat template and the role names of the data")

    def as_dict(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "supervised": self.supervised,
                "supervised_fraction": round(self.fraction, 4), "skipped": dict(self.skipped)}

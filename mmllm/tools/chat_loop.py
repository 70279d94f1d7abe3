"""One assistant turn with tools: generate, run the calls it makes, feed the results back, repeat.

``mmllm chat --tools`` drives :func:`run_tool_turn` with its own ``generate_fn`` (the chat's model
on the rendered conversation) and prints the events; any other front end (a notebook, a script
over a served model) can do the same. Calls are found as ``mmllm serve`` finds them
(:func:`mmllm.serve.tools.parse_calls`: a ``{"name", "arguments"}`` JSON block or the Toolformer
syntax) and only for tools of the registry; each runs through :meth:`ToolRegistry.call`, which
never raises, so a failing tool is a ``tool`` message saying why.

:class:`ModelReplier` is the ``generate_fn`` over a kit model: a text DecoderLM, or a VLM
(:func:`mmllm.serve.images.is_vlm`) given the conversation's images. Each ``<image>`` placeholder
of a user message is replaced by the image span the VLM was trained on and the prompt is
prefilled from embeddings on a :class:`~mmllm.generation.DecodeSession` (as
``VisionLanguageModel.generate`` does), so the images stay in the context for every reply of the
turn, the ones after tool results included::

    replier = ModelReplier(vlm, tok, images=[pil_image], max_new_tokens=64)
    messages = [tools_system_message(registry), user_message("What is 23 * 17?", n_images=1)]
    added = run_tool_turn(messages, replier, registry, print_event, max_calls=2)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence

import torch

from mmllm.data.special_tokens import SPECIAL_TOKENS
from mmllm.errors import UserError
from mmllm.serve.tools import ToolSpec, parse_calls, system_prompt, tool_messages
from mmllm.tools.registry import ToolRegistry

Event = dict  # {"type": "call" | "result" | "answer" | "limit", ...}
IMAGE_PLACEHOLDER = SPECIAL_TOKENS.image  # "<image>": where a user message's image goes
NEEDS_VLM_FIX = ("pass a VLM checkpoint (checkpoint=<run>/stages/chat/vlm_tools.ckpt from `mmllm pipeline`, "
                 "or a `mmllm train experiment=vlm_stage2` run), or drop the image (image= / --image)")


def registry_spec(registry: ToolRegistry) -> ToolSpec:
    """The registry's tools as a request's ``tools`` (for prompts and call parsing)."""
    return ToolSpec({s["function"]["name"]: s["function"] for s in registry.schemas()}, "auto")


def tools_system_message(registry: ToolRegistry) -> dict:
    """The system message that tells the model which tools it has and how to call them."""
    return {"role": "system", "content": system_prompt(registry_spec(registry))}


def user_message(text: str, n_images: int = 0) -> dict:
    """A user message with ``n_images`` image placeholders before its text (the LLaVA layout of
    the kit's image conversations)."""
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"the text contains {IMAGE_PLACEHOLDER!r}, the image placeholder: attach images "
                         "instead (/image PATH in `mmllm chat`, n_images here)")
    return {"role": "user", "content": "".join(IMAGE_PLACEHOLDER + "\n" for _ in range(n_images)) + text}


def run_tool_turn(messages: Sequence[dict], generate_fn: Callable[[list[dict]], str], registry: ToolRegistry,
                  on_event: Callable[[Event], None] = lambda e: None, *, max_rounds: int = 5,
                  max_calls: int | None = None) -> list[dict]:
    """Runs one assistant turn, executing tool calls as the model makes them.

    Args:
        messages: the conversation so far (ending with the user's message); not modified.
        generate_fn: ``fn(messages) -> assistant text`` (the model's next reply, e.g. a
            :class:`ModelReplier`); it gets plain ``{"role", "content"}`` messages (earlier calls
            rendered into the assistant content in the ``<tool_call>`` format), ready for
            :class:`mmllm.data.chat.ChatRenderer`.
        registry: the tools the model may call (each call: schema check, timeout, output cap;
            a failure is an ``error: ...`` result the model reads, never an exception here).
        on_event: called with ``{"type": "call", "name", "arguments"}``, ``{"type": "result",
            "name", "ok", "content", "seconds"}``, ``{"type": "answer", "content"}`` and
            ``{"type": "limit", "reason": "rounds" | "calls"}`` (every reply made calls / a
            call past ``max_calls`` was refused).
        max_rounds: model replies per turn at most (each may call tools).
        max_calls: tool calls executed per turn at most (None: no limit besides the rounds);
            later calls are answered ``error: not run: ...`` so the model can answer without them.

    Returns:
        The messages the turn added: assistant messages with ``tool_calls``, their ``tool``
        results, and the final assistant answer (absent when the round limit was hit).
    """
    if max_rounds < 1 or (max_calls is not None and max_calls < 0):
        raise ValueError(f"max_rounds={max_rounds} must be >= 1 and max_calls={max_calls} >= 0")
    spec, added, executed = registry_spec(registry), [], 0
    for _ in range(max_rounds):
        text = generate_fn(tool_messages({"messages": list(messages) + added}, None)["messages"])
        content, calls = parse_calls(text, spec)
        if not calls:
            added.append({"role": "assistant", "content": text})
            on_event({"type": "answer", "content": text})
            return added
        ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in calls]
        added.append({"role": "assistant", "content": content or None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for i, (name, args) in zip(ids, calls)]})
        for call_id, (name, args) in zip(ids, calls):
            on_event({"type": "call", "name": name, "arguments": args})
            if max_calls is not None and executed >= max_calls:
                on_event({"type": "limit", "reason": "calls"})
                refused = f"error: not run: this turn already made {executed} tool calls (the limit)"
                on_event({"type": "result", "name": name, "ok": False, "content": refused, "seconds": 0.0})
                added.append({"role": "tool", "name": name, "content": refused, "tool_call_id": call_id})
                continue
            executed += 1
            result = registry.call(name, args)
            on_event({"type": "result", "name": name, "ok": result.ok, "content": result.content,
                      "seconds": result.seconds})
            added.append(result.message(call_id))
    on_event({"type": "limit", "reason": "rounds"})
    return added


class ModelReplier:
    """``generate_fn`` of :func:`run_tool_turn` over a kit model: one decoded reply per call.

    Args:
        model: a DecoderLM, or a VLM (:func:`mmllm.serve.images.is_vlm`: its ``decoder`` decodes,
            prompts with images are prefilled from ``embed`` with the image features in place).
        tokenizer: its tokenizer (a chat template, or the kit's ChatML tokens; a VLM's holds the
            image tokens).
        images: PIL images of the conversation in placeholder order (more: :meth:`add_images`).
        chat_template: overrides the tokenizer's template.
        max_new_tokens: cap per reply.
        sampling: a :class:`~mmllm.generation.SamplingParams` (None: greedy).
        max_seq_len: prompt + reply positions (None: the model's context).
        generator: seeds sampling.
        stop_ids: ids ending a reply (None: eos and the template's end-of-turn token).

    Raises:
        UserError: images for a model that does not take them.
    """

    def __init__(self, model, tokenizer, *, images: Sequence = (), chat_template: str | None = None,
                 max_new_tokens: int = 256, sampling=None, max_seq_len: int | None = None,
                 generator: torch.Generator | None = None, stop_ids: Sequence[int] | None = None) -> None:
        from mmllm.data.chat import ChatRenderer
        from mmllm.serve.images import is_vlm

        self.model, self.tokenizer = model, tokenizer
        self.renderer = ChatRenderer(tokenizer, chat_template=chat_template)
        self.vlm = is_vlm(model)
        self.lm = model.decoder if self.vlm else model
        context = getattr(self.lm, "max_seq_len", None) or max_seq_len or 2048
        self.max_seq_len = min(max_seq_len or context, context)
        self.max_new_tokens, self.sampling, self.generator = max_new_tokens, sampling, generator
        if stop_ids is None:
            end = tokenizer.get_vocab().get(SPECIAL_TOKENS.chat_end)
            stop_ids = [t for t in (tokenizer.eos_token_id, end) if t is not None]
        self.stop_ids = list(stop_ids)
        self.images: list = []
        self._pixels: torch.Tensor | None = None  # (n, 3, H, W): self.images preprocessed, cached
        self.set_images(images)

    def add_images(self, images: Sequence) -> None:
        """Appends images (PIL) for the placeholders of the next user message(s)."""
        self.set_images([*self.images, *images])

    def set_images(self, images: Sequence) -> None:
        """Replaces the conversation's images (``[]``: a new conversation)."""
        from mmllm.serve.images import NO_IMAGES

        if images and not self.vlm:
            raise UserError(NO_IMAGES, fix=NEEDS_VLM_FIX)
        self.images = list(images)
        self._pixels = None

    def prompt(self, messages: Sequence[dict]) -> dict:
        """``DecodeSession.add_rows`` keywords: token ids, or embeddings when there are images."""
        n = sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages
                if m.get("role") == "user" and isinstance(m.get("content"), str))
        if n != len(self.images):
            raise ValueError(f"the conversation has {n} {IMAGE_PLACEHOLDER} placeholders but "
                             f"{len(self.images)} images were given")
        if not n:
            return {"prompts": [self.renderer.prompt(messages)]}
        from mmllm.serve.images import encode_prompt, image_span_ids, preprocess, prompt_embeddings

        if self._pixels is None:
            self._pixels = preprocess(self.model, self.images)  # (n, 3, H, W)
        span = image_span_ids(self.tokenizer, self.model.num_image_tokens)
        ids = encode_prompt(self.renderer, list(messages), n, span)
        return {"inputs_embeds": [prompt_embeddings(self.model, ids, self._pixels)]}  # (T, D)

    @torch.no_grad()
    def __call__(self, messages: Sequence[dict], on_text: Callable[[str], None] = lambda s: None) -> str:
        """The model's reply to ``messages`` (streamed through ``on_text`` in whole characters)."""
        from mmllm.generation import DecodeSession

        prompt = self.prompt(messages)
        length = len(next(iter(prompt.values()))[0])
        if length + 1 >= self.max_seq_len:
            raise UserError(f"the conversation has {length} tokens; max_seq_len is {self.max_seq_len}",
                            fix="start a new conversation (/reset), or raise max_seq_len")
        session = DecodeSession(self.lm, max_rows=1, max_len=min(self.max_seq_len, length + self.max_new_tokens + 1),
                                eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id or 0,
                                generator=self.generator)
        (row,) = session.add_rows(**prompt, max_new_tokens=self.max_new_tokens, sampling=self.sampling)
        shown = ""
        while session.step():
            now = self._text(session.rows[row].tokens).rstrip("\ufffd")  # whole characters only
            if len(now) > len(shown):
                on_text(now[len(shown):])
                shown = now
        final = self._text(session.rows[row].tokens)
        if len(final) > len(shown):
            on_text(final[len(shown):])
        return final.strip()

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def print_event(event: Event, print_fn: Callable[[str], None] = print) -> None:
    """The CLI's rendering of an event (``on_event=print_event``)."""
    if event["type"] == "call":
        print_fn(f"[tool call] {event['name']}({event['arguments']})")
    elif event["type"] == "result":
        print_fn(f"[tool {'result' if event['ok'] else 'error'}] {event['content']} ({event['seconds']:.2f} s)")
    elif event["type"] == "limit" and event.get("reason") == "calls":
        print_fn("[tool] call limit of this turn reached: the call is not run")
    elif event["type"] == "limit":
        print_fn("[tool] round limit reached without a final answer")

"""``mmllm chat checkpoint=<source> [image=PATH] [--tools]``: an interactive chat over any checkpoint.

``--tools`` (``use_tools=true``) gives the model the kit's tools (``tool_registry``, the
``tools`` config group: calculator and calendar by default, ``tools@tool_registry=wiki_search``
adds BM25 search); calls and their results are printed as they happen, at most
``max_tool_calls`` per turn. ``--image PATH --tools`` together: the VLM sees the image in every
reply of the turn, the ones after tool results included (e.g. the pipeline's final chat model,
``checkpoint=<run>/stages/chat/vlm_tools.ckpt``).

Each turn renders the whole conversation with the kit's chat renderer (:mod:`mmllm.data.chat`,
tokenised exactly as training data) and decodes the reply on a
:class:`~mmllm.generation.DecodeSession`, printing tokens as they come. A turn stops at eos or
the template's end-of-turn token. With a VLM checkpoint (:func:`mmllm.serve.images.is_vlm`),
``image=PATH`` (or ``--image PATH``) attaches an image to the first message and ``/image PATH``
to the next one; the prompt is prefilled from embeddings with the image features in place.

REPL commands: ``/image PATH``, ``/reset`` (forget the conversation), ``/exit`` (or end of input).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import hydra
import torch
from omegaconf import DictConfig

from mmllm.config import CONF_DIR, to_dtype
from mmllm.errors import UserError

HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


class ChatSession:
    """A conversation with a model: history, images, tools and streamed decoding.

    Replies are decoded by a :class:`mmllm.tools.chat_loop.ModelReplier` (text LM or VLM, the
    conversation's images in every prompt); with ``tools`` a turn runs through
    :func:`mmllm.tools.chat_loop.run_tool_turn`, so images and tools work together.

    Args:
        model: a DecoderLM or a VLM (see :func:`mmllm.serve.images.is_vlm`), in eval mode.
        tokenizer: its tokenizer (with a chat template, or the kit's ChatML tokens).
        system: an optional system prompt.
        max_new_tokens: cap per reply.
        temperature, top_k, top_p: sampling (temperature 0: greedy).
        max_seq_len: prompt + reply positions (the conversation must fit).
        chat_template: overrides the tokenizer's chat template.
        seed: seeds sampling.
        tools: a :class:`~mmllm.tools.registry.ToolRegistry` the model may call (None: no tools).
        on_event: shows the tool events (:func:`mmllm.tools.chat_loop.print_event`).
        max_tool_calls: tool calls executed per turn at most.
        max_rounds: model replies per turn at most when it calls tools.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_k: int | None = None, top_p: float | None = None,
                 max_seq_len: int = 2048, chat_template: str | None = None, seed: int = 0,
                 tools=None, on_event: Callable[[dict], None] | None = None, max_tool_calls: int = 4,
                 max_rounds: int = 5) -> None:
        from mmllm.generation import SamplingParams
        from mmllm.tools.chat_loop import ModelReplier

        self.model, self.tokenizer = model.eval(), tokenizer
        device = next(model.parameters()).device
        self.replier = ModelReplier(
            self.model, tokenizer, chat_template=chat_template, max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature, top_k, top_p), max_seq_len=max_seq_len,
            generator=torch.Generator(device=device).manual_seed(seed))
        self.vlm, self.stop_ids = self.replier.vlm, self.replier.stop_ids
        self.system = system
        self.tools, self.on_event = tools, on_event or (lambda event: None)
        self.max_tool_calls, self.max_rounds = max_tool_calls, max_rounds
        self.reset()

    @property
    def images(self) -> list:
        """Every image of the conversation, in placeholder order."""
        return self.replier.images

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        if self.tools is not None:  # the tools and the call format, as `mmllm serve` renders them
            from mmllm.tools.chat_loop import tools_system_message

            self.messages.insert(0, tools_system_message(self.tools))
        self.replier.set_images([])
        self.pending: list = []  # images for the next user message

    def attach_image(self, path: str) -> None:
        """Attaches an image file to the next user message (VLMs only)."""
        from mmllm.serve.images import NO_IMAGES, ImageLimits, load_image_url
        from mmllm.tools.chat_loop import NEEDS_VLM_FIX

        if not self.vlm:
            raise UserError(NO_IMAGES, fix=NEEDS_VLM_FIX)
        self.pending.append(load_image_url(str(path), ImageLimits(allow_local_files=True), where=str(path)))

    def reply(self, text: str, on_text: Callable[[str], None] = lambda s: None) -> str:
        """Adds a user message, streams the model's reply through ``on_text`` and returns it.

        With ``tools``, the turn runs through :func:`mmllm.tools.chat_loop.run_tool_turn`: each
        call the model writes is executed as it happens (``on_event`` shows the call and its
        result) and the model continues with the result (and the images) until it answers.
        """
        from mmllm.tools.chat_loop import user_message

        self.messages.append(user_message(text, len(self.pending)))
        pending, self.pending = self.pending, []
        self.replier.add_images(pending)
        try:
            if self.tools is None:
                answer = self._reply(on_text)
                self.messages.append({"role": "assistant", "content": answer})
                return answer
            added = self._tool_turn()
        except Exception:
            self.messages.pop()  # the turn did not happen
            self.replier.set_images(self.replier.images[:len(self.replier.images) - len(pending)])
            raise
        self.messages.extend(added)
        answer = added[-1]["content"] if added and added[-1]["role"] == "assistant" \
            and not added[-1].get("tool_calls") else ""
        on_text(answer)
        return answer

    def _tool_turn(self) -> list[dict]:
        from mmllm.tools.chat_loop import run_tool_turn

        history = self.messages

        def generate(messages: list[dict]) -> str:
            self.messages = messages  # the plain rendering of the turn so far
            try:
                return self._reply(lambda s: None)
            finally:
                self.messages = history

        return run_tool_turn(history, generate, self.tools, self.on_event, max_rounds=self.max_rounds,
                             max_calls=self.max_tool_calls)

    def _reply(self, on_text: Callable[[str], None]) -> str:
        """The model's reply to ``self.messages``."""
        return self.replier(self.messages, on_text)


def repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Reads user lines from ``stdin`` until ``/exit`` or end of input; streams replies to ``stdout``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    print(f"mmllm chat: {HELP}", file=stdout, flush=True)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=stdout, flush=True)
        elif line.startswith("/image"):
            try:
                session.attach_image(line[len("/image"):].strip())
                print("(image attached to your next message)", file=stdout, flush=True)
            except Exception as e:  # noqa: BLE001 - a bad path or image is reported, the chat goes on
                print(f"error: {e}", file=stdout, flush=True)
        elif line.startswith("/"):
            print(HELP, file=stdout, flush=True)
        else:
            print("assistant> ", end="", file=stdout, flush=True)
            try:
                session.reply(line, on_text=lambda s: print(s, end="", file=stdout, flush=True))
            except Exception as e:  # noqa: BLE001 - a turn that cannot run is reported, the chat goes on
                print(f"\nerror: {e}", file=stdout, flush=True)
            print(file=stdout, flush=True)


def run(cfg: DictConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> ChatSession:
    """Loads ``cfg.checkpoint`` and chats over ``stdin``/``stdout`` (default: the process's, read
    at call time so a redirected ``sys.stdin`` is the one used)."""
    from mmllm.checkpoint import load_model

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_model(cfg.checkpoint, dtype=to_dtype(cfg.dtype))
    if tokenizer is None:
        raise UserError(f"{cfg.checkpoint} records no tokenizer; a chat needs one",
                        fix="train with the kit's callbacks (they record the tokenizer) or use an HF directory")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    max_seq_len = min(cfg.max_seq_len, getattr(model, "max_seq_len", None)
                      or getattr(getattr(model, "decoder", None), "max_seq_len", cfg.max_seq_len))
    tools = on_event = None
    if cfg.use_tools:
        from hydra.utils import instantiate

        from mmllm.tools.chat_loop import print_event

        tools = instantiate(cfg.tool_registry)
        on_event = lambda event: print_event(event, lambda s: print(f"\n{s}", file=stdout, flush=True))
    session = ChatSession(model, tokenizer, system=cfg.system, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          max_seq_len=max_seq_len, chat_template=cfg.chat_template, seed=cfg.seed,
                          tools=tools, on_event=on_event, max_tool_calls=cfg.max_tool_calls)
    try:
        if cfg.image:
            session.attach_image(cfg.image)  # a text model: an error saying which checkpoint to pass
        repl(session, stdin, stdout)
    finally:
        if tools is not None:
            tools.close()
    return session


def translate_argv(argv: list[str]) -> list[str]:
    """``--image PATH`` / ``--image=PATH`` -> Hydra's ``image=PATH``; ``--tools`` -> ``use_tools=true``
    (``tools`` is a config group: ``tools=true`` would select a group option)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--tools":
            out.append("use_tools=true")
            i += 1
            continue
        if a == "--image" and i + 1 < len(argv):
            out.append(f"image={argv[i + 1]}")
            i += 2
            continue
        out.append("image=" + a[len("--image="):] if a.startswith("--image=") else a)
        i += 1
    return out


@hydra.main(config_path=CONF_DIR, config_name="chat", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    sys.argv = [sys.argv[0], *translate_argv(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()

"""The ``chat`` pipeline stage: the final chat turn, with an image and a tool call.

**The model.** The pipeline trains two fine-tunes of the same sft LM: ``vlm_stage2`` (connector +
LM on image conversations, ``vlm.pt``) and ``tools`` (the LM on tool-calling rows,
``gorilla.ckpt``). This stage builds the VLM of ``vlm_stage2`` (its vision encoder and its
stage-2 connector, kept as trained) and replaces its language model by the ``tools`` stage's:
same architecture (checked), both fine-tuned from the sft LM, so the connector's outputs land in
the embedding space the tools LM inherited. The rows of the image tokens (``<Img>``,
``<ImageFeature>``, ``</Img>``), which only stage 2 trained, keep the VLM's values; every other
decoder tensor comes from the tools LM. The result is written as a kit checkpoint
(``vlm_tools.ckpt`` + its tokenizer), so ``mmllm chat checkpoint=<run>/stages/chat/vlm_tools.ckpt
--image X --tools`` continues the conversation in the terminal.

**The turn.** One user message: a bundled scikit-image picture (saved as ``image.png`` for the
report) and a question needing arithmetic, through :func:`mmllm.tools.chat_loop.run_tool_turn`
with a :class:`~mmllm.tools.chat_loop.ModelReplier` (the image is in the prompt of every reply,
the one after the tool result included). Nothing is forced: a call the model writes is executed
by the :class:`~mmllm.tools.registry.ToolRegistry` and recorded with ``call_source: "model"``;
when the model writes none, ``call_source: "none"`` and its text is the answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mmllm.stages.base import Stage, StageContext

CONSTRUCTION = ("vlm_stage2's VLM (vision encoder + stage-2 connector kept) with its language model "
                "replaced by the tools stage's fine-tuned LM (same architecture, both fine-tuned from "
                "the sft LM); the image-token embedding rows keep stage 2's values")


def bundled_image(name: str):
    """The RGB PIL image ``skimage.data.<name>`` (one that ships with scikit-image)."""
    import skimage.data

    from mmllm.data.vlm_samples import to_rgb

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ValueError(f"image={name!r} is not a skimage.data image (e.g. coins, astronaut, coffee, chelsea)")
    try:
        return to_rgb(loader())
    except Exception as exc:  # some skimage.data images are downloaded on first use
        raise RuntimeError(f"skimage.data.{name} is not available offline ({type(exc).__name__}: {exc}); "
                           "pick a bundled one (coins, astronaut, coffee, chelsea, camera)") from exc


def swap_language_model(vlm_config: dict, vlm_state: dict, lm: torch.nn.Module,
                        keep_rows: list[int]) -> tuple[dict, dict]:
    """The VLM state dict with its ``decoder.*`` tensors taken from ``lm``.

    Args:
        vlm_config: the VLM's config (``VisionLanguageModel.config``).
        vlm_state: its state dict (not modified).
        lm: the replacing DecoderLM; its config must equal the VLM decoder's except for the
            vocabulary, which may be smaller (the image tokens were added after it).
        keep_rows: vocabulary rows (the image tokens) that keep the VLM's embedding / head values.

    Returns:
        ``(state, stats)``: the new state dict and ``{"replaced", "kept_rows", "lm_vocab"}``.
    """
    mine, theirs = dict(vlm_config["decoder"]), dict(lm.config)
    vocab_vlm, vocab_lm = mine.pop("vocab_size"), theirs.pop("vocab_size")
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ or vocab_lm > vocab_vlm:
        raise ValueError("the tools LM cannot replace the VLM's language model: " + (
            ", ".join(f"{k}: VLM {mine.get(k)!r} vs LM {theirs.get(k)!r}" for k in differ)
            or f"its vocabulary ({vocab_lm}) is larger than the VLM's ({vocab_vlm})"))
    state, replaced = dict(vlm_state), 0
    for key, value in lm.state_dict().items():
        target = vlm_state.get(f"decoder.{key}")
        if target is None:
            raise ValueError(f"the VLM's decoder has no tensor {key!r} (the LM's state dict differs)")
        if value.shape != target.shape:  # embedding / head rows: the VLM has the image tokens more
            if value.shape[1:] != target.shape[1:]:
                raise ValueError(f"{key}: LM shape {tuple(value.shape)} vs VLM {tuple(target.shape)}")
            grown = target.clone()
            grown[:value.shape[0]] = value.to(target.dtype)
            value = grown
        else:
            value = value.to(target.dtype).clone()
        if key.rpartition(".")[0].endswith(("embed_tokens", "lm_head")) and value.shape[0] == vocab_vlm:
            value[keep_rows] = target[keep_rows]  # the image tokens: trained by stage 2 only
        state[f"decoder.{key}"] = value
        replaced += 1
    return state, {"replaced": replaced, "kept_rows": list(keep_rows), "lm_vocab": vocab_lm}


def _check_vocab(lm_tok, vlm_tok) -> None:
    """The VLM's tokenizer must extend the tools LM's (same ids for every token of it)."""
    vlm_vocab = vlm_tok.get_vocab()
    bad = [t for t, i in lm_tok.get_vocab().items() if vlm_vocab.get(t) != i]
    if bad:
        raise ValueError(f"the VLM's tokenizer does not extend the tools LM's: {len(bad)} tokens differ "
                         f"(e.g. {bad[:3]}); both stages must start from the same sft LM and tokenizer")


def call_record(added: list[dict]) -> dict:
    """What the turn shows: the calls the model made (with their results) and the final answer."""
    results = {m.get("tool_call_id"): m for m in added if m["role"] == "tool"}
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"]),
              "ok": not results[c["id"]]["content"].startswith("error:"), "result": results[c["id"]]["content"]}
             for m in added if m["role"] == "assistant" for c in m.get("tool_calls") or ()]
    last = added[-1] if added else {}
    answer = (last.get("content") or "") if last.get("role") == "assistant" and not last.get("tool_calls") else ""
    first = calls[0] if calls else {}
    result = first.get("result")
    return {"call_source": "model" if calls else "none", "calls": calls, "tool": first.get("name"),
            "arguments": first.get("arguments"), "result": result, "answer": answer,
            "answer_mentions_result": bool(result) and first["ok"] and result.strip() in answer}


class FinalChatStage(Stage):
    """The final chat turn: an image and a question needing arithmetic, the model's own tool call.

    Args:
        question: the user's text (after the image).
        image: a ``skimage.data`` image name (bundled with scikit-image).
        tools: names of the tools offered (of :func:`mmllm.tools.builtin.default_registry`, the
            registry of ``mmllm chat --tools``). The prompt lists their schemas: the calculator
            alone is ~400 tokens with the pipeline's tokenizer, all five ~1000, over the tiny
            model's 1024 positions once the image is in.
        max_new_tokens: cap per model reply.
        max_tool_calls: calls executed in the turn at most.
        max_rounds: model replies in the turn at most.
        temperature: 0 decodes greedily (the recorded turn is reproducible).
        device: where the turn runs.
    """

    inputs = ("vlm_stage1", "vlm_stage2", "tools")
    optional_inputs = ("tokenize",)
    config_keys = ("seed",)

    def __init__(self, *, question: str = "What is 23 * 17?", image: str = "coins",
                 tools: Sequence[str] = ("calculator",),
                 max_new_tokens: int = 48, max_tool_calls: int = 2, max_rounds: int = 3,
                 temperature: float = 0.0, device: str = "cpu") -> None:
        if max_new_tokens < 1 or max_rounds < 1 or max_tool_calls < 0:
            raise ValueError("max_new_tokens and max_rounds must be >= 1, max_tool_calls >= 0")
        if not tools:
            raise ValueError("tools is empty: the turn needs at least one tool (e.g. [calculator])")
        self.question, self.image, self.tools = question, image, list(tools)
        self.max_new_tokens, self.max_tool_calls, self.max_rounds = max_new_tokens, max_tool_calls, max_rounds
        self.temperature, self.device = temperature, device

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        d = ctx.dir
        return {"checkpoint": d / "vlm_tools.ckpt", "tokenizer": d / "tokenizer", "image": d / "image.png",
                "transcript": d / "transcript.json"}

    def run(self, ctx: StageContext) -> None:
        from mmllm.checkpoint import load_model

        paths = self.outputs(ctx)
        paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(ctx.cfg.get("seed") or 0))
        built = self._build_checkpoint(ctx, paths)
        model, tok = load_model(paths["checkpoint"])  # the kit's loader: what `mmllm chat` loads
        image = bundled_image(self.image)
        image.save(paths["image"])
        t0 = time.perf_counter()
        transcript, turn = self._turn(model.to(self.device).eval(), tok, image)
        paths["transcript"].write_text(json.dumps(transcript, indent=2, ensure_ascii=False))
        ctx.record["chat"] = {"model": built, "image": str(paths["image"]), "image_name": self.image,
                              "question": self.question, **turn, "seconds": round(time.perf_counter() - t0, 2),
                              "checkpoint": str(paths["checkpoint"])}
        ctx.record["transcript"] = transcript
        calls = ", ".join(f"{c['name']}({c['arguments']}) = {c['result']!r}" for c in turn["calls"]) or "no call"
        print(f"chat: [image {self.image}] {self.question!r} -> {calls} -> {turn['answer']!r} "
              f"(call_source: {turn['call_source']})")

    def _build_checkpoint(self, ctx: StageContext, paths: dict[str, Path]) -> dict:
        """Writes ``vlm_tools.ckpt`` (kit format) and its tokenizer; returns what was combined."""
        from mmllm.checkpoint import load_lightning_checkpoint, load_tokenizer_from
        from mmllm.data.vlm_collate import vlm_token_ids

        vlm_file = ctx.output("vlm_stage2", "checkpoint")
        saved = torch.load(vlm_file, map_location="cpu", weights_only=False)
        if not isinstance(saved, dict) or not {"model_config", "state_dict"} <= set(saved):
            raise ValueError(f"{vlm_file} is not vlm_stage2's checkpoint ({{'model_config', 'state_dict'}})")
        lm_file = ctx.output("tools", "checkpoint")
        lm, lm_tok, _ = load_lightning_checkpoint(lm_file)
        vlm_tok = load_tokenizer_from(ctx.output("vlm_stage1", "tokenizer"))
        if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
            lm_tok = load_tokenizer_from(ctx.output("tokenize", "tokenizer"))
        if lm_tok is not None:
            _check_vocab(lm_tok, vlm_tok)
        keep = sorted(set(vlm_token_ids(vlm_tok)))
        state, stats = swap_language_model(saved["model_config"], saved["state_dict"], lm, keep)
        vlm_tok.save_pretrained(str(paths["tokenizer"]))
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                    "mmllm": {"model_class": "mmllm.models.vlm.VisionLanguageModel",
                              "model_config": saved["model_config"], "tokenizer": paths["tokenizer"].name,
                              "construction": CONSTRUCTION}}, paths["checkpoint"])
        return {"construction": CONSTRUCTION, "vlm": str(vlm_file), "lm": str(lm_file),
                "connector": str(ctx.output("vlm_stage2", "connector")), **stats}

    def _registry(self):
        """The tools of ``self.tools``, with the default registry's limits (timeout, output cap)."""
        from mmllm.tools.builtin import default_registry

        return default_registry(only=self.tools)

    def _turn(self, model, tok, image) -> tuple[list[dict], dict]:
        """Runs the user turn through the chat loop; ``(transcript, call record)``."""
        from mmllm.generation import SamplingParams
        from mmllm.tools.chat_loop import (
            ModelReplier,
            print_event,
            run_tool_turn,
            tools_system_message,
            user_message,
        )

        registry = self._registry()
        replier = ModelReplier(model, tok, images=[image], max_new_tokens=self.max_new_tokens,
                               sampling=SamplingParams(self.temperature),
                               generator=torch.Generator(device=self.device).manual_seed(0))
        messages = [tools_system_message(registry), user_message(self.question, n_images=1)]
        try:
            added = run_tool_turn(messages, replier, registry, lambda e: print_event(e, lambda s: print(f"chat: {s}")),
                                  max_rounds=self.max_rounds, max_calls=self.max_tool_calls)
        finally:
            registry.close()  # its worker threads end with the turn
        return messages + [_shown(m) for m in added], \
            {**call_record(added), "rounds": sum(m["role"] == "assistant" for m in added)}


def _shown(message: dict) -> dict:
    """An added message for the transcript: calls also written into the content, in the
    ``<tool_call>`` format the model wrote them (the report shows contents)."""
    from mmllm.serve.tools import render_call

    if not message.get("tool_calls"):
        return message
    return {**message, "content": (message["content"] or "") + "".join(render_call(c) for c in message["tool_calls"])}

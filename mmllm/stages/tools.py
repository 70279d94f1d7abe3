"""The ``tools`` pipeline stage: Gorilla API-call fine-tuning, Toolformer annotation, a tool-using chat turn.

1. **Gorilla data.** <instruction, API call> pairs for a subset of the shipped API catalog
   (:mod:`mmllm.tools.catalog`), generated through a teacher by
   :func:`mmllm.tools.gorilla.generate_pairs`. The pipeline's own tiny model is a useless
   teacher, so the default is :class:`~mmllm.tools.template_teacher.TemplateTeacher`
   (deterministic templates, offline); ``teacher=<node>`` uses a real one.
2. **Fine-tuning.** The latest LM checkpoint (the ``sft`` stage's when the pipeline has one, else
   ``pretrain``'s) is fine-tuned on the SFT rows (API document in the prompt, Gorilla's
   retriever-aware setting) through the kit's SFT path: :class:`~mmllm.data.sft.SFTDataModule`,
   :class:`~mmllm.modules.causal_lm.CausalLMModule`, a Lightning ``Trainer``. Held-out
   instructions of the same APIs are answered before and after and scored by AST sub-tree
   matching (:func:`mmllm.tools.gorilla.evaluate`): accuracy, hallucination, wrong API, parse
   failure, abstention.
3. **Toolformer share** (when :mod:`mmllm.tools.toolformer` is available and ``toolformer`` is
   set): calls sampled, executed and filtered on a few sentences; candidates, kept, share.
4. **Tool-calling chats** (``tool_chats`` of them; :mod:`mmllm.tools.tool_chats`): arithmetic and
   date questions answered by a call in the format of ``mmllm serve`` / ``mmllm chat --tools``
   (the registry's tools section as the system message, ``<tool_call>{...}</tool_call>``), the
   registry's real result as a ``tool`` message (masked from the loss: only assistant turns are
   supervised) and an answer quoting it; they join the Gorilla rows in the fine-tune. Held-out
   questions measure before and after how often the model calls by itself, with the right tool
   and the right result (``ctx.record["tool_calls"]``).
5. **A chat turn with tools** (:func:`mmllm.tools.tool_chats.chat_turn`): the model writes its
   own first reply to ``question``; a parseable call is executed by the kit's
   :class:`~mmllm.tools.registry.ToolRegistry` and the model answers after the result
   (``call_source: "model"``); no call is recorded as ``call_source: "none"`` with the text,
   never faked. ``force_call=True`` writes the call (``expression``) instead (``"forced"``). The
   transcript is ``ctx.record["transcript"]``; ``result_correct`` compares the call's result
   with ``expression``'s.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate

from mmllm.stages.base import Stage, StageContext
from mmllm.stages.trainer import CONFIG_IGNORE as STAGE_TRAINER_IGNORE
from mmllm.stages.trainer import stage_trainer

OUTCOME_KEYS = ("accuracy", "hallucination_rate", "wrong_api_rate", "parse_failure_rate", "abstention_rate")
DEFAULT_SENTENCES = ("The shop sold 120 apples on Monday and 85 on Tuesday, 205 in total.",
                     "A train that covers 300 km in 4 hours travels at 75 km per hour.",
                     "Out of 1400 voters, 35 percent, that is 490 people, voted early.")


def _subset(catalog: Sequence, n: int | None) -> list:
    """``n`` documents spread evenly over the catalog (its domains are in blocks)."""
    if n is None or n >= len(catalog):
        return list(catalog)
    if n < 1:
        raise ValueError(f"num_apis={n}: must be >= 1")
    return [catalog[i * len(catalog) // n] for i in range(n)]


def split_pairs(pairs: Sequence[dict], eval_per_api: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: the last ``eval_per_api`` pairs of every API are held out."""
    by_api: dict[int, list[dict]] = {}
    for p in pairs:
        by_api.setdefault(p["doc_index"], []).append(p)
    train, test = [], []
    for rows in by_api.values():
        k = min(eval_per_api, len(rows) - 1)  # an API keeps at least one training pair
        train += rows[:len(rows) - k]
        test += rows[len(rows) - k:] if k > 0 else []
    return train, test


class ToolUseStage(Stage):
    """Gorilla fine-tuning with AST evaluation before/after, Toolformer share, a tool-calling chat turn.

    Args:
        teacher: a :class:`~mmllm.teacher.Teacher` or its config node for pair generation;
            None: :class:`~mmllm.tools.template_teacher.TemplateTeacher` (offline demo data).
        catalog: an API catalog JSONL (None: the shipped one).
        num_apis: catalog documents used (spread over the catalog; None: all).
        per_api: instructions generated per API.
        eval_per_api: of those, held out per API for the before/after evaluation.
        retrieval: the API document in the prompt: "oracle" (the reference doc), "bm25"
            (retrieved) or None (no document).
        steps, batch_size, lr, seq_len: fine-tuning settings (AdamW, constant LR, packed rows).
        accelerator: the Lightning accelerator of the fine-tune (None: the pipeline's ``stage_trainer``).
        max_new_tokens: answer length at evaluation (the call comes in the first ~40 tokens).
        toolformer: the Toolformer annotation (``sentences`` plus
            :class:`~mmllm.tools.toolformer.ToolformerAnnotator` options); None skips it.
        tool_chats: tool-calling conversations added to the fine-tune (0: none).
        tool_eval: held-out tool questions scored before/after (0: skip).
        calendar_share: share of date questions among them (the rest is arithmetic).
        question, expression: the final chat turn's user question and the calculator expression
            that answers it (the reference the model's call is scored against; what
            ``force_call`` writes).
        force_call: write the calculator call as the first reply instead of letting the model.
        tools: the tools offered in the training chats and the chat turn (None: calculator and
            calendar); the calculator must be one. The pipeline's ``chat`` stage offers the same.
        answer_tokens: length of the model's answer after the tool result.
    """

    inputs = ("pretrain",)
    optional_inputs = ("tokenize", "sft")
    config_keys = ("seed", "stage_trainer")
    config_ignore = STAGE_TRAINER_IGNORE

    def __init__(self, *, teacher: Any = None, catalog: str | None = None, num_apis: int | None = 12,
                 per_api: int = 4, eval_per_api: int = 1, retrieval: str | None = "oracle",
                 steps: int = 30, batch_size: int = 2, lr: float = 2e-3, seq_len: int = 1024,
                 accelerator: str | None = None, max_new_tokens: int = 48,
                 toolformer: Mapping | None = None, question: str = "What is 23 * 17?",
                 expression: str = "23 * 17", answer_tokens: int = 24, tool_chats: int = 240,
                 tool_eval: int = 16, calendar_share: float = 0.3, force_call: bool = False,
                 tools: Sequence[str] | None = None) -> None:
        if retrieval not in (None, "oracle", "bm25"):
            raise ValueError(f"retrieval must be None, 'oracle' or 'bm25', got {retrieval!r}")
        if per_api < 2 or eval_per_api < 1:
            raise ValueError(f"per_api={per_api}, eval_per_api={eval_per_api}: need per_api >= 2 "
                             "(train and test instructions per API) and eval_per_api >= 1")
        if steps < 1 or tool_chats < 0 or tool_eval < 0 or not 0.0 <= calendar_share <= 1.0:
            raise ValueError(f"steps={steps}, tool_chats={tool_chats}, tool_eval={tool_eval}, calendar_share="
                             f"{calendar_share}: need steps >= 1, counts >= 0, 0 <= calendar_share <= 1")
        self.teacher = dict(teacher) if isinstance(teacher, Mapping) else teacher
        self.catalog, self.num_apis, self.per_api, self.eval_per_api = catalog, num_apis, per_api, eval_per_api
        self.retrieval, self.steps, self.batch_size, self.lr = retrieval, steps, batch_size, lr
        self.seq_len, self.accelerator, self.max_new_tokens = seq_len, accelerator, max_new_tokens
        self.toolformer = dict(toolformer) if toolformer is not None else None
        self.question, self.expression, self.answer_tokens = question, expression, answer_tokens
        self.tool_chats, self.tool_eval, self.calendar_share = tool_chats, tool_eval, calendar_share
        self.force_call = force_call
        self.tools = list(tools) if tools is not None else None

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        d = ctx.dir
        return {"pairs": d / "pairs.jsonl", "sft": d / "sft.jsonl", "answers": d / "answers.jsonl",
                "checkpoint": d / "gorilla.ckpt", "transcript": d / "transcript.json",
                "tool_chats": d / "tool_chats.jsonl"}

    def clean(self, ctx: StageContext) -> None:
        """Also drops the fine-tune's data cache: a rerun with other rows (options, tool chats)
        must not meet a tokenizer/rendering cache stamped for the old ones."""
        import shutil

        super().clean(ctx)
        shutil.rmtree(ctx.dir / "sft_cache", ignore_errors=True)

    # ------------------------------------------------------------------------------ the run
    def run(self, ctx: StageContext) -> None:
        from mmllm.tools.catalog import load_catalog
        from mmllm.tools.gorilla import to_chats, write_jsonl

        paths = self.outputs(ctx)
        model, tok, tok_dir, source = self._load_lm(ctx)
        full = load_catalog(self.catalog)
        catalog = _subset(full, self.num_apis)
        pairs, gen = self._pairs(catalog, seed=int(ctx.cfg.get("seed") or 0))
        train, test = split_pairs(pairs, self.eval_per_api)
        if not test:
            raise RuntimeError(f"no held-out pairs: the teacher gave {len(pairs)} pairs ({gen}); need >= 2 per API")
        write_jsonl(pairs, paths["pairs"])
        write_jsonl(to_chats(train, catalog, retrieval=self.retrieval), paths["sft"])
        registry, seed = _registry(self.tools), int(ctx.cfg.get("seed") or 0)
        held_out = self._tool_data(registry, seed, paths["tool_chats"])
        before, answers_before = self._evaluate(model, tok, test, catalog, full)
        calls_before = self._score_calls(model, tok, registry, held_out)
        finetune = self._finetune(ctx, model, tok_dir, paths)
        after, answers_after = self._evaluate(model, tok, test, catalog, full)
        if held_out:
            ctx.record["tool_calls"] = {"train_chats": self.tool_chats, "before": calls_before,
                                        "after": self._score_calls(model, tok, registry, held_out)}
            print(f"tool calls on {len(held_out)} held-out questions: called {calls_before['called']:.2f} -> "
                  f"{ctx.record['tool_calls']['after']['called']:.2f}, right result {calls_before['right_result']:.2f}"
                  f" -> {ctx.record['tool_calls']['after']['right_result']:.2f}")
        write_jsonl([{"instruction": p["instruction"], "reference": p["api_call"], "before": a, "after": b}
                     for p, a, b in zip(test, answers_before, answers_after)], paths["answers"])
        ctx.record["gorilla"] = {"model": source, "teacher": gen.pop("teacher"), "apis": len(catalog),
                                 "pairs": len(pairs), "train_pairs": len(train), "test_pairs": len(test),
                                 "generation": gen, "retrieval": self.retrieval, "finetune": finetune,
                                 "before": before, "after": after}
        print(f"gorilla ({len(test)} held-out instructions, AST match): accuracy "
              f"{before['accuracy']:.2f} -> {after['accuracy']:.2f}; outcomes before {_counts(before)}, "
              f"after {_counts(after)}")
        if self.toolformer is not None:
            ctx.record["toolformer"] = self._toolformer(model, tok_dir)
        ctx.record["transcript"], ctx.record["tool_turn"] = self._tool_turn(model, tok, registry)
        registry.close()
        paths["transcript"].write_text(json.dumps(ctx.record["transcript"], indent=2, ensure_ascii=False))

    def _load_lm(self, ctx: StageContext):
        """``(model, tokenizer, tokenizer_dir, source)`` of the sft checkpoint if any, else pretrain's."""
        from transformers import AutoTokenizer

        from mmllm.checkpoint import (
            checkpoint_tokenizer_dir,
            load_lightning_checkpoint,
            resolve_ckpt,
        )

        source = "sft" if ctx.has("sft") and "checkpoint" in ctx.markers["sft"].outputs else "pretrain"
        ckpt = ctx.output(source, "checkpoint")
        model, _, meta = load_lightning_checkpoint(ckpt)
        if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
            tok_dir = ctx.output("tokenize", "tokenizer")
        else:
            tok_dir = checkpoint_tokenizer_dir(resolve_ckpt(ckpt), meta)
        if tok_dir is None:
            raise FileNotFoundError(f"no tokenizer for {ckpt} (none recorded in it, no tokenize stage)")
        return model, AutoTokenizer.from_pretrained(str(tok_dir)), Path(tok_dir), f"{source} ({ckpt})"

    def _pairs(self, catalog: list, *, seed: int) -> tuple[list[dict], dict]:
        from mmllm.tools.gorilla import GenerationStats, generate_pairs
        from mmllm.tools.template_teacher import TemplateTeacher

        built = isinstance(self.teacher, Mapping)
        teacher = instantiate(self.teacher) if built else (self.teacher or TemplateTeacher())
        stats = GenerationStats()
        try:
            pairs = generate_pairs(teacher, catalog, per_api=self.per_api, seed=seed, stats=stats)
        finally:
            if built or self.teacher is None:
                teacher.close()
        return pairs, {**dict(stats), "teacher": f"{type(teacher).__name__}({teacher.model})"}

    # ------------------------------------------------------------------- gorilla: eval, train
    def _evaluate(self, model, tok, test: list[dict], catalog: list, full: list) -> tuple[dict, list[str]]:
        """AST-match greedy answers to the held-out prompts (every catalog API counts for wrong_api)."""
        import torch

        from mmllm.data.chat import ChatRenderer
        from mmllm.data.special_tokens import SPECIAL_TOKENS
        from mmllm.generation import generate_ids
        from mmllm.tools.gorilla import eval_prompts, evaluate

        renderer = ChatRenderer(tok)
        prompts = [renderer.prompt(m) for m in eval_prompts(test, catalog, retrieval=self.retrieval)]
        eos = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids(SPECIAL_TOKENS.chat_end)) if i is not None]
        model.eval()
        with torch.no_grad():
            new = generate_ids(model, prompts, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id or 0, stop=["<<<api_provider>>>"], tokenizer=tok,
                               progress="gorilla eval")
        answers = [tok.decode(ids, skip_special_tokens=True) for ids in new]
        report = evaluate(answers, test, full).as_dict()
        return report, answers

    def _finetune(self, ctx: StageContext, model, tok_dir: Path, paths: dict[str, Path]) -> dict:
        """A few dozen SFT steps on the Gorilla rows; saves ``gorilla.ckpt`` (weights + metadata)."""
        import torch

        from mmllm.data.sft import SFTDataModule
        from mmllm.modules.causal_lm import CausalLMModule

        seed = int(ctx.cfg.get("seed") or 0)
        L.seed_everything(seed, workers=True, verbose=False)
        sources = [{"name": "gorilla", "path": str(paths["sft"])}]
        if self.tool_chats:
            sources.append({"name": "tool_calls", "path": str(paths["tool_chats"])})
        dm = SFTDataModule(sources=sources,
                           cache_dir=str(ctx.dir / "sft_cache"), tokenizer=str(tok_dir),
                           seq_len=min(self.seq_len, model.max_seq_len), batch_size=self.batch_size, seed=seed)
        module = CausalLMModule(model=model.train(), optimizer=functools.partial(
            torch.optim.AdamW, lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0))
        losses = _LossLog()
        device = {"accelerator": self.accelerator} if self.accelerator else {}
        # No gradient clipping: the stage was tuned without it.
        trainer = stage_trainer(ctx, max_steps=self.steps, callbacks=[losses], limit_val_batches=0,
                                gradient_clip_val=None, **device)
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(paths["checkpoint"], weights_only=True)
        model.cpu().eval()
        head, tail = losses.values[:5], losses.values[-5:]
        sup, calls = dm.stats.get("gorilla"), dm.stats.get("tool_calls")
        return {"steps": trainer.global_step, "tokens": module.tokens_seen,
                "tool_call_rows": calls.rows if calls else 0,
                "tool_call_supervised_fraction": round(calls.fraction, 4) if calls else None,
                "loss_first5": round(sum(head) / max(len(head), 1), 4),
                "loss_last5": round(sum(tail) / max(len(tail), 1), 4),
                "rows": sup.rows if sup else None,
                "supervised_fraction": round(sup.fraction, 4) if sup else None, "checkpoint": str(paths["checkpoint"])}

    # -------------------------------------------------------------------- toolformer, chat
    def _toolformer(self, model, tok_dir: Path) -> dict:
        """Toolformer annotation of a few sentences on a copy of the model (its vocab grows)."""
        try:
            from mmllm.tools.toolformer import ToolformerAnnotator, add_toolformer_tokens
        except ImportError as exc:
            return {"available": False, "reason": f"mmllm.tools.toolformer not importable: {exc}"}
        from transformers import AutoTokenizer

        from mmllm.tools import ToolRegistry, calculator_tool

        options = dict(self.toolformer)
        sentences = list(options.pop("sentences", None) or DEFAULT_SENTENCES)
        tok, lm = AutoTokenizer.from_pretrained(str(tok_dir)), copy.deepcopy(model).eval()
        add_toolformer_tokens(tok, lm)
        annotator = ToolformerAnnotator(model=lm, tokenizer=tok, registry=ToolRegistry(tools=[calculator_tool()]),
                                        **options)
        rows = list(annotator.annotate_many(sentences))
        s = annotator.stats.as_dict()
        print(f"toolformer: {s['candidates']} candidate positions, {s['sampled']} calls sampled, "
              f"{s['executed']} executed, {s['kept']} kept (share {s['share_kept']:.2f})")
        return {"available": True, **s, "sentences": len(sentences),
                "kept_calls": [c for r in rows for c in r["calls"]]}

    def _tool_data(self, registry, seed: int, path: Path) -> list[list[dict]]:
        """Writes the tool-calling SFT rows; returns held-out conversations (other questions)."""
        from mmllm.tools.gorilla import write_jsonl
        from mmllm.tools.tool_chats import plain_chat, tool_call_chats

        chats = tool_call_chats(self.tool_chats + self.tool_eval, registry, seed=seed,
                                calendar_share=self.calendar_share, exclude=[self.question])
        train, held_out = chats[:self.tool_chats], chats[self.tool_chats:]
        write_jsonl([{"messages": plain_chat(c)} for c in train], path)
        return held_out

    def _score_calls(self, model, tok, registry, held_out: list) -> dict | None:
        from mmllm.tools.tool_chats import first_call_scores

        return first_call_scores(model, tok, registry, held_out, max_new_tokens=self.max_new_tokens) \
            if held_out else None

    def _tool_turn(self, model, tok, registry) -> tuple[list[dict], dict]:
        """The final chat turn: the model's own call (or a forced one), executed, and its answer."""
        from mmllm.tools.tool_chats import chat_turn, lm_generate_fn

        forced = {"name": "calculator", "arguments": {"expression": self.expression}} if self.force_call else None
        generate = lm_generate_fn(model, tok, max_new_tokens=self.max_new_tokens, answer_tokens=self.answer_tokens)
        transcript, rec = chat_turn(generate, registry, self.question, force_call=forced)
        expected = registry.call("calculator", {"expression": self.expression})
        rec["expected_result"] = expected.content if expected.ok else None
        rec["result_correct"] = bool(rec["ok"]) and rec["result"] == rec["expected_result"]
        shown = f"{rec['tool']}({json.dumps(rec['arguments'])}) = {rec['result']!r}" if rec["tool"] \
            else f"no call: {rec['text']!r}"
        print(f"tool turn ({rec['call_source']}): {self.question!r} -> {shown} -> {rec['answer']!r}")
        return transcript, rec


def _registry(only: Sequence[str] | None = None):
    """The tools of the chat turn and of the training chats: calculator and calendar (as ``mmllm
    chat``), or just ``only`` (the ``chat`` stage must offer the same ones: same system prompt)."""
    from mmllm.tools.builtin import default_registry

    return default_registry(only=only)


class _LossLog(L.Callback):
    """Keeps the training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self.values.append(float(loss))


def _counts(report: dict) -> dict:
    return {k: report[k] for k in ("correct", "wrong_api", "hallucination", "parse_failure", "abstention")}

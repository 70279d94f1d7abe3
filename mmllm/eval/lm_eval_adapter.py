"""lm-eval-harness adapter: any lm-eval task on an mmllm model.

``MMLLMEvalLM`` is a ``TemplateLM`` (lm-eval tokenises ``(context, continuation)`` pairs through
:meth:`tok_encode` and hands us token requests) backed by :class:`ModelRunner`, so scoring uses the
same batched, prefix-reusing engine as our own evaluator. Registered as ``"mmllm"``::

    import lm_eval, mmllm.eval
    lm_eval.simple_evaluate(model="mmllm", model_args={"checkpoint": "runs/x/last.ckpt"},
                            tasks=["hellaswag"])
    # or with a model in memory:
    lm_eval.simple_evaluate(model=MMLLMEvalLM(model=model, tokenizer=tok), tasks=[...])
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from mmllm.eval.runner import ModelRunner


@register_model("mmllm")
class MMLLMEvalLM(TemplateLM):
    """An lm-eval LM wrapping an mmllm DecoderLM and its tokenizer.

    Args:
        model: a DecoderLM (or None with ``checkpoint``).
        tokenizer: its HF tokenizer (or None with ``checkpoint``).
        checkpoint: a Lightning .ckpt, run dir, HF directory, .gguf or ``"smollm2"``
            (loaded with :func:`mmllm.checkpoint.load_model`).
        batch_size: rows per forward (lm-eval passes strings from the command line; "auto" -> 16).
        max_length: context length (default: the model's).
        max_gen_toks: default generation budget.
        device: move the model there (default: where it is).
        reuse_prefix: compute shared contexts once (KV-cache reuse).
    """

    def __init__(self, model=None, tokenizer=None, *, checkpoint: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, reuse_prefix: bool = True, **_unused) -> None:
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("MMLLMEvalLM needs a model and tokenizer, or a checkpoint")
            from mmllm.checkpoint import load_model

            model, tokenizer = load_model(checkpoint)
        if tokenizer is None:
            raise ValueError("MMLLMEvalLM needs the model's tokenizer")
        if device is not None:
            model = model.to(device)
        self._model, self.tokenizer = model, tokenizer
        self._max_gen_toks = int(max_gen_toks)
        # lm-eval's "auto" batch-size search is not implemented: it falls back to 16.
        batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.runner = ModelRunner(model, tokenizer, batch_size=batch_size,
                                  max_length=None if max_length is None else int(max_length),
                                  reuse_prefix=str(reuse_prefix).lower() not in ("false", "0"))

    # ----------------------------------------------------------------- TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        return self.runner.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.runner.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._model.embed_tokens.weight.device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "mmllm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.runner.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------- the requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: ``((context, continuation), context_ids, continuation_ids)``."""
        results = self.runner.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Rolling log-likelihood with lm-eval's disjoint windows (stride = max_length)."""
        strings = [req.args[0] for req in requests]
        lls = self.runner.loglikelihood_rolling(strings)
        for s, ll in zip(strings, lls):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), ll)
        return lls

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generates until a stop string (``until`` + EOS); requests grouped by their gen kwargs."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm, leave=False):
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            gens = self.runner.generate([requests[i].args[0] for i in idx], max_new_tokens=max_new,
                                        stop=until, temperature=temperature, top_p=kw.pop("top_p", None))
            for i, g in zip(idx, gens):
                for term in until:  # lm-eval's postprocess_generated_text
                    if term:
                        g = g.split(term)[0]
                out[i] = g
                self.cache_hook.add_partial("generate_until", requests[i].args, g)
        return out

"""ModelRunner: strings in, scores and generations out, for an mmllm model and its tokenizer.

The text-to-token rules are lm-eval's (``TemplateLM``), so our evaluator and the lm-eval adapter
send the very same token requests:

* ``(context, continuation)`` is encoded as ``enc(context + continuation)`` split after
  ``len(enc(context))`` tokens, with trailing spaces of the context moved to the continuation
  (word-boundary tokenisation);
* an empty context is replaced by the prefix token (BOS, else EOS);
* rolling log-likelihoods (perplexity) condition on the prefix token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mmllm.eval.perplexity import rolling_windows
from mmllm.eval.scoring import score_requests


class ModelRunner:
    """Batched log-likelihood, rolling log-likelihood and generation for one model.

    Args:
        model: a DecoderLM (put in eval mode while the runner works).
        tokenizer: its HF tokenizer.
        batch_size: rows per forward.
        max_length: context length (default: ``model.max_seq_len``).
        reuse_prefix: compute shared contexts / few-shot prefixes once (KV-cache reuse).
        add_special_tokens: passed to ``tokenizer.encode`` (None: the tokenizer's default, as lm-eval).
        progress: show tqdm bars.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 reuse_prefix: bool = True, add_special_tokens: bool | None = None,
                 progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.reuse_prefix, self.progress = batch_size, reuse_prefix, progress
        self.max_length = int(max_length or getattr(model, "max_seq_len", 2048))
        self.add_special_tokens = add_special_tokens

    # ------------------------------------------------------------------------- tokenisation
    @property
    def eot_token_id(self) -> int:
        """End-of-text id (the tokenizer's EOS)."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions empty contexts and rolling windows: BOS if the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text`` (special tokens as lm-eval's HFLM adds them)."""
        flag = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_token
        if flag is None and bos and text.startswith(bos):
            flag = False  # the text already carries its BOS
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        return list(self.tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)`` with lm-eval's rules (see the module docstring)."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per ``(context, continuation)``."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             *, reuse_prefix: bool | None = None) -> list[tuple[float, bool]]:
        """Like :meth:`loglikelihood` on token ids (empty continuations score 0.0, greedy)."""
        reuse = self.reuse_prefix if reuse_prefix is None else reuse_prefix
        todo = [i for i, (_, cont) in enumerate(requests) if len(cont)]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        with self._eval_mode():
            scored = score_requests(self.model, [requests[i] for i in todo], max_length=self.max_length,
                                    batch_size=self.batch_size, reuse_prefix=reuse,
                                    progress=self.progress)
        for i, r in zip(todo, scored):
            out[i] = r
        return out

    def loglikelihood_rolling(self, texts: Sequence[str], *, stride: int | None = None,
                              return_counts: bool = False):
        """Total log-likelihood of each text (perplexity), with sliding windows when long.

        Args:
            texts: documents.
            stride: tokens predicted per window after the first (None: ``max_length``, lm-eval's
                disjoint windows).
            return_counts: also return the number of tokens of each text.

        Returns:
            Per text log-likelihood (nats); with ``return_counts`` a pair (lls, token counts).
        """
        windows, owner, counts = [], [], []
        for i, text in enumerate(texts):
            tokens = self.encode(text)
            counts.append(len(tokens))
            for w in rolling_windows(tokens, prefix_token=self.prefix_token_id,
                                     max_length=self.max_length, stride=stride):
                windows.append(w)
                owner.append(i)
        scores = self.loglikelihood_tokens(windows, reuse_prefix=False)
        lls = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, scores):
            lls[i] += ll
        return (lls, counts) if return_counts else lls

    # --------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 256,
                 stop: Sequence[str] | None = None, temperature: float = 0.0,
                 top_p: float | None = None, seed: int | None = None) -> list[str]:
        """Continuations of ``prompts`` (cut before the first stop string), batched by length.

        Prompts longer than ``max_length - max_new_tokens`` tokens keep their last tokens.
        """
        from mmllm.generation import generate

        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be < max_length ({self.max_length})")
        budget = self.max_length - max_new_tokens
        prompts = [self._left_truncate(p, budget) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        with self._eval_mode():
            starts = range(0, len(order), self.batch_size)
            one = self.progress and len(starts) == 1  # one batch: a bar over its tokens instead
            for s in tqdm(starts, desc="generating", unit="batch", leave=False,
                          disable=not self.progress or len(starts) < 2):
                idx = order[s:s + self.batch_size]
                texts = generate(self.model, self.tokenizer, [prompts[i] for i in idx],
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 stop=list(stop or []), seed=None if seed is None else seed + s,
                                 progress=one)
                for i, t in zip(idx, texts):
                    out[i] = t
        return out

    def _left_truncate(self, prompt: str, budget: int) -> str:
        ids = self.encode(prompt)
        if len(ids) <= budget:
            return prompt
        return self.tokenizer.decode(ids[-budget:], skip_special_tokens=True)

    def _eval_mode(self):
        return _EvalMode(self.model)


class _EvalMode:
    """Context manager: eval mode and no autograd, restoring the model's training flag after."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.grad = torch.inference_mode()
        self.grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.grad.__exit__(*exc)
        self.model.train(self.was_training)

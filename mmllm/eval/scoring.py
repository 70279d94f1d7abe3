"""Batched log-likelihood of continuation tokens given context tokens, with KV-cache prefix reuse.

A request is ``(context_ids, continuation_ids)``; its score is ``sum log p(cont_i | ctx, cont_<i)``
plus whether greedy decoding would have produced the continuation (lm-eval's ``is_greedy``).

Two paths give the same numbers (up to float rounding):

* plain (lm-eval's ``_loglikelihood_tokens``): each request is one right-padded row
  ``(ctx + cont)[:-1]``, left-truncated to ``max_length``; rows are sorted longest first.
* prefix reuse: requests are grouped by context (the choices of one question share it), groups
  are sorted longest first and packed into batches by token budget; in a batch the longest common
  token prefix of all contexts (the few-shot demonstrations) is computed once with batch size 1,
  its KV cache is expanded to one row per context, the rest of every context is computed once,
  and the cache is expanded again to one row per continuation. Three forwards, no duplicated
  context compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

TokenRequest = tuple[Sequence[int], Sequence[int]]


def _logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """(..., C) final hidden states -> (..., V) float32 log-probabilities."""
    return model.lm_head(hidden).float().log_softmax(-1)


def _right_pad(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids and (B, T) mask, right-padded with ``pad``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _score_rows(logp: torch.Tensor, targets: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
    """Sums log-probs of each row's targets: ``logp`` (B, >= n, V) holds the predictions of them.

    Vectorised (one device sync for the whole batch).
    """
    tgt, mask = _right_pad(targets)  # (B, n)
    tgt, mask = tgt.to(logp.device), mask.to(logp.device).bool()
    logp = logp[:, :tgt.shape[1]]
    picked = logp.gather(-1, tgt[..., None]).squeeze(-1)  # (B, n)
    ll = torch.where(mask, picked, torch.zeros_like(picked)).sum(1)
    greedy = ((logp.argmax(-1) == tgt) | ~mask).all(1)
    return list(zip(ll.tolist(), greedy.tolist()))


@torch.inference_mode()
def score_plain(model, requests: Sequence[TokenRequest], *, max_length: int) -> list[tuple[float, bool]]:
    """Scores one batch of requests as independent right-padded rows (lm-eval's layout).

    Args:
        model: a DecoderLM (``lm_head`` and ``return_hidden`` are used).
        requests: ``(context_ids, continuation_ids)`` pairs, context non-empty.
        max_length: longest input; longer ``ctx + cont`` are truncated from the left.

    Returns:
        ``(log-likelihood, is_greedy)`` per request.
    """
    device = model.embed_tokens.weight.device
    inputs, starts = [], []
    for ctx, cont in requests:
        inp = (list(ctx) + list(cont))[-(max_length + 1):][:-1]
        inputs.append(inp)
        starts.append(len(inp) - len(cont))
    ids, _ = _right_pad(inputs)
    # Right padding needs no mask: causal attention never lets a real token see a later pad.
    hidden = model(ids.to(device), return_hidden=True, return_logits=False).hidden  # (B, T, C)
    # Only the continuation positions go through the LM head: (B, n) indices into T.
    n = max(len(cont) for _, cont in requests)
    pos = torch.tensor(starts)[:, None] + torch.arange(n)[None, :]
    pos = pos.clamp(max=ids.shape[1] - 1).to(device)
    rows = torch.arange(len(requests), device=device)[:, None]
    logp = _logprobs(model, hidden[rows, pos])  # (B, n, V)
    return _score_rows(logp, [cont for _, cont in requests])


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all contexts, leaving each at least one token."""
    n = min(len(c) for c in contexts) - 1
    first = contexts[0]
    for c in contexts[1:]:
        m = 0
        while m < n and c[m] == first[m]:
            m += 1
        n = m
    return max(n, 0)


@torch.inference_mode()
def score_shared(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
                 ) -> list[list[tuple[float, bool]]]:
    """Scores groups of continuations that share a context, computing every context once.

    Args:
        model: a DecoderLM with ``new_kv_cache``.
        groups: ``(context_ids, [continuation_ids, ...])``; every ``ctx + cont[:-1]`` must fit the
            model (callers send longer ones to :func:`score_plain`).

    Returns:
        Per group, ``(log-likelihood, is_greedy)`` per continuation.
    """
    device = model.embed_tokens.weight.device
    contexts = [list(c) for c, _ in groups]
    conts = [list(x) for _, cs in groups for x in cs]
    owner = torch.tensor([g for g, (_, cs) in enumerate(groups) for _ in cs], device=device)
    P = _common_prefix(contexts)
    rest, rest_mask = _right_pad([c[P:] for c in contexts])  # (G, R)
    tail, _ = _right_pad([x[:-1] for x in conts])  # (N, Cmax - 1) inputs predicting cont[1:]
    max_len = P + rest.shape[1] + tail.shape[1]
    # 1) the shared prefix (few-shot demonstrations), once, then one cache row per group.
    if P:
        cache = model.new_kv_cache(1, max_len)
        model(torch.tensor([contexts[0][:P]], device=device), kv_cache=cache, return_logits=False)
        cache.select_rows(torch.zeros(len(groups), dtype=torch.long, device=device))
    else:
        cache = model.new_kv_cache(len(groups), max_len)
    # 2) the rest of every context, once per group; holes of padding are masked out.
    mask = torch.cat([torch.ones(len(groups), P, dtype=torch.long), rest_mask], 1).to(device)
    hidden = model(rest.to(device), attention_mask=mask, kv_cache=cache, return_hidden=True,
                   return_logits=False).hidden  # (G, R, C)
    last = rest_mask.sum(1).to(device) - 1  # position of each context's last real token
    first = _logprobs(model, hidden[torch.arange(len(groups), device=device), last])  # (G, V)
    logp = first[owner][:, None]  # (N, 1, V): prediction of cont[0]
    # 3) every continuation, after expanding the cache to one row per continuation.
    if tail.shape[1]:
        cache.select_rows(owner)
        mask = torch.cat([mask[owner], torch.ones_like(tail, device=device)], 1)
        hidden = model(tail.to(device), attention_mask=mask, kv_cache=cache, return_hidden=True,
                       return_logits=False).hidden  # (N, Cmax - 1, C)
        logp = torch.cat([logp, _logprobs(model, hidden)], 1)  # (N, Cmax, V)
    flat = _score_rows(logp, conts)
    out, i = [], 0
    for _, cs in groups:
        out.append(flat[i:i + len(cs)])
        i += len(cs)
    return out


def score_requests(model, requests: Sequence[TokenRequest], *, max_length: int,
                   batch_size: int = 16, reuse_prefix: bool = True,
                   progress: bool = True) -> list[tuple[float, bool]]:
    """Scores many requests: sorted longest first, batched, contexts shared where possible.

    Args:
        model: a DecoderLM.
        requests: ``(context_ids, continuation_ids)``; contexts and continuations non-empty.
        max_length: the model's context length (inputs longer than it are left-truncated).
        batch_size: rows per forward on the plain path; the prefix-reuse path packs the same token
            budget per forward (more, shorter rows; see :func:`_pack`).
        reuse_prefix: compute shared contexts once (:func:`score_shared`); False scores every
            request independently (:func:`score_plain`).
        progress: show a tqdm bar.

    Returns:
        ``(log-likelihood, is_greedy)`` per request, in the order given.
    """
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation "
                             "(use the prefix token as context for unconditional scores)")
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="loglikelihood", disable=not progress, leave=False)
    plain = list(range(len(requests)))
    if reuse_prefix:
        plain = _run_shared(model, requests, results, max_length=max_length,
                            batch_size=batch_size, bar=bar)
    plain.sort(key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for s in range(0, len(plain), batch_size):
        idx = plain[s:s + batch_size]
        for i, r in zip(idx, score_plain(model, [requests[i] for i in idx], max_length=max_length)):
            results[i] = r
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]


MAX_ROWS_PER_BATCH = 4  # x batch_size: cap on continuation rows of one prefix-reuse batch (KV memory)


def _pack(pieces: list, cont_len, batch_size: int) -> list[list]:
    """Packs ``(context, request indices)`` pieces (longest first) into prefix-reuse batches.

    A batch takes pieces while it stays within the tokens the plain path would run for
    ``batch_size`` rows of the batch's longest request (contexts counted once, continuations once
    per row) and within ``MAX_ROWS_PER_BATCH * batch_size`` rows. Short continuations after long
    shared contexts thus get many rows per forward, which keeps the three forwards of
    :func:`score_shared` cheaper than the plain path's one per ``batch_size`` rows.
    """
    batches, batch, tokens, rows, budget = [], [], 0, 0, 0
    for ctx, idx in pieces:
        longest = max(cont_len(i) for i in idx)
        need = len(ctx) + len(idx) * longest
        if batch and (tokens + need > budget or rows + len(idx) > MAX_ROWS_PER_BATCH * batch_size):
            batches.append(batch)
            batch, tokens, rows = [], 0, 0
        if not batch:
            budget = batch_size * (len(ctx) + longest)
        batch.append((ctx, idx))
        tokens, rows = tokens + need, rows + len(idx)
    return batches + ([batch] if batch else [])


def _run_shared(model, requests, results, *, max_length: int, batch_size: int, bar) -> list[int]:
    """Scores the requests that fit on the prefix-reuse path; returns the indices left over."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    fits, leftover = [], []
    for ctx, idx in groups.items():
        longest = max(len(requests[i][1]) for i in idx)
        (fits if len(ctx) + longest - 1 <= max_length else leftover).append((ctx, idx))
    # Groups bigger than a batch are split; each piece recomputes its (shared) context.
    pieces = [(ctx, idx[s:s + batch_size]) for ctx, idx in fits for s in range(0, len(idx), batch_size)]
    pieces.sort(key=lambda p: -(len(p[0]) + max(len(requests[i][1]) for i in p[1])))
    for batch in _pack(pieces, lambda i: len(requests[i][1]), batch_size):
        scored = score_shared(model, [(ctx, [requests[i][1] for i in idx]) for ctx, idx in batch])
        for (_, idx), res in zip(batch, scored):
            for i, r in zip(idx, res):
                results[i] = r
        bar.update(sum(len(idx) for _, idx in batch))
    return [i for _, idx in leftover for i in idx]

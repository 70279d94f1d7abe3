"""Autoregressive generation: a decode session over a per-row KV cache, and batch APIs on it.

* :class:`DecodeSession` owns the KV cache and the rows (sequences) of a batch: rows join and
  leave while others decode, take sampled tokens (``step``), appended tokens (``append``, a tool
  result) or are cut back (``truncate``); each row stops at its eos ids, stop strings or budget.
* :func:`generate_ids` (ids) and :func:`generate` (text) run a whole batch on one session.
* :func:`decode` steps a session until its rows end, with an optional progress bar
  (:class:`DecodeProgress`: the share of the rows' token budget spent); every batched loop of the
  kit takes ``progress=`` through it.
"""

from mmllm.generation.api import encode_prompts, generate, generate_ids
from mmllm.generation.logprobs import TokenLogprob
from mmllm.generation.progress import DecodeProgress, decode
from mmllm.generation.sampling import SamplingParams, sample_next_token
from mmllm.generation.session import DecodeSession, Row
from mmllm.generation.stops import StopStrings

__all__ = ["DecodeProgress", "DecodeSession", "Row", "SamplingParams", "StopStrings", "TokenLogprob",
           "decode", "encode_prompts", "generate", "generate_ids", "sample_next_token"]

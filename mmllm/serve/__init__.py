"""``mmllm serve``: an OpenAI-compatible server for any checkpoint the kit loads.

* :class:`~mmllm.serve.engine.Engine`: one thread owns one :class:`~mmllm.generation.DecodeSession`;
  concurrent requests join and leave its running batch (continuous batching).
* :func:`~mmllm.serve.app.create_app`: the aiohttp app (/v1/chat/completions with SSE streaming,
  /v1/completions with batched prompts and ``echo``, /v1/models; token log-probabilities,
  :mod:`mmllm.serve.logprobs`; vLLM's /tokenize, /detokenize, /tokenizer_info,
  :mod:`mmllm.serve.tokenize`, so lm-eval's ``local-completions`` scores against it; API key,
  limits, OpenAI's error JSON).
* :class:`~mmllm.serve.server.ServerThread` / :func:`~mmllm.serve.server.serve_forever`: run it in a
  thread, or until SIGINT/SIGTERM (``mmllm serve``, :mod:`mmllm.serve.cli`).
"""

from mmllm.serve.app import create_app
from mmllm.serve.engine import Done, Engine, GenRequest
from mmllm.serve.server import ServerThread, serve_forever

__all__ = ["Done", "Engine", "GenRequest", "ServerThread", "create_app", "serve_forever"]

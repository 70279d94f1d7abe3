"""``mmllm serve checkpoint=<source> port=<n>``: an OpenAI-compatible server (mmllm/conf/serve.yaml)."""

from __future__ import annotations

import asyncio
import logging
import os

import hydra
import torch
from omegaconf import DictConfig

from mmllm.config import CONF_DIR, to_dtype

log = logging.getLogger(__name__)


def build_app(cfg: DictConfig):
    """Loads the model of ``cfg.checkpoint`` and returns the aiohttp app serving it."""
    from mmllm.checkpoint import load_model
    from mmllm.serve.app import create_app
    from mmllm.serve.engine import Engine
    from mmllm.serve.images import ImageLimits

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg.checkpoint, dtype=to_dtype(cfg.dtype))
    if tokenizer is None:
        raise ValueError(f"{cfg.checkpoint} has no tokenizer recorded; a server needs one")
    model = model.to(device).eval()
    context = getattr(model, "max_seq_len", None) or model.decoder.max_seq_len  # a VLM: its decoder's
    max_seq_len = min(cfg.max_seq_len or context, context)
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_seq_len=max_seq_len,
                    seed=cfg.seed, static_decode=cfg.static_decode)
    api_key = cfg.api_key or os.environ.get("MMLLM_API_KEY") or None
    if api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches it can use it", cfg.host)
    return create_app(engine, model_name=cfg.model_name or str(cfg.checkpoint), api_key=api_key,
                      max_body_bytes=cfg.max_body_bytes, max_prompt_tokens=cfg.max_prompt_tokens,
                      max_tokens=cfg.max_tokens, max_n=cfg.max_n, max_pending=cfg.max_pending,
                      chat_template=cfg.chat_template,
                      image_limits=ImageLimits(**cfg.get("images") or {}))


def run(cfg: DictConfig) -> None:
    from mmllm.serve.server import serve_forever

    app = build_app(cfg)

    def ready(port: int) -> None:
        # flushed at once: scripts (and tests) wait for this line to know the port
        print(f"mmllm serve: {cfg.checkpoint} on http://{cfg.host}:{port}/v1", flush=True)

    asyncio.run(serve_forever(app, host=cfg.host, port=cfg.port, on_ready=ready))
    print("mmllm serve: stopped", flush=True)


@hydra.main(config_path=CONF_DIR, config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

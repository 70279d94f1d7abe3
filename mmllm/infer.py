"""``mmllm generate``: batched generation from any model source (conf/generate.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mmllm.config import CONF_DIR, to_dtype


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompts_file`` (lines or JSONL "prompt") or the ``prompts`` list."""
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file not found: {path}")
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if path.suffix == ".jsonl":
            return [json.loads(ln)["prompt"] for ln in lines]
        return lines
    prompts = OmegaConf.to_container(cfg.prompts) if not isinstance(cfg.prompts, str) else [cfg.prompts]
    if not prompts:
        raise ValueError("no prompts: set prompts=[...] or prompts_file=...")
    return [str(p) for p in prompts]


def run(cfg: DictConfig) -> list[dict]:
    from mmllm.checkpoint import load_model
    from mmllm.generation import generate

    model, tokenizer = load_model(cfg.checkpoint, dtype=to_dtype(cfg.dtype))
    if tokenizer is None:
        raise ValueError(f"{cfg.checkpoint} has no tokenizer recorded; export it with one")
    prompts = read_prompts(cfg)
    records = []
    for i in range(0, len(prompts), cfg.batch_size):
        batch = prompts[i:i + cfg.batch_size]
        outs = generate(model, tokenizer, batch, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        stop=list(cfg.stop or []), seed=cfg.seed, use_cache=cfg.use_cache, chat=cfg.chat)
        records += [{"prompt": p, "completion": o} for p, o in zip(batch, outs)]
    for r in records:
        print(f"### {r['prompt']}\n{r['completion']}\n")
    if cfg.get("output"):
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

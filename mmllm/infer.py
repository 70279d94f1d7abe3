"""``mmllm generate``: batched generation from any model source (conf/generate.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mmllm.config import CONF_DIR, to_dtype
from mmllm.errors import MissingFileError, UserError


def read_prompts(cfg: DictConfig) -> list[str]:
    """Prompts from ``prompts_file`` (lines or JSONL "prompt") or the ``prompts`` list."""
    if cfg.get("prompts_file"):
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise MissingFileError(f"prompts_file not found: {path}",
                                   fix="pass an existing text/JSONL file, or prompts=[...]")
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
        raise UserError(f"{cfg.checkpoint} records no tokenizer, so prompts cannot be encoded",
                        fix="train with the kit's callbacks (callbacks.model_checkpoint copies the "
                            "tokenizer into the run), or export with mmllm export and generate from "
                            "the HF directory after saving a tokenizer into it")
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

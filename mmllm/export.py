"""``mmllm export``: a kit training checkpoint -> an HF Llama directory (conf/export.yaml)."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from mmllm.config import CONF_DIR, to_dtype


def export(checkpoint: str, output_dir: str, *, dtype: str | None = None) -> Path:
    """Loads ``checkpoint`` (any source of mmllm.checkpoint.load_model) and writes it as HF Llama."""
    from mmllm.checkpoint import load_model
    from mmllm.models.hf import export_hf_checkpoint

    model, tokenizer = load_model(checkpoint)
    out = export_hf_checkpoint(model, output_dir, tokenizer=tokenizer,
                               dtype=to_dtype(dtype))
    print(f"exported {checkpoint} -> {out}")
    return out


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    export(cfg.checkpoint, cfg.output_dir, dtype=cfg.dtype)


if __name__ == "__main__":
    main()

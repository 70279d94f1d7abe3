"""``mmllm eval``: evaluate a checkpoint on a suite of tasks (conf/eval.yaml).

Example::

    mmllm eval checkpoint=smollm2 eval/suite=commonsense limit=100
    mmllm eval checkpoint=outputs/train/runs/<run>/checkpoints/last.ckpt '+eval/tasks@tasks=[gsm8k]'
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mmllm.config import CONF_DIR

log = logging.getLogger(__name__)


def load(cfg: DictConfig):
    """``(model, tokenizer)`` of ``cfg.checkpoint`` on ``cfg.device`` in ``cfg.dtype``."""
    from mmllm.checkpoint import load_model

    from mmllm.config import to_dtype

    model, tokenizer = load_model(str(cfg.checkpoint), dtype=to_dtype(cfg.dtype))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def run(cfg: DictConfig) -> dict:
    """Loads the model, instantiates ``cfg.tasks``, evaluates, prints the table, writes JSON."""
    from mmllm.eval.evaluator import evaluate, format_table, write_report

    if not cfg.get("tasks"):
        raise ValueError("no tasks selected: pick a suite (eval/suite=quick) or add tasks "
                         "('+eval/tasks@tasks=[gsm8k]')")
    tasks = [instantiate(t) for t in cfg.tasks.values()]
    model, tokenizer = load(cfg)
    report = evaluate(model, tokenizer, tasks, batch_size=cfg.batch_size, limit=cfg.limit,
                      num_fewshot=cfg.num_fewshot, max_length=cfg.max_length,
                      reuse_prefix=cfg.reuse_prefix, log_samples=cfg.log_samples)
    report["checkpoint"] = str(cfg.checkpoint)
    write_report(report, cfg.output)
    print(format_table(report))
    print(f"\nresults: {Path(cfg.output).resolve()}")
    return report


@hydra.main(config_path=CONF_DIR, config_name="eval",
            version_base="1.3")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point of ``mmllm eval``."""
    run(cfg)


if __name__ == "__main__":
    main()

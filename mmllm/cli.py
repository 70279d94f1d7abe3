"""The ``mmllm`` command: ``mmllm <command> [hydra overrides]``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("mmllm.train:main", "pretrain / fine-tune a model (conf/train.yaml)"),
    "pipeline": ("mmllm.pipeline:main", "the whole kit end to end at tiny scale (conf/pipeline.yaml)"),
    "generate": ("mmllm.infer:main", "generate text from a checkpoint (conf/generate.yaml)"),
    "export": ("mmllm.export:main", "write a checkpoint as an HF Llama directory (conf/export.yaml)"),
    "curate": ("mmllm.curation.cli:main", "curate web data with NeMo Curator (conf/curate.yaml)"),
    "eval": ("mmllm.eval.cli:main", "evaluate a checkpoint on benchmark tasks (conf/eval.yaml)"),
}


def usage() -> str:
    lines = ["usage: mmllm <command> [key=value ...] [--multirun] [--help]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Each command is a Hydra app: `mmllm <command> --help` shows its config groups."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        sys.exit(f"mmllm: unknown command {name!r}\n\n{usage()}")
    module_name, func = COMMANDS[name][0].split(":")
    entry = getattr(importlib.import_module(module_name), func)
    sys.argv = [f"mmllm-{name}", *argv[1:]]  # Hydra parses sys.argv
    entry()


if __name__ == "__main__":
    main()

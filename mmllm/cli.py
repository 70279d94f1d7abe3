"""The ``mmllm`` command: ``mmllm <command> [hydra overrides]``.

Every command runs inside one error layer (:mod:`mmllm.errors`): the config is checked against the
signatures of its targets before the command starts, and a failure ends with a few lines saying
what is wrong and how to fix it; the traceback goes to the run's log file (``MMLLM_DEBUG=1`` or
``HYDRA_FULL_ERROR=1`` print it instead).
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("mmllm.train:main", "pretrain / fine-tune a model (conf/train.yaml)"),
    "pipeline": ("mmllm.pipeline:main", "the whole kit end to end at tiny scale (conf/pipeline.yaml)"),
    "generate": ("mmllm.infer:main", "generate text from a checkpoint (conf/generate.yaml)"),
    "export": ("mmllm.export:main", "write a checkpoint as an HF Llama directory (conf/export.yaml)"),
    "curate": ("mmllm.curation.cli:main", "curate web data with NeMo Curator (conf/curate.yaml)"),
    "eval": ("mmllm.eval.cli:main", "evaluate a checkpoint on benchmark tasks (conf/eval.yaml)"),
    "serve": ("mmllm.serve.cli:main", "an OpenAI-compatible server for a checkpoint (conf/serve.yaml)"),
    "plan": ("mmllm.plan:main", "parameters, Chinchilla tokens, memory per GPU and wall time of a run (conf/plan.yaml)"),
    "rlhf-round": ("mmllm.rlhf.round:main",
                   "one online RLHF round: sample, label, reward model, PPO (conf/rlhf_round.yaml)"),
    "chat": ("mmllm.chat:main",
             "chat with a checkpoint in the terminal; --image PATH for VLMs, --tools (conf/chat.yaml)"),
    "synth": ("mmllm.synth.cli:main", "self-instruct / Evol-Instruct data through a teacher (conf/synth.yaml)"),
    "inspect-batch": ("mmllm.data.inspect:main",
                      "print a training batch with its supervised tokens marked (conf/train.yaml)"),
}
# Commands whose Hydra config is not named after them.
CONFIG_NAMES = {"inspect-batch": "train", "rlhf-round": "rlhf_round"}


def usage() -> str:
    lines = ["usage: mmllm <command> [key=value ...] [--multirun] [--help]", "", "commands:"]
    lines += [f"  {name:<14} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Each command is a Hydra app: `mmllm <command> --help` shows its config groups."]
    return "\n".join(lines)


_SET_BY_CLI = "_MMLLM_CLI_SET_HYDRA_FULL_ERROR"  # HYDRA_FULL_ERROR came from us, not the user
_LAUNCH: tuple[str, str] | None = None  # (program, command) of this process's `mmllm <command>`


def restore_command_line() -> None:
    """Puts the command back in ``sys.argv`` once Hydra has parsed its overrides.

    Lightning starts ranks 1.. of a multi-device run by rerunning ``sys.argv`` (``python
    <argv[0]> argv[1:]`` or ``python -m <__main__> argv[1:]``); without the command word those
    ranks would run ``mmllm <overrides>``. Called by the task functions that can train on several
    devices (``train``, ``pipeline``); a no-op when the command did not come through :func:`main`.
    """
    if _LAUNCH is not None and sys.argv[1:2] != [_LAUNCH[1]]:
        sys.argv = [_LAUNCH[0], _LAUNCH[1], *sys.argv[1:]]


def debug_requested() -> bool:
    """``MMLLM_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``: print full tracebacks instead of the summary."""
    if os.environ.get("MMLLM_DEBUG", "") not in ("", "0"):
        return True
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0") and not os.environ.get(_SET_BY_CLI)


def precheck(command: str, overrides: list[str]) -> None:
    """Composes the command's config and checks it (:func:`mmllm.config.check_config`).

    Skipped for Hydra flags (``--help``, ``--multirun``, ...) and when composition itself fails,
    which the command then reports with Hydra's own message.
    """
    if any(o.startswith("-") for o in overrides):
        return
    from hydra.core.global_hydra import GlobalHydra

    from mmllm.config import check_config, compose_config

    try:
        cfg = compose_config(CONFIG_NAMES.get(command, command), overrides)
    except Exception:  # noqa: BLE001 - the real run reports composition errors
        return
    finally:
        GlobalHydra.instance().clear()
    choices = dict(cfg.hydra.runtime.choices) if "hydra" in cfg else {}
    check_config(cfg, choices=choices, overrides=overrides,
                 primary=CONFIG_NAMES.get(command, command))


def main(argv: list[str] | None = None) -> None:
    global _LAUNCH
    program = sys.argv[0] if argv is None else None  # a programmatic call cannot be rerun
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = argv[0]
    if name not in COMMANDS:
        sys.exit(f"mmllm: unknown command {name!r}\n\n{usage()}")
    debug = debug_requested()
    # Hydra prints and exits on errors unless HYDRA_FULL_ERROR is set: let them reach the layer.
    if not debug:
        # Inherited by subprocesses (DDP ranks, pipeline stages): they summarise errors too.
        os.environ["HYDRA_FULL_ERROR"] = os.environ[_SET_BY_CLI] = "1"
    try:
        precheck(name, argv[1:])
        module_name, func = COMMANDS[name][0].split(":")
        entry = getattr(importlib.import_module(module_name), func)
        sys.argv = [f"mmllm-{name}", *argv[1:]]  # Hydra parses sys.argv
        _LAUNCH = (program, name) if program else None
        entry()
    except Exception as exc:
        if debug:
            raise
        from mmllm.errors import report

        sys.exit(report(exc, command=name))


if __name__ == "__main__":
    main()

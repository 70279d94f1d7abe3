"""Errors that say what to do: :class:`UserError` (a message and a fix) and a translator.

Library code raises a :class:`UserError` subclass where the cause is the user's input (a config
value, a path, a missing package); :func:`translate` maps the known exceptions of other libraries
(CUDA/CPU out of memory, a missing optional dependency or binary, Hydra/OmegaConf config errors)
to one. ``mmllm <command>`` (mmllm/cli.py) prints the translated message as the last lines of its
output and writes the full traceback to the run's log file; ``MMLLM_DEBUG=1`` (or
``HYDRA_FULL_ERROR=1``) prints the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback

import torch


class UserError(Exception):
    """An error the user can fix; ``fix`` says how (one line).

    Args:
        message: what is wrong, naming the config key / file / package involved.
        fix: what to do about it.
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix

    def __str__(self) -> str:
        return self.message + (f"\n  fix: {self.fix}" if self.fix else "")


class ConfigError(UserError, ValueError):
    """A config value of the wrong type, a key no target accepts, conflicting config groups."""


class CheckpointError(UserError, ValueError):
    """A file or directory that is not a (complete) checkpoint the kit can read."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the run needs (checkpoint, tokenizer, prompts) does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package or system binary is not installed."""


# Optional Python packages: import name -> how to get it (or avoid needing it).
OPTIONAL_PACKAGES = {
    "flash_attn": "pip install flash-attn --no-build-isolation (CUDA only), or use "
                  "model.lm.attn_backend=sdpa",
    "cudf": "install RAPIDS (pip install nemo-curator[text-cuda12], CUDA only), or run dedup on "
            "the CPU with dedup.exact.backend=cpu dedup.minhash.backend=cpu",
    "bitsandbytes": "pip install bitsandbytes, or use module/optimizer=adamw",
}
for _rapids in ("cupy", "cuml", "cugraph", "dask_cudf", "rmm", "pylibcugraph"):
    OPTIONAL_PACKAGES[_rapids] = OPTIONAL_PACKAGES["cudf"]
# System binaries: executable -> how to install it.
OPTIONAL_BINARIES = {
    "bwrap": "install bubblewrap (apt-get install bubblewrap; scripts/setup.sh does it), or run "
             "code evaluation without the bubblewrap sandbox",
}

OOM_FIX = ("lower data.batch_size (raise trainer.accumulate_grad_batches to keep the batch), "
           "or save memory with module.parallelism.activation_checkpointing=full, "
           "trainer.precision=bf16-mixed or strategy=fsdp2")


def _chain(exc: BaseException):
    """``exc`` and its causes/contexts, outermost first (Hydra and Lightning wrap errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _translate_one(exc: BaseException) -> UserError | None:
    if isinstance(exc, UserError):
        return exc
    if _is_oom(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return UserError(f"out of memory: {first[:300]}", fix=OOM_FIX)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.split(".")[0]
        if root in OPTIONAL_PACKAGES:
            return MissingDependencyError(f"the optional package {root!r} is not installed",
                                          fix=OPTIONAL_PACKAGES[root])
    if isinstance(exc, FileNotFoundError) and exc.filename:
        binary = os.path.basename(str(exc.filename))
        if binary in OPTIONAL_BINARIES:
            return MissingDependencyError(f"the program {binary!r} is not installed",
                                          fix=OPTIONAL_BINARIES[binary])
    return _translate_config_error(exc)


def _translate_config_error(exc: BaseException) -> UserError | None:
    from hydra.errors import HydraException
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "the key"
        return ConfigError(f"missing mandatory value: {key}", fix=f"set it on the command line: {key}=<value>")
    if isinstance(exc, HydraException) and type(exc).__name__ != "InstantiationException":
        # Composition / override errors: Hydra's own text names the key, plus OmegaConf's cause.
        cause = exc.__cause__
        # OmegaConf's first line ("Key 'x' is not in struct"); its full_key/object_type lines are noise.
        detail = str(cause).strip().splitlines()[0] if isinstance(cause, OmegaConfBaseException) else ""
        text = str(exc) + (f"\n{detail}" if detail else "")
        return ConfigError(text.strip(), fix="see `mmllm <command> --help` for the config groups and keys")
    return None


def translate(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc`` (itself, a cause, or a known library error), or None."""
    for e in _chain(exc):
        found = _translate_one(e)
        if found is not None:
            return found
    return None


def _root_cause(exc: BaseException) -> BaseException:
    *_, last = _chain(exc)
    return last


def _log_traceback(exc: BaseException, command: str) -> str:
    """Writes the traceback to the run's log file(s) (Hydra's file handler) or a temp file."""
    text = "".join(traceback.format_exception(exc))
    files = [h for h in logging.getLogger().handlers
             if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]
    if files:
        for handler in files:
            handler.acquire()
            try:
                handler.stream.write(f"mmllm {command} failed:\n{text}")
                handler.flush()
            finally:
                handler.release()
        return files[0].baseFilename
    fd, path = tempfile.mkstemp(prefix=f"mmllm-{command}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def report(exc: BaseException, *, command: str, stream=None) -> int:
    """Prints the few-line message for ``exc`` (last on ``stream``); returns the exit code (1).

    The full traceback goes to the run's log file (or a temp file when the command has none).
    """
    stream = stream or sys.stderr
    err = translate(exc)
    if err is not None:
        fix = err.fix.replace("mmllm <command>", f"mmllm {command}") if err.fix else None
        lines = [f"mmllm {command}: error: {err.message}"] + ([f"  fix: {fix}"] if fix else [])
    else:
        root = _root_cause(exc)
        text = str(root).strip().splitlines()
        where = getattr(exc, "full_key", None) or _full_key(exc)
        lines = [f"mmllm {command}: error: {type(root).__name__}: " + " ".join(text[:3])[:500]
                 + (f" (while building config node {where})" if where else "")]
    log_path = _log_traceback(exc, command)
    lines.append(f"  full traceback: {log_path} (MMLLM_DEBUG=1 prints it here)")
    stream.flush()
    print("\n".join(lines), file=stream, flush=True)
    return 1


def _full_key(exc: BaseException) -> str | None:
    # hydra's InstantiationException ends its message with "full_key: <key>".
    for line in reversed(str(exc).splitlines()):
        if line.startswith("full_key: "):
            return line.removeprefix("full_key: ").strip()
    return None

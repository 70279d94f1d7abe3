"""Sandboxed execution of untrusted (model-written) programs: see :mod:`mmllm.sandbox`.

Kept for the eval tasks' imports; the implementation (bubblewrap isolation, nonce-checked
results, residual risks) lives in :mod:`mmllm.sandbox`.
"""

from mmllm.sandbox import (
    ExecutionResult,
    SandboxUnavailable,
    resolve_isolation,
    run_program,
    run_programs,
)

__all__ = ["ExecutionResult", "SandboxUnavailable", "resolve_isolation", "run_program", "run_programs"]

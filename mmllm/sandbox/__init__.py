"""A sandbox for untrusted (model-written) Python: HumanEval/MBPP, the Python tool, code rewards.

The harness never ``exec``s the program. Each run is a fresh ``python -I -S -B`` under
**bubblewrap** (:mod:`mmllm.sandbox.isolation`): its own mount, PID, network, IPC and UTS
namespaces; a root that holds only read-only ``/usr/lib*`` and the Python installation (no
project files, no home directories, no venv, no shell); a private size-capped tmpfs as cwd, HOME
and TMPDIR; no network at all; everything it starts dies with it (PID namespace,
``--die-with-parent``); an empty environment but for PATH/LANG/HOME/TMPDIR; rlimits (CPU,
address space, processes, open files, file size, no core); and, when the harness is root, a
kernel uid of its own per sample, so concurrent samples cannot signal each other and
``RLIMIT_NPROC`` bounds each one's fork bomb. An audit hook inside is a second layer only.

Results (:mod:`mmllm.sandbox.execute`) come through pipes the harness holds (stdout, stderr,
a result pipe), bounded in size; never through files. A run **passes** only when it exits 0 and
the result pipe carried the run's random nonce, which the bootstrap (:mod:`mmllm.sandbox.child`)
reads from its input pipe and writes only after the program's last statement returned. So
``sys.exit(0)``, ``os._exit(0)``, ``atexit`` tricks, ``SystemExit`` in a ``finally``, killing
itself, crashing or hanging are failures, and a broken sample never aborts a batch.

Isolation is chosen by ``isolation``: ``"bwrap"`` (required), ``"none"`` (weak layer only, warns:
rlimits, audit hook, per-sample uid when root) or ``"auto"`` (default: bwrap when it works, else
refuse with :class:`SandboxUnavailable` unless ``MMLLM_SANDBOX_ALLOW_WEAK=1``).

Residual risks (by design, documented):

* The tests run in the same process as the program, so a program written *against this
  harness* can still fake a pass in-process: read the nonce from the input pipe itself and
  write it to the result pipe, or patch the test functions / ``AssertionError`` checks it can
  reach through ``gc``. The nonce only proves the bootstrap's epilogue (or code imitating it
  on purpose) ran; catching that needs the tests in another process (an RPC-style checker).
* No cgroup: total memory is bounded by ``max_processes x memory_mb`` plus the tmpfs, not
  overall; the CPU rlimit is per process.
* No seccomp filter: the child may use any syscall the kernel allows an unprivileged user in
  its namespaces (kernel bugs are out of scope).
* ``isolation="none"``: the program can read anything its uid can read, open sockets through
  routes the hook misses, and (without root) share a uid with its siblings.
"""

from mmllm.sandbox.execute import ExecutionResult, run_program, run_programs
from mmllm.sandbox.isolation import SandboxUnavailable, resolve_isolation

__all__ = ["ExecutionResult", "SandboxUnavailable", "resolve_isolation", "run_program", "run_programs"]

"""After a curation run is SIGKILLed while its private Ray instance is up, the next run removes
what the killed one left (agents that outlive their raylet, the session's temp dir) and succeeds.

Ray starts in ~8 s here and the test runs two curations through it: marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from curation_testdata import TEXTS

from mmllm.curation.ray_cleanup import OWNER_FILE, SESSION_ENV, session_processes

DRIVER = """
import sys
from mmllm.curation.pipeline import run_curation
result = run_curation(sys.argv[1], sys.argv[2], executor="ray_data", num_cpus=1,
                      overrides=["dedup.minhash=null", "dedup.substring=null"])
print("DOCS", result.num_documents, flush=True)
"""


def _mentions(session_dir: str) -> list[str]:
    """Processes whose command line, environment or open files name the session dir."""
    return [f"{p.pid}: {' '.join(p.cmdline())[:100]}" for p in session_processes(session_dir)]


def _start(script: Path, inputs: Path, out: Path, ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop(SESSION_ENV, None)
    return subprocess.Popen([sys.executable, str(script), str(inputs), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_ray(ray_tmp: str, proc: subprocess.Popen, timeout: float = 240) -> str:
    """The session dir once its raylet has started (a socket exists and processes carry the
    marker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        for d in Path(ray_tmp).glob("mmray-*"):
            if (d / OWNER_FILE).exists() and list(d.glob("session_*/sockets/raylet")) \
                    and session_processes(str(d)):
                return str(d)
        time.sleep(0.5)
    raise AssertionError("Ray did not start in time")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_next_run_cleans_up_after_a_sigkilled_run(tmp_path):
    inputs = tmp_path / "docs.jsonl"
    inputs.write_text("\n".join(json.dumps({"text": t, "url": f"https://k.example/{k}"})
                                for k, t in list(TEXTS.items())[:3]) + "\n")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    ray_tmp = tempfile.mkdtemp(prefix="mmk-")  # short: Ray's socket paths must fit 107 bytes
    try:
        first = _start(script, inputs, tmp_path / "out1", ray_tmp)
        dead = _wait_for_ray(ray_tmp, first)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        time.sleep(3)  # let Ray's fate sharing take down what it does take down
        left = _mentions(dead)
        print(f"left by the killed run: {len(left)} process(es): {left}")
        assert Path(dead).exists()  # nothing removed the killed run's session dir

        second = _start(script, inputs, tmp_path / "out2", ray_tmp)
        out, _ = second.communicate(timeout=600)
        assert second.returncode == 0, out[-3000:]
        assert "DOCS 3" in out
        assert not Path(dead).exists()
        assert _mentions(dead) == []
        # The second run's own instance is gone too.
        assert [d for d in Path(ray_tmp).glob("mmray-*")] == []
    finally:
        for d in Path(ray_tmp).glob("mmray-*"):  # never leave processes behind, even on failure
            from mmllm.curation.ray_cleanup import kill_session_processes

            kill_session_processes(str(d))
        shutil.rmtree(ray_tmp, ignore_errors=True)

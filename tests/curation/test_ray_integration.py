"""Integration through Ray: the demo crawl with NeMo Curator's RayDataExecutor on a private,
2-CPU local Ray instance; same result as in-process, and Ray is gone afterwards. Also the GPU
dedup path (NeMo Curator + RAPIDS), which runs only where CUDA and cuDF exist."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from mmllm.curation.pipeline import run_curation
from mmllm.curation.sample_data import build_demo_warc, demo_overrides

PLANTED = {  # stage -> reason -> documents planted in the demo crawl
    "read": {"non_html": 2, "empty": 1, "too_large": 1, "undecodable": 1, "http_status": 1,
             "truncated": 1, "corrupt_record": 1},
    "url_filter": {"url_score": 3, "blocklisted_domain": 2, "curated_source": 1},
    "langid": {"language_not_kept": 4},
    "gopher_repetition": {"repeated_lines": 1},
    "url_dedup": {"duplicate_url": 1},
    "exact_dedup": {"exact_duplicate": 2},
    "minhash_dedup": {"near_duplicate": 6},
}


def _processes_under(path: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if path in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


def _docs(result) -> list[tuple[str, str]]:
    return [(u, t) for s in result.shards for u, t in
            pd.read_json(s, lines=True)[["url", "text"]].itertuples(index=False)]


@pytest.mark.slow
def test_demo_curation_through_ray(tmp_path, monkeypatch, _ray_session_env):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    warc = build_demo_warc(tmp_path / "demo")
    ov = demo_overrides(tmp_path / "demo")
    t0 = time.perf_counter()
    ray_run = run_curation(str(warc), tmp_path / "ray", executor="ray_data", num_cpus=2,
                           overrides=ov)
    wall = time.perf_counter() - t0
    print(f"demo curation through Ray: {wall:.1f} s (phases: {ray_run.report['seconds']})")

    import ray

    assert not ray.is_initialized()
    deadline = time.time() + 15
    while _processes_under(_ray_session_env) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_under(_ray_session_env) == []  # no orphaned raylet / workers
    assert os.listdir(_ray_session_env) == []  # the private temp dir was removed

    drops = {s: {r: d["docs"] for r, d in rs.items()}
             for s, rs in ray_run.report["drop_reasons"].items()}
    for stage, reasons in PLANTED.items():
        for reason, n in reasons.items():
            assert drops[stage].get(reason) == n, (stage, reason, drops.get(stage))
    funnel = {f["stage"]: f for f in ray_run.report["funnel"]}
    assert funnel["substring_dedup"]["docs_edited"] == 2  # the shared passage cut twice
    assert ray_run.num_documents >= 80

    local = run_curation(str(warc), tmp_path / "local", executor="local", overrides=ov)
    assert _docs(local) == _docs(ray_run)
    assert [f["docs_out"] for f in local.report["funnel"]] == \
        [f["docs_out"] for f in ray_run.report["funnel"]]


@pytest.mark.gpu
def test_gpu_dedup_matches_cpu(tmp_path, warc_path, blocklist_dir):
    from mmllm.curation.gpu import gpu_dedup_available

    if not gpu_dedup_available():
        pytest.skip("RAPIDS (cudf) is not installed: NeMo Curator's GPU dedup cannot run")
    ov = [f"stages.url_filter.blocklist_paths=[{blocklist_dir}]", "stages.read.max_payload_bytes=200000"]
    cpu = run_curation(str(warc_path), tmp_path / "cpu", executor="ray_data",
                       overrides=[*ov, "dedup.exact.backend=cpu", "dedup.minhash.backend=cpu"])
    gpu = run_curation(str(warc_path), tmp_path / "gpu", executor="ray_data",
                       overrides=[*ov, "dedup.exact.backend=gpu", "dedup.minhash.backend=gpu"])
    assert gpu.report["drop_reasons"]["exact_dedup"] == cpu.report["drop_reasons"]["exact_dedup"]
    assert gpu.num_documents == cpu.num_documents


@pytest.mark.slow
def test_joins_an_existing_cluster_via_ray_address(tmp_path, monkeypatch, warc_path,
                                                   blocklist_dir, _ray_session_env):
    """A cluster someone else started (`ray start --head`) is used and left running."""
    import signal
    import socket
    import subprocess
    import sys

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head_tmp = tempfile.mkdtemp(prefix="mmhead-", dir=_ray_session_env)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--port", str(port), "--temp-dir", head_tmp,
                             "--num-cpus", "2", "--include-dashboard=false",
                             "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # ray_session may set it: restore after
    try:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        result = run_curation(str(warc_path), tmp_path / "out", executor="ray_data",
                              overrides=[f"stages.url_filter.blocklist_paths=[{blocklist_dir}]",
                                         "stages.read.max_payload_bytes=200000"])
        assert result.num_documents == 7
        assert head.poll() is None  # the run disconnected but did not stop the cluster
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        assert ray.cluster_resources().get("CPU") == 2.0
        ray.shutdown()
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # our own head and everything it started
        head.wait()

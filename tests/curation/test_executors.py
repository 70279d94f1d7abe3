"""The kit's Ray Data executor leaves a Ray instance it did not start running."""

from __future__ import annotations

import ray

from mmllm.curation import executors
from mmllm.curation.executors import RayDataExecutor, make_executor


def _fake_nemo_execute(calls):
    def execute(self, stages, initial_tasks=None):
        ray.shutdown()  # what NeMo Curator's RayDataExecutor.execute does in its finally block
        calls.append("executed")
        return ["done"]
    return execute


def test_caller_owned_ray_survives_a_pass(monkeypatch):
    calls, shutdowns = [], []
    monkeypatch.setattr(executors.NemoRayDataExecutor, "execute", _fake_nemo_execute(calls))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: shutdowns.append(1))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    real_shutdown = ray.shutdown
    assert make_executor("ray_data").execute([]) == ["done"]
    assert calls == ["executed"] and shutdowns == []  # the caller's instance kept running
    assert ray.shutdown is real_shutdown  # restored afterwards


def test_instance_started_by_the_pass_is_stopped(monkeypatch):
    calls, shutdowns = [], []
    monkeypatch.setattr(executors.NemoRayDataExecutor, "execute", _fake_nemo_execute(calls))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: shutdowns.append(1))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert isinstance(make_executor("ray_data"), RayDataExecutor)
    assert RayDataExecutor().execute([]) == ["done"]
    assert shutdowns == [1]

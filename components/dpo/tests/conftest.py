"""One torch thread for this component's tests, as ``components.dpo.measure`` runs: on a shared
2-core machine two threads spin against other jobs and a tiny training step runs ~17x slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

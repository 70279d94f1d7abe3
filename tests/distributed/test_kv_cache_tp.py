"""Decoding under tensor parallelism (2 gloo CPU processes): the KV cache holds the local heads.

Run as a script, this file is one rank: it shards the tiny model over a 2-way TP mesh
(``apply_tensor_parallel``: q/k/v column-parallel, so each rank owns n_heads/2 query and
n_kv_heads/2 kv heads), decodes ragged prompts plus an appended tool result with a
:class:`DecodeSession`, and writes what it saw. The test compares that with the same session on
the unsharded model in the test process: tokens equal, logits to 1e-5 (TP changes only the order
of the o_proj/down_proj partial sums).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

MODEL = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64,
         "max_seq_len": 64}
PROMPTS = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]
TOOL = [40, 41, 42]


def decode(model) -> dict:
    """Greedy decode with a mid-run append; returns tokens, final logits and the cache's shape."""
    from mmllm.generation import DecodeSession

    session = DecodeSession(model, max_rows=4, max_len=32)
    rows = session.add_rows(PROMPTS, max_new_tokens=10)
    for _ in range(4):
        session.step()
    session.append(rows[1], TOOL)
    while session.step():
        pass
    session.append(rows[0], TOOL)
    logits = session.prefill([rows[0]])[rows[0]]
    return {"tokens": [session.rows[r].tokens for r in rows], "logits": logits.tolist(),
            "cache_shape": list(session.cache.k.shape)}


def build_model():
    from mmllm.models import DecoderLM

    torch.manual_seed(0)
    return DecoderLM(**MODEL, tie_embeddings=False).eval()


def rank_main(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mmllm.distributed.tensor_parallel import apply_tensor_parallel

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    model = apply_tensor_parallel(build_model(), mesh)
    result = decode(model)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_decode_session_under_tensor_parallelism(tmp_path):
    from dist_helpers import launch_ranks

    launch_ranks(Path(__file__), [str(tmp_path)], world=2)
    with torch.no_grad():
        want = decode(build_model())
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["tokens"] == want["tokens"]
        torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want["logits"]),
                                   atol=1e-5, rtol=0)
        # (layers, rows, local kv heads, max_len + scratch, head_dim): half the heads per rank.
        assert got["cache_shape"] == [2, 4, MODEL["n_kv_heads"] // 2, 33, MODEL["dim"] // MODEL["n_heads"]]
    assert want["cache_shape"][2] == MODEL["n_kv_heads"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank_main(Path(sys.argv[1]))

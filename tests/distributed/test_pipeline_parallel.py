"""Pipeline parallelism (torch.distributed.pipelining) of DecoderLM: 2 stages, 2 CPU processes.

Both schedules must reproduce the unsplit model: the first step's gradients to 1e-6 and the loss
of 3 AdamW steps to 2e-5 (fp32; micro-batching changes only the order of the gradient sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import launch_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("pp")
    launch_ranks(Path(__file__).with_name("pp_worker.py"), [str(out)], world=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_schedule_matches_unsplit_training(ranks, schedule):
    first, last = ranks[0][schedule], ranks[1][schedule]
    assert first["losses"] == [None] * 3  # only the last stage computes the loss
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(ranks[1]["reference"]),
                               atol=2e-5, rtol=0)
    assert first["grad_diff"] < 1e-6 and last["grad_diff"] < 1e-6


def test_stages_partition_the_parameters(ranks):
    first, last = set(ranks[0]["1f1b"]["params"]), set(ranks[1]["1f1b"]["params"])
    assert not first & last
    assert first | last == set(ranks[0]["all_params"])  # names of the full model: one state dict
    assert "embed_tokens.weight" in first and "lm_head.weight" in last
    assert any(n.startswith("layers.1.") for n in first) and any(n.startswith("layers.2.") for n in last)


def test_stage_split_and_errors(tiny_lm_kwargs):
    from mmllm.distributed.pipeline import DecoderStage, stage_layers
    from mmllm.models import DecoderLM

    assert stage_layers(5, 2) == [range(3), range(3, 5)]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        stage_layers(2, 3)
    with pytest.raises(ValueError, match="tied embeddings"):
        DecoderStage(DecoderLM(**tiny_lm_kwargs, tie_embeddings=True), range(1), first=True, last=False)

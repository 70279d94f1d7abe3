"""Model presets of conf/model/lm have the published shapes (built on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mmllm.config import CONF_DIR

# LLaMA paper Table 2 sizes (6.7B, 13.0B, 32.5B, 65.2B) and SmolLM2-135M's 134.5 M.
EXPECTED = {"llama_7b": 6_738_415_616, "llama_13b": 13_015_864_320,
            "llama_33b": 32_528_943_616, "llama_65b": 65_285_660_672, "smollm2_135m": 134_515_008}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_count(repo_root, name):
    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / "lm" / f"{name}.yaml")
    with torch.device("meta"):
        model = instantiate(cfg)
    assert model.num_params() == EXPECTED[name]

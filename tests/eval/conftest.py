"""Shared fixtures of the evaluation tests: a tiny byte-level BPE tokenizer and a tiny DecoderLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
CORPUS = [
    "Question: What is the capital of France?\nAnswer: Paris",
    "The quick brown fox jumps over the lazy dog. It was a great movie, not a terrible one.",
    "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "#### 72\nAnswer: yes\nAnswer: no\nPassage: The sky is blue.",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE (GPT-2 style) trained on a few lines, wrapped as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def build_tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 1024):
    from mmllm.models import DecoderLM

    torch.manual_seed(seed)
    return DecoderLM(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     hidden_dim=64, max_seq_len=max_seq_len, init_std=0.2).eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A random tiny DecoderLM (large init std, so choices get clearly different scores)."""
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture
def make_tiny_model():
    """The builder of fresh tiny models (for tests that train or change them)."""
    return build_tiny_model


@pytest.fixture
def eval_data_env(monkeypatch):
    """Points the task YAMLs' local data dir at the test fixtures."""
    monkeypatch.setenv("MMLLM_EVAL_DATA", str(FIXTURES))
    return FIXTURES

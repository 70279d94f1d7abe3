"""Data: special tokens, tokenizers, packed token shards, mixtures and DataModules."""

from mmllm.data.mixture import Mixture, MixtureSource, plan_counts
from mmllm.data.pretrain import MixtureBatches, PretrainDataModule
from mmllm.data.shards import TokenShards, load_text_dataset, tokenize_to_shards
from mmllm.data.curated import CuratedTextDataModule
from mmllm.data.special_tokens import (
    SPECIAL_TOKENS,
    SpecialTokens,
    add_special_tokens,
    special_token_list,
)
from mmllm.data.tokenizer import extend_vocabulary, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "CuratedTextDataModule",
    "SPECIAL_TOKENS",
    "Mixture",
    "MixtureBatches",
    "MixtureSource",
    "PretrainDataModule",
    "SpecialTokens",
    "TokenShards",
    "add_special_tokens",
    "extend_vocabulary",
    "load_text_dataset",
    "load_tokenizer",
    "plan_counts",
    "special_token_list",
    "tokenize_to_shards",
    "train_bpe_tokenizer",
]

"""Single-device building blocks of the kit's models (no parallelism in here)."""

from mmllm.nn.attention import Attention, AttentionInputs, KVCache, build_attention_inputs
from mmllm.nn.block import DecoderBlock
from mmllm.nn.heads import ScalarHead, ValueHead, last_token_index
from mmllm.nn.mlp import GeluMLP, SwiGLU, build_mlp, llama_hidden_dim
from mmllm.nn.moe import GroupedExperts, MoE
from mmllm.nn.norms import RMSNorm, build_norm
from mmllm.nn.position import RotaryEmbedding, alibi_slopes, apply_rope, rope_inv_freq

__all__ = [
    "Attention", "AttentionInputs", "KVCache", "build_attention_inputs", "DecoderBlock",
    "GeluMLP", "SwiGLU", "build_mlp", "llama_hidden_dim", "MoE", "RMSNorm", "build_norm",
    "RotaryEmbedding", "alibi_slopes", "apply_rope", "rope_inv_freq", "GroupedExperts",
    "ScalarHead", "ValueHead", "last_token_index",
]

"""Model assemblies built from mmllm.nn."""

from mmllm.models.decoder_lm import DecoderLM, DecoderOutput
from mmllm.models.heads import DecoderWithScalarHead, ScalarHeadOutput

__all__ = ["DecoderLM", "DecoderOutput", "DecoderWithScalarHead", "ScalarHeadOutput"]

"""Model assemblies built from mmllm.nn."""

from mmllm.models.decoder_lm import DecoderLM, DecoderOutput

__all__ = ["DecoderLM", "DecoderOutput"]

"""Export a VisionLanguageModel to transformers' LLaVA (LlavaForConditionalGeneration).

LLaVA = CLIPVisionModel + LlavaMultiModalProjector (linear_1, act, linear_2) + LlamaForCausalLM.
Our parts map onto it when the connector is an MLP whose hidden width is the LM width (LLaVA-1.5)
or a linear projection (exported exactly as linear_1 = W, act = identity, linear_2 = I), the
encoder an open_clip ViT (weights renamed; its fused ``in_proj`` split into q/k/v) and the LM a
Llama-compatible DecoderLM (mmllm.models.hf). Feature selection carries over: our block index ->
``vision_feature_layer`` (HF's hidden_states[0] is the embedding output), CLS kept -> "full".
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmllm.models.hf import hf_config_from_model, hf_key
from mmllm.models.vlm import VisionLanguageModel
from mmllm.nn.connectors import LinearConnector, MLPConnector
from mmllm.nn.vision import VisionEncoder


def clip_vision_config(encoder: VisionEncoder) -> dict:
    """An HF CLIPVisionConfig dict for the encoder (raises for ViT variants CLIP cannot express)."""
    v = encoder.visual
    block = v.transformer.resblocks[0]
    unsupported = []
    if not isinstance(v.ln_pre, torch.nn.LayerNorm):
        unsupported.append("no_ln_pre")
    if v.attn_pool is not None:
        unsupported.append("attentional pooling")
    if not isinstance(block.ls_1, torch.nn.Identity):
        unsupported.append("layer scale")
    if getattr(block.attn, "in_proj_weight", None) is None:
        unsupported.append("a custom attention block")
    if unsupported:
        raise ValueError(f"HF CLIPVisionModel cannot express this ViT: {', '.join(unsupported)}")
    width = v.transformer.width
    return {
        "hidden_size": width, "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(v.transformer.resblocks), "num_attention_heads": block.attn.num_heads,
        "image_size": v.image_size[0], "patch_size": v.patch_size[0], "num_channels": 3,
        "hidden_act": "quick_gelu" if encoder.quick_gelu else "gelu",
        "layer_norm_eps": v.ln_pre.eps, "projection_dim": v.proj.shape[1] if v.proj is not None else width,
    }


def clip_vision_state_dict(encoder: VisionEncoder) -> dict[str, torch.Tensor]:
    """open_clip ViT weights under the names of HF's CLIP vision transformer (LLaVA's vision_tower)."""
    v = encoder.visual
    sd = {"embeddings.patch_embedding.weight": v.conv1.weight,
          "embeddings.class_embedding": v.class_embedding,
          "embeddings.position_embedding.weight": v.positional_embedding,
          "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
          "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias}
    for i, blk in enumerate(v.transformer.resblocks):
        p = f"encoder.layers.{i}."
        qw, kw, vw = blk.attn.in_proj_weight.chunk(3)  # fused (3D, D) -> q, k, v
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3)
        sd.update({
            p + "self_attn.q_proj.weight": qw, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": kw, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": vw, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
            p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
            p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
            p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
            p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
        })
    return {k: t.detach().clone() for k, t in sd.items()}


def projector_state_dict(connector) -> tuple[dict[str, torch.Tensor], str]:
    """(LlavaMultiModalProjector weights, projector_hidden_act) of a linear or MLP connector."""
    if isinstance(connector, MLPConnector):
        if connector.linear_1.out_features != connector.out_dim:
            raise ValueError(f"HF LLaVA's projector hidden width is the LM width ({connector.out_dim}); "
                             f"this MLP has {connector.linear_1.out_features}")
        return {k: v.detach().clone() for k, v in connector.state_dict().items()}, "gelu"
    if isinstance(connector, LinearConnector):
        d = connector.out_dim
        eye = torch.eye(d, dtype=connector.proj.weight.dtype)
        return {"linear_1.weight": connector.proj.weight.detach().clone(),
                "linear_1.bias": connector.proj.bias.detach().clone(),
                "linear_2.weight": eye, "linear_2.bias": torch.zeros(d, dtype=eye.dtype)}, "linear"
    raise ValueError(f"HF LLaVA has an MLP projector: {type(connector).__name__} cannot be exported "
                     "(use the linear or mlp connector)")


def llava_config(vlm: VisionLanguageModel, *, tokenizer=None):
    """The transformers LlavaConfig describing ``vlm``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if vlm.vision is None:
        raise ValueError("LLaVA export needs the vision encoder (the model was built without one)")
    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    text = hf_config_from_model(vlm.decoder, **ids)
    _, act = projector_state_dict(vlm.connector)
    n_layers = len(vlm.vision.visual.transformer.resblocks)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**clip_vision_config(vlm.vision)),
        text_config=LlamaConfig(**{k: v for k, v in text.items() if k != "architectures"}),
        image_token_index=vlm.image_token_id, image_seq_length=vlm.num_image_tokens,
        projector_hidden_act=act, vision_feature_layer=vlm.vision.feature_layer - n_layers,
        vision_feature_select_strategy="full" if vlm.vision.keep_cls else "default",
        multimodal_projector_bias=True, tie_word_embeddings=vlm.decoder.tie_embeddings)


def to_hf_llava(vlm: VisionLanguageModel, *, tokenizer=None):
    """An in-memory ``LlavaForConditionalGeneration`` with the weights of ``vlm``."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(vlm, tokenizer=tokenizer)
    hf = LlavaForConditionalGeneration(cfg)  # on CPU: its rotary tables are buffers built here
    proj, _ = projector_state_dict(vlm.connector)
    state = {f"model.vision_tower.{k}": v for k, v in clip_vision_state_dict(vlm.vision).items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in proj.items()})
    for k, v in vlm.decoder.state_dict().items():
        name = hf_key(k)  # "model.<...>" or "lm_head.weight"
        if name.startswith("model."):
            state["model.language_model." + name.removeprefix("model.")] = v.detach().clone()
        elif not vlm.decoder.tie_embeddings:
            state[name] = v.detach().clone()
    if vlm.decoder.tie_embeddings:
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"LLaVA export does not cover the model: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    hf.tie_weights()
    return hf.eval()


def export_llava(vlm: VisionLanguageModel, out_dir: str | Path, *, tokenizer=None,
                 dtype: torch.dtype | None = None) -> Path:
    """Writes ``vlm`` as an HF LLaVA directory (``LlavaForConditionalGeneration.from_pretrained``),
    with the tokenizer and a CLIPImageProcessor matching open_clip's eval preprocessing."""
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    hf = to_hf_llava(vlm, tokenizer=tokenizer)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(str(out))
    norm = next(t for t in vlm.vision.preprocess.transforms if type(t).__name__ == "Normalize")
    size = vlm.vision.image_size[0]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(norm.mean), image_std=list(norm.std)).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

"""LoRA and QLoRA fine-tuning through ``peft``, in place on the kit's DecoderLM.

:func:`apply_lora` freezes the model, optionally quantises its base Linear layers to 4 bits with
bitsandbytes (QLoRA: NF4 or FP4 blocks, optional double quantisation; runs on CPU and CUDA with
bitsandbytes >= 0.48) and injects peft LoRA adapters into the ``target_modules``; only adapter
weights then require grad, so :meth:`CausalLMModule.param_groups` hands only them to the optimizer.
The model stays a DecoderLM (same class, config and forward), so the training loop, checkpoints
and parallelism wrappers need nothing special. State-dict keys gain peft's ``base_layer`` /
``lora_A.default`` / ``lora_B.default`` parts; the module records the options in its checkpoint
(``mmllm.lora``), and :func:`mmllm.checkpoint.load_lightning_checkpoint` rebuilds the adapted
model and returns :func:`merge_lora`'s plain model, so ``mmllm export``/``eval``/``generate``
and ``load_model`` never see adapters.

The kit's Linear names (mmllm.nn.attention / mmllm.nn.mlp) are the HF Llama ones, and HF / GGUF
checkpoints (SmolLM2) load into a DecoderLM, so one default ``target_modules`` serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT_TYPES = ("nf4", "fp4")
# Kept in full precision under QLoRA (as in the QLoRA paper / HF's llm_int8_skip_modules): the
# LM head (often tied to the embedding) and MoE routers (tiny, and their argmax is fragile).
QUANT_SKIP = ("lm_head", "router")
LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "quantize", "double_quant",
             "compute_dtype", "bias", "use_rslora"}


def check_lora_options(options: dict, *, parallelism: dict | None = None) -> None:
    """Raises ValueError for unknown keys or values (at module construction, before any work)."""
    unknown = set(options) - LORA_KEYS
    if unknown:
        raise ValueError(f"unknown module.lora keys {sorted(unknown)}; known: {sorted(LORA_KEYS)}")
    if int(options.get("r", 8)) < 1:
        raise ValueError(f"module.lora.r must be >= 1, got {options.get('r')}")
    quant = options.get("quantize")
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"module.lora.quantize must be null or one of {QUANT_TYPES}, got {quant!r}")
    if quant and parallelism and parallelism.get("fsdp", True):
        # FSDP2/TP shard plain tensors; bitsandbytes' packed 4-bit weights are not shardable.
        raise ValueError("QLoRA (module.lora.quantize) cannot be sharded with FSDP2/TP: use "
                         "strategy=single or ddp with module.parallelism=null")


def quantize_linears(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.float32,
                     skip: Sequence[str] = QUANT_SKIP) -> int:
    """Replaces every ``nn.Linear`` of ``model`` (but ``skip``) by a frozen bitsandbytes 4-bit one.

    Args:
        model: modified in place; its Linear weights must be on the CPU or a CUDA device.
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4".
        double_quant: also quantise the per-block scales (QLoRA's double quantisation).
        compute_dtype: dtype of the matmuls (dequantised weights x activations).
        skip: names (last component) of Linears kept as they are.

    Returns:
        The number of layers quantised.
    """
    import bitsandbytes as bnb

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu(), requires_grad=False,
                                     quant_type=quant_type, compress_statistics=double_quant)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(lin.weight.device if lin.weight.device.type != "meta" else "cpu")  # quantises
        # load_state_dict (checkpoint loading, Lightning resume) must restore the saved 4-bit
        # blocks and their quantisation state, which plain Module loading ignores.
        q._register_load_state_dict_pre_hook(_load_4bit_weight, with_module=True)
        _set_submodule(model, name, q)
    return len(targets)


def _load_4bit_weight(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Pre-hook of a 4-bit Linear: rebuilds its weight from the saved blocks + quantisation stats."""
    import bitsandbytes as bnb

    key = prefix + "weight"
    stats = {k[len(key) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
    if key not in state_dict or not stats:
        return  # not a 4-bit checkpoint: the normal loader reports the mismatch
    device = module.weight.device
    module.weight = bnb.nn.Params4bit.from_prequantized(
        data=state_dict[key].clone(), quantized_stats=stats, requires_grad=False, device=device,
        module=module)


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Sequence[str] | str = LLAMA_TARGETS, quantize: str | None = None,
               double_quant: bool = True, compute_dtype: str = "float32", bias: str = "none",
               use_rslora: bool = False) -> nn.Module:
    """Freezes ``model`` and injects trainable peft LoRA adapters, in place (QLoRA with ``quantize``).

    Args:
        model: a DecoderLM (or any module whose Linears carry the ``target_modules`` names).
        r: adapter rank.
        alpha: scaling numerator: the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: dropout on the adapter's input.
        target_modules: Linear names to adapt (a list, or a peft regex string).
        quantize: None (LoRA), "nf4" or "fp4" (QLoRA: base Linears stored in 4 bits).
        double_quant: QLoRA double quantisation of the block scales.
        compute_dtype: QLoRA matmul dtype ("float32", "bfloat16", ...).
        bias: peft's bias mode ("none", "lora_only", "all").
        use_rslora: rank-stabilised scaling.

    Returns:
        ``model`` (the same object), with only adapter parameters requiring grad.
    """
    from peft import LoraConfig, inject_adapter_in_model

    from mmllm.config import to_dtype

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    model.requires_grad_(False)
    if quantize:
        quantize_linears(model, quant_type=quantize, double_quant=double_quant,
                         compute_dtype=to_dtype(compute_dtype))
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=targets, bias=bias, use_rslora=use_rslora)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:  # peft's "Target modules ... not found"
        raise ValueError(f"module.lora.target_modules={targets} matched no Linear of "
                         f"{type(model).__name__} ({e}); its Linear names: "
                         f"{sorted(linear_names(model))}") from e
    for name, p in model.named_parameters():  # adapters only (and biases if bias != "none")
        p.requires_grad_("lora_" in name or (bias != "none" and name.endswith("bias")))
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError(f"module.lora.target_modules={targets} matched no Linear of "
                         f"{type(model).__name__}; its Linear names: {sorted(linear_names(model))}")
    return model


def linear_names(model: nn.Module) -> set[str]:
    """The distinct last-component names of the model's Linear layers (LoRA target candidates)."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA adapter into its base weight and removes it (peft's merge_and_unload).

    4-bit bases are dequantised first and the merged weight stays in full precision, so the plain
    model computes what the adapted one did (re-quantising the merged weight, as merging into a
    4-bit layer in place would, adds a second rounding error).

    Returns:
        ``model`` with plain ``nn.Linear`` layers where adapters were.
    """
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        base = layer.get_base_layer()
        weight = dequantized_weight(base)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if base.bias is not None:
            plain.bias.copy_(base.bias.to(weight.dtype))
        _set_submodule(model, name, plain)
    return model


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a plain or bitsandbytes 4-bit Linear, as a float tensor."""
    weight = linear.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().clone()
    import bitsandbytes.functional as bf

    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU inference kernel (eval mode on CPUs with
        # AVX512-BF16) and unpacks them itself when saving; dequantising needs the saved layout.
        data, state = bf._convert_weight_packed_for_cpu_inverse(data.clone(), state)
    return bf.dequantize_4bit(data, state).float()


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Replaces the remaining 4-bit Linears (not adapted) by plain fp32 ones, in place."""
    import bitsandbytes as bnb

    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]:
        weight = dequantized_weight(m)
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if m.bias is not None:
                plain.bias.copy_(m.bias.to(weight.dtype))
        _set_submodule(model, name, plain)
    return model


def merged_model(model: nn.Module) -> nn.Module:
    """:func:`merge_lora` then :func:`dequantize_linears`: a plain model with all grads enabled."""
    model = merge_lora(model)
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        model = dequantize_linears(model)
    return model.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (4-bit weights counted by their logical size)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)

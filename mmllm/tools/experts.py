"""Model experts for HuggingGPT (:mod:`mmllm.tools.hugginggpt`): the kit's VLM as ``describe``.

:func:`load_vlm` rebuilds the :class:`~mmllm.models.vlm.VisionLanguageModel` the ``vlm_stage2``
stage saves (``vlm.pt``: ``{"model_config", "state_dict"}``; the vision encoder is rebuilt from
its config and gets its weights from the state dict, nothing is downloaded) with the tokenizer
holding the image tokens (``vlm_stage1``'s). :func:`vlm_describer` wraps it as
``describe(image, question) -> str``: the image is loaded by the rules of ``mmllm serve``
(:func:`mmllm.serve.images.load_image_url`: a local path or ``file://`` URL, or a base64 ``data:``
URL; ``http(s)`` URLs are refused, the kit makes no outbound requests), the question is rendered
with the image span the VLM was trained on (:func:`mmllm.serve.images.encode_prompt`) and the
answer decoded greedily. The catalog entries ``mmllm-vlm`` (image-to-text) and ``mmllm-vlm-vqa``
(visual-question-answering) have ``expert: "vlm"``, so::

    describe = vlm_describer("runs/x/stages/vlm_stage2/vlm.pt")
    hg = HuggingGPT(llm=teacher, experts=default_experts(registry, vlm=describe))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINT_NAME = "vlm.pt"


def _checkpoint_file(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no VLM checkpoint at {checkpoint} (expected the vlm_stage2 stage's "
                                f"{CHECKPOINT_NAME} or its directory)")
    return path


def _default_tokenizer_dir(file: Path) -> Path:
    """The pipeline's layout: ``<run>/stages/vlm_stage2/vlm.pt`` -> ``<run>/stages/vlm_stage1/tokenizer``."""
    for candidate in (file.parent / "tokenizer", file.parent.parent / "vlm_stage1" / "tokenizer"):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer for {file}: looked in {file.parent / 'tokenizer'} and "
                            f"{file.parent.parent / 'vlm_stage1' / 'tokenizer'}; pass tokenizer= (the "
                            "vlm_stage1 stage's, which holds the image tokens)")


def load_vlm(checkpoint: str | Path, *, tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """``(vlm, tokenizer)`` from a ``vlm_stage2`` checkpoint.

    Args:
        checkpoint: ``vlm.pt`` or the directory holding it.
        tokenizer: the tokenizer directory (default: next to the checkpoint, else the pipeline's
            ``vlm_stage1/tokenizer``).
        device, dtype: where and in what precision the model runs.

    Raises:
        FileNotFoundError: no checkpoint or tokenizer; ValueError: not a VLM checkpoint, or the
        tokenizer lacks the image tokens.
    """
    from transformers import AutoTokenizer

    from mmllm.data.vlm_collate import vlm_token_ids
    from mmllm.models.vlm import VisionLanguageModel

    file = _checkpoint_file(checkpoint)
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"model_config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{file} is not a VLM checkpoint of the vlm_stage2 stage (needs model_config and state_dict)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer or _default_tokenizer_dir(file)))
    config = ckpt["model_config"]
    if vlm_token_ids(tok)[1] != config["image_token_id"]:
        raise ValueError(f"the tokenizer's <ImageFeature> id differs from the checkpoint's "
                         f"({config['image_token_id']}): pass the tokenizer the VLM was trained with")
    vlm = VisionLanguageModel(**config)
    vlm.load_state_dict(ckpt["state_dict"], strict=True)
    return vlm.to(device=device, dtype=dtype).eval(), tok


def describer(vlm, tokenizer, *, max_new_tokens: int = 64) -> Callable[[str, str], str]:
    """``describe(image, question) -> str`` over a loaded VLM (greedy; calls are serialised).

    Args:
        vlm: a :class:`~mmllm.models.vlm.VisionLanguageModel` (the interface of
            :func:`mmllm.serve.images.is_vlm`, with a vision encoder).
        tokenizer: its tokenizer (with the image tokens).
        max_new_tokens: answer length at most.
    """
    from mmllm.data.chat import ChatRenderer
    from mmllm.data.special_tokens import SPECIAL_TOKENS
    from mmllm.data.vlm_data import IMAGE_PLACEHOLDER
    from mmllm.serve.images import ImageLimits, encode_prompt, image_span_ids, is_vlm, load_image_url, preprocess

    if not is_vlm(vlm) or getattr(vlm, "vision", None) is None:
        raise ValueError("describe needs a vision-language model with a vision encoder")
    renderer, limits = ChatRenderer(tokenizer), ImageLimits(allow_local_files=True)
    span = image_span_ids(tokenizer, vlm.num_image_tokens)
    end = tokenizer.get_vocab().get(SPECIAL_TOKENS.chat_end)
    stop = [i for i in (tokenizer.eos_token_id, end) if i is not None]
    lock = threading.Lock()  # HuggingGPT runs experts on a thread pool: one generation at a time

    def describe(image: str, question: str) -> str:
        picture = load_image_url(str(image), limits, where=str(image)[:80])
        if IMAGE_PLACEHOLDER in question:
            raise ValueError(f"the question must not contain {IMAGE_PLACEHOLDER!r} (the image goes first)")
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}]
        ids = encode_prompt(renderer, messages, 1, span)
        with lock, torch.no_grad():
            pixels = preprocess(vlm, [picture]).to(next(vlm.parameters()).device)
            (new,) = vlm.generate([ids], [pixels], max_new_tokens=max_new_tokens, eos_token_id=stop,
                                  pad_token_id=tokenizer.pad_token_id or 0)
        return tokenizer.decode(new, skip_special_tokens=True).strip()
    return describe


def vlm_describer(checkpoint: str | Path, *, max_new_tokens: int = 64, device: str | torch.device | None = None,
                  tokenizer: str | Path | None = None) -> Callable[[str, str], str]:
    """The ``vlm_stage2`` VLM as HuggingGPT's ``describe(image_path_or_url, question) -> str``.

    Args:
        checkpoint: ``vlm.pt`` of the vlm_stage2 stage, or its directory.
        max_new_tokens: answer length at most.
        device: default cuda when available.
        tokenizer: the tokenizer directory (see :func:`load_vlm`).

    Returns:
        ``describe(image, question)``: ``image`` a local path, ``file://`` or base64 ``data:``
        URL (``http(s)`` is refused: an error the HuggingGPT task reports).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vlm, tok = load_vlm(checkpoint, tokenizer=tokenizer, device=device)
    return describer(vlm, tok, max_new_tokens=max_new_tokens)

"""Vision encoder: an open_clip ViT returning patch features from a chosen layer.

``VisionEncoder`` wraps the image tower of an open_clip CLIP model: ViT-L-14 (LLaVA's encoder)
for real runs, or any custom config (``model_cfg``, e.g. :data:`TINY_VIT` for tests), registered
with open_clip through its public ``add_model_config``. Weights come from an open_clip pretrained
tag (downloaded once into the HF cache, then offline) or a local checkpoint file (a full open_clip
CLIP state dict, e.g. what the ``vision_pretrain`` stage writes).

Features are the raw output of one transformer block (LLaVA: the penultimate, ``feature_layer=-2``),
read with open_clip's ``forward_intermediates`` (the blocks after it are not run), with the CLS
token dropped (LLaVA "default") or kept first ("full")::

    images (B, 3, H, W) -> features (B, N, Dv)   N = (H / patch)^2 (+1 with CLS)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

# A ViT small enough for CPU tests: 32x32 images, 8x8 patches (16 tokens), width 32, 2 layers.
# The text tower is only used by vision_pretrain (CLIP loss); the VLM drops it.
TINY_VIT: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_model_config(model_cfg: dict) -> str:
    """Registers a custom open_clip model config; returns its name (``mmllm-<hash>``).

    open_clip's public registry reads ``<name>.json`` files from added paths; the name is the
    config's hash, so the same config always gets the same name and registering twice is harmless.
    """
    import open_clip

    blob = json.dumps(model_cfg, sort_keys=True)
    name = "mmllm-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
    if open_clip.get_model_config(name) is None:
        folder = Path(tempfile.gettempdir()) / "mmllm_open_clip_configs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(blob)
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def create_clip(*, model_name: str = "ViT-L-14", model_cfg: dict | None = None,
                pretrained: str | None = None):
    """An open_clip CLIP model and its (train, eval) preprocessing transforms.

    Args:
        model_name: a built-in open_clip architecture (ignored when ``model_cfg`` is given).
        model_cfg: a custom config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        pretrained: an open_clip pretrained tag (e.g. "openai", "laion2b_s32b_b82k") or the
            path of a local checkpoint file; None = random init.

    Returns:
        ``(model, preprocess_train, preprocess_val, name)``.
    """
    import open_clip

    name = register_model_config(model_cfg) if model_cfg is not None else model_name
    if pretrained is not None and not Path(pretrained).is_file() and \
            pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise FileNotFoundError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of "
                                f"{name} (tags: {open_clip.list_pretrained_tags_by_model(name)})")
    if pretrained is not None and not Path(pretrained).is_file():
        from open_clip.pretrained import get_pretrained_cfg

        tag_quick = bool(get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        if tag_quick != bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False)):
            # open_clip only warns; the features would be silently wrong.
            act, other = ("QuickGELU", "GELU") if tag_quick else ("GELU", "QuickGELU")
            raise ValueError(f"the {pretrained!r} weights were trained with {act} but {name} uses "
                             f"{other}: use "
                             f"{name + '-quickgelu' if tag_quick else name.removesuffix('-quickgelu')}")
    # Built under ``torch.device("meta")`` (mmllm.checkpoint rebuilds, then loads weights), stay there.
    device = "meta" if torch.get_default_device().type == "meta" else "cpu"
    model, train_tf, val_tf = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                    device=device)
    return model, train_tf, val_tf, name


class VisionEncoder(nn.Module):
    """Patch features of an open_clip ViT.

    Args:
        model_name: open_clip architecture (default ViT-L-14, as LLaVA-1.5 at 224 px).
        model_cfg: custom architecture instead (see :data:`TINY_VIT`).
        pretrained: open_clip tag or local checkpoint path; None = random init.
        feature_layer: the block whose output is returned (negative counts from the end:
            -1 = last, -2 = penultimate as LLaVA).
        keep_cls: keep the CLS token (first) in the features.
        freeze: no gradients and always in eval mode (LLaVA/BLIP-2 keep the encoder frozen).
    """

    def __init__(self, *, model_name: str = "ViT-L-14", model_cfg: dict | None = None,
                 pretrained: str | None = None, feature_layer: int = -2, keep_cls: bool = False,
                 freeze: bool = True) -> None:
        super().__init__()
        if model_cfg is not None and not isinstance(model_cfg, dict):  # a Hydra DictConfig
            from omegaconf import OmegaConf

            model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__", "OmegaConf")}
        clip, self.preprocess_train, self.preprocess, self.clip_name = create_clip(
            model_name=model_name, model_cfg=model_cfg, pretrained=pretrained)
        visual = clip.visual
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise ValueError(f"{self.clip_name}: only open_clip VisionTransformer towers are supported")
        self.visual = visual  # the text tower is dropped
        n_layers = len(visual.transformer.resblocks)
        if not -n_layers <= feature_layer < n_layers:
            raise ValueError(f"feature_layer={feature_layer} out of range for {n_layers} blocks")
        self.feature_layer = feature_layer % n_layers  # 0-based block index
        self.keep_cls, self.frozen = keep_cls, freeze
        self.quick_gelu = bool(getattr(clip, "quick_gelu", False) or
                               (open_clip_config(self.clip_name) or {}).get("quick_gelu", False))
        if freeze:
            self.requires_grad_(False)
            self.eval()

    @property
    def width(self) -> int:
        """Dv: the feature width."""
        return self.visual.transformer.width

    @property
    def num_tokens(self) -> int:
        """N: feature tokens per image."""
        gh, gw = self.visual.grid_size
        return gh * gw + int(self.keep_cls)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no dropout) inside a module being trained.
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, N, Dv) features of ``feature_layer``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        dtype = self.visual.conv1.weight.dtype
        out = self.visual.forward_intermediates(
            images.to(dtype), indices=[self.feature_layer], stop_early=True,
            intermediates_only=True, output_fmt="NLC", output_extra_tokens=self.keep_cls)
        feats = out["image_intermediates"][0]  # (B, N_patches, Dv)
        if self.keep_cls:
            feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return feats

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) with open_clip's eval transform (resize, crop, normalise)."""
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    def fingerprint(self) -> str:
        """Identifies what the features depend on (architecture, layer, CLS, weights)."""
        h = hashlib.sha256(json.dumps({**self.config, "freeze": None}, sort_keys=True, default=str).encode())
        for k, v in sorted(self.visual.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().sum().item().hex().encode())
            h.update(v.detach().float().flatten()[:16].cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def open_clip_config(name: str) -> dict | None:
    """The registered open_clip config of architecture ``name`` (None if unknown)."""
    import open_clip

    return open_clip.get_model_config(name)

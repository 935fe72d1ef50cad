"""Vision Transformers from timm, with the overrides small-image experiments need."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
from timm.models import VisionTransformer


def create_vit(
    name: str,
    num_classes: int,
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """A timm ViT by name (``deit_small_patch16_224``...), optionally with pretrained weights.

    ``img_size``/``patch_size`` override the architecture for small images (e.g. 32 px CIFAR with
    4 px patches); timm resamples pretrained position and patch embeddings to match.
    ``pretrained_file`` loads timm weights from a local file instead of the hub.
    """
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("deit*"), n=5)
        raise ValueError(f"Unknown timm model {name!r}; did you mean one of {close}? (timm.list_models('*vit*'))")
    overrides = {k: v for k, v in {"img_size": img_size, "patch_size": patch_size}.items() if v is not None}
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file {pretrained_file} does not exist: pass a timm .pth/.safetensors file.")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, **overrides, **kwargs
    )
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer.")
    return model

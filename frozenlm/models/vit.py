"""Vision Transformers from timm, with the overrides small-image experiments need."""

from __future__ import annotations

import difflib
import inspect
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import VisionTransformer

from frozenlm.models.patch_embed import CAPEConfig, PatchEmbedding, Stem

PosEmbed = Literal["learn", "cape"]
# create_vit's arguments that change timm's ViT (stem and positions).
TRUNK_OPTIONS = ("stem", "stem_channels", "stem_strides", "stem_removed_blocks", "pos_embed", "cape")


def create_vit(
    name: str,
    num_classes: int,
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = 0.1,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    stem: Stem = "patch",
    stem_channels: list[int] | None = None,
    stem_strides: list[int] | None = None,
    stem_removed_blocks: int = 1,
    pos_embed: PosEmbed = "learn",
    cape: CAPEConfig | dict | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """A timm ViT by name (``deit_small_patch16_224``...), optionally with pretrained weights.

    ``img_size``/``patch_size`` override the architecture for small images (e.g. 32 px CIFAR with
    4 px patches); timm resamples pretrained position and patch embeddings to match.
    ``pretrained_file`` loads timm weights from a local file instead of the hub.

    ``stem="conv"`` replaces the patchify convolution by a convolutional stem (Xiao et al., 2021;
    channels and strides default to :func:`~frozenlm.models.patch_embed.conv_stem_plan`) and removes
    ``stem_removed_blocks`` transformer blocks from the model's depth (``depth`` in ``kwargs`` or the
    named model's) to keep the FLOPs comparable. ``pos_embed="cape"`` replaces the learned position
    table by CAPE positions (``cape``: their augmentation). Both are timm's ViT with frozenlm's
    :class:`~frozenlm.models.patch_embed.PatchEmbedding` as ``embed_layer``; they train from scratch.
    """
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models("*vit*") + timm.list_models("deit*"), n=5)
        raise ValueError(f"Unknown timm model {name!r}; did you mean one of {close}? (timm.list_models('*vit*'))")
    overrides = {k: v for k, v in {"img_size": img_size, "patch_size": patch_size}.items() if v is not None}
    if pos_embed not in ("learn", "cape"):
        raise ValueError(f"pos_embed is 'learn' (the ViT's table) or 'cape', got {pos_embed!r}.")
    if stem != "patch" or pos_embed == "cape" or stem_channels or stem_strides:  # PatchEmbedding checks them
        if pretrained or pretrained_file is not None:
            raise ValueError(
                "Pretrained timm weights are for the patchify stem and learned positions; stem 'conv' and "
                "pos_embed 'cape' train from scratch: drop --model.pretrained / --model.pretrained_file."
            )
        if isinstance(cape, dict):
            cape = CAPEConfig(**cape)
        embed = {"stem": stem, "stem_channels": stem_channels, "stem_strides": stem_strides}
        embed["cape"] = (cape or CAPEConfig()) if pos_embed == "cape" else None
        kwargs["embed_layer"] = partial(PatchEmbedding, **embed)
        if pos_embed == "cape":
            kwargs["pos_embed"] = "none"
        if stem == "conv" and stem_removed_blocks:
            depth = kwargs.get("depth") or _default_depth(name, **overrides, **kwargs)
            if not 0 <= stem_removed_blocks < depth:
                raise ValueError(f"stem_removed_blocks {stem_removed_blocks} must be in [0, {depth}) for {depth} blocks.")
            kwargs["depth"] = depth - stem_removed_blocks
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


def _default_depth(name: str, **kwargs: Any) -> int:
    """Number of blocks of a timm ViT, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return len(timm.create_model(name, pretrained=False, **kwargs).blocks)


def trunk_options(values: dict[str, Any]) -> dict[str, Any]:
    """The ``TRUNK_OPTIONS`` in ``values`` (e.g. a task's hyper-parameters) that differ from
    ``create_vit``'s defaults: empty for a plain timm ViT."""
    defaults = inspect.signature(create_vit).parameters
    return {k: values[k] for k in TRUNK_OPTIONS if values.get(k, defaults[k].default) != defaults[k].default}

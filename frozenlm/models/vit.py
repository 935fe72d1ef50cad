"""Vision Transformers from timm, with the overrides small-image experiments need."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.models import VisionTransformer

from frozenlm.files import sha256_file
from frozenlm.models.config import FromHParams
from frozenlm.models.patch_embed import CAPEConfig, PatchEmbedding, Stem

PosEmbed = Literal["learn", "cape"]
# create_vit's arguments that change timm's ViT (stem and positions).
TRUNK_OPTIONS = ("stem", "stem_channels", "stem_strides", "stem_removed_blocks", "pos_embed", "cape")


@dataclass
class ViTConfig(FromHParams):
    """A timm ViT trunk as frozenlm builds it: the one set of ViT options every ViT-based model shares (the
    image classifier, UTA's student, learngenes). Field names are the tasks' flat flags (`--model.stem`...).

    Attributes:
        backbone: timm model name (`deit_small_patch16_224`...).
        num_classes: classes of timm's head (0: no head).
        img_size, patch_size: overrides for small images (e.g. 32 and 4 for CIFAR).
        drop_path_rate: stochastic depth.
        pretrained, pretrained_file: timm's pretrained weights (the hub, or a local file).
        stem, stem_channels, stem_strides, stem_removed_blocks: the convolutional stem (see [`create_vit`][frozenlm.models.vit.create_vit]).
        pos_embed, cape: learned positions or CAPE.
        backbone_kwargs: any other timm `create_model` argument (`depth`, `embed_dim`...).
        freeze_trunk: freeze the ViT's trunk (everything but its head): only the head, the last
            `trainable_trunk_blocks` blocks, what `trainable_patterns` names and what is outside the ViT (the LM
            block's adapters, an auxiliary head) train (see `freeze_trunk`).
        trainable_trunk_blocks: with `freeze_trunk`, the last k blocks (and the final norm after them) still train.
        trainable_patterns: with `freeze_trunk`, globs on the ViT's own parameter names (timm's: `pos_embed`,
            `blocks.0.norm1.*`...) that still train.
    """

    backbone: str = "deit_small_patch16_224"
    num_classes: int = 1000
    img_size: int | None = None
    patch_size: int | None = None
    drop_path_rate: float = 0.1
    pretrained: bool = False
    pretrained_file: str | None = None
    stem: Stem = "patch"
    stem_channels: list[int] | None = None
    stem_strides: list[int] | None = None
    stem_removed_blocks: int = 1
    pos_embed: PosEmbed = "learn"
    cape: CAPEConfig | None = None
    backbone_kwargs: dict[str, Any] | None = None
    freeze_trunk: bool = False
    trainable_trunk_blocks: int = 0
    trainable_patterns: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.freeze_trunk and (self.trainable_trunk_blocks or self.trainable_patterns):
            raise ValueError("trainable_trunk_blocks / trainable_patterns choose what of a frozen trunk trains: "
                             "set --model.freeze_trunk true with them.")  # fmt: skip

    def create(self) -> VisionTransformer:
        """The timm ViT (`create_vit`), its trunk frozen with `freeze_trunk`."""
        vit = create_vit(
            self.backbone, self.num_classes, img_size=self.img_size, patch_size=self.patch_size,
            drop_path_rate=self.drop_path_rate, pretrained=self.pretrained, pretrained_file=self.pretrained_file,
            **trunk_options(dataclasses.asdict(self)), **(self.backbone_kwargs or {}),
        )  # fmt: skip
        if self.freeze_trunk:
            freeze_trunk(vit, self.trainable_trunk_blocks, self.trainable_patterns, self.pretrained_file)
        return vit


@dataclass(frozen=True)
class FrozenTrunk:
    """What `freeze_trunk` froze in a ViT (`vit.frozen_trunk`), for checkpoints: the frozen parameters'
    names in the ViT, and the named file their weights came from (its path and SHA-256 when the ViT was built),
    or None (timm's hub weights, or random ones: then the checkpoint keeps them)."""

    names: tuple[str, ...]
    pretrained_file: str | None = None
    sha256: str | None = None


def freeze_trunk(vit: VisionTransformer, trainable_blocks: int = 0, trainable_patterns: list[str] | None = None,
                 pretrained_file: str | None = None) -> FrozenTrunk:  # fmt: skip
    """Freeze a timm ViT's trunk in place: every parameter but the head's (`head.*`), the last
    `trainable_blocks` blocks' and the final norm's after them (`norm.*`, `fc_norm.*`, when
    `trainable_blocks` > 0), and those matching a glob of `trainable_patterns` (on the ViT's own names,
    `fnmatch`-style). The optimizer never sees the frozen ones (it takes parameters that require grad);
    checkpoints (`frozenlm.llm.FrozenLMMixin`) leave them out when they come from `pretrained_file`.
    Sets and returns `vit.frozen_trunk`."""
    depth = len(vit.blocks)
    if not 0 <= trainable_blocks <= depth:
        raise ValueError(f"trainable_trunk_blocks {trainable_blocks} must be in [0, {depth}] for a ViT with {depth} blocks.")
    names = [name for name, _ in vit.named_parameters()]
    patterns = list(trainable_patterns or [])
    unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]
    if unmatched:
        raise ValueError(
            f"trainable_patterns {unmatched} match no parameter of the ViT; its names are timm's, e.g. "
            f"{', '.join(names[:3])}, blocks.0.norm1.weight (globs: blocks.*.norm1.*)."
        )
    trainable = ["head."]
    if trainable_blocks:
        trainable += [f"blocks.{i}." for i in range(depth - trainable_blocks, depth)] + ["norm.", "fc_norm."]
    frozen = []
    for name, parameter in vit.named_parameters():
        if name.startswith(tuple(trainable)) or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        parameter.requires_grad_(False)
        frozen.append(name)
    sha256 = sha256_file(pretrained_file) if pretrained_file is not None else None
    vit.frozen_trunk = FrozenTrunk(tuple(frozen), pretrained_file, sha256)
    return vit.frozen_trunk


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
    """A timm ViT by name (`deit_small_patch16_224`...), optionally with pretrained weights.

    `img_size`/`patch_size` override the architecture for small images (e.g. 32 px CIFAR with
    4 px patches); timm resamples pretrained position and patch embeddings to match.
    `pretrained_file` loads timm weights from a local file instead of the hub.

    `stem="conv"` replaces the patchify convolution by a convolutional stem (Xiao et al., 2021;
    channels and strides default to `conv_stem_plan`) and removes
    `stem_removed_blocks` transformer blocks from the model's depth (`depth` in `kwargs` or the
    named model's) to keep the FLOPs comparable. `pos_embed="cape"` replaces the learned position
    table by CAPE positions (`cape`: their augmentation). Both are timm's ViT with frozenlm's
    `PatchEmbedding` as `embed_layer`; they train from scratch.
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


def prefixed_matcher(matcher: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A timm `group_matcher` (regexes matched at the start of parameter names) for the same module held under
    `prefix` (`"backbone."`): what timm's layer-wise lr decay reads from the module holding it."""
    escaped = re.escape(prefix)

    def wrap(pattern: str) -> str:
        return f"^{escaped}(?:{pattern.removeprefix('^')})"

    return {group: wrap(spec) if isinstance(spec, str) else [(wrap(p), suffix) for p, suffix in spec]
            for group, spec in matcher.items()}  # fmt: skip


def _default_depth(name: str, **kwargs: Any) -> int:
    """Number of blocks of a timm ViT, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return len(timm.create_model(name, pretrained=False, **kwargs).blocks)


def trunk_options(values: dict[str, Any]) -> dict[str, Any]:
    """The `TRUNK_OPTIONS` in `values` (e.g. a task's hyper-parameters) that differ from
    `create_vit`'s defaults: empty for a plain timm ViT."""
    defaults = inspect.signature(create_vit).parameters
    return {k: values[k] for k in TRUNK_OPTIONS if values.get(k, defaults[k].default) != defaults[k].default}

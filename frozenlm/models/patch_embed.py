"""Patch embeddings for timm's ViT: a convolutional stem and CAPE positions, as its `embed_layer`.

* Convolutional stem (Xiao et al., "Early convolutions help transformers see better", NeurIPS 2021):
  the 16x16 patchify convolution becomes 3x3 convolutions (no bias) + BatchNorm + ReLU whose strides
  multiply to the patch size, then a 1x1 convolution (with bias) to the width.
* CAPE (Likhomanenko et al., "CAPE: encoding relative positions with continuous augmented positional
  embeddings", NeurIPS 2021): sinusoidal 2-d positions of the patch centres on a [-1, 1] grid,
  augmented in training only (global shift, local shift, global scale), so there is no table to
  resample and any input resolution works.

`PatchEmbedding` is timm's `PatchEmbed` with either or both; `frozenlm.models.create_vit`
passes it to `timm.create_model(..., embed_layer=...)` so the rest of the ViT is timm's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, Format, PatchEmbed

Stem = Literal["patch", "conv"]

# Xiao et al.'s 3x3 convolutions for 16 px patches: the stem of their 18 GF model (width 768), which
# their 36 GF model (width 1024) reuses. Their smaller stems have widths d/8, d/4, d/2, d for width d
# (ViT-T-like 24..192, ViT-S-like 48..384), all with stride 2.
BASE_PLAN = ((64, 128, 128, 256, 256, 512), (2, 2, 1, 2, 1, 2))


def conv_stem_plan(embed_dim: int, patch_size: int) -> tuple[list[int], list[int]]:
    """Default `(channels, strides)` of the 3x3 convolutions for a ViT of this width and patch size.

    Widths 768 and 1024 get the paper's 18 GF stem (its 36 GF model reuses it), other widths `d/8,
    d/4, d/2, d`. For patches other than
    16 px (e.g. 4 px on 32 px CIFAR images) the first `log2(patch_size)` stride-2 convolutions keep
    stride 2 and the others get stride 1.
    """
    if embed_dim in (768, 1024):
        channels, paper_strides = map(list, BASE_PLAN)
    elif embed_dim % 8 == 0:
        channels, paper_strides = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim], [2, 2, 2, 2]
    else:
        raise ValueError(
            f"No built-in convolutional stem for width {embed_dim} (not a multiple of 8): pass "
            "--model.stem_channels and --model.stem_strides."
        )
    halvings = math.log2(patch_size) if patch_size > 0 else -1
    if halvings != int(halvings) or halvings > paper_strides.count(2):
        raise ValueError(
            f"The built-in convolutional stems reach patch sizes 1, 2, 4, 8 or 16, not {patch_size}: pass "
            "--model.stem_strides (3x3 convolution strides whose product is the patch size) and "
            "--model.stem_channels."
        )
    strides, left = [], int(halvings)
    for stride in paper_strides:
        keep = stride == 2 and left > 0
        left -= keep
        strides.append(2 if keep else 1)
    return channels, strides


def conv_stem(
    in_chans: int, embed_dim: int, channels: list[int], strides: list[int], bias: bool = True
) -> nn.Sequential:
    """3x3 convolution (no bias) + BatchNorm + ReLU per entry of `channels`/`strides`, then a 1x1
    convolution (with bias) to `embed_dim`: `[B, in_chans, H, W] -> [B, embed_dim, H/p, W/p]`."""
    layers: list[nn.Module] = []
    for out_chans, stride in zip(channels, strides, strict=True):
        layers.append(ConvNormAct(in_chans, out_chans, kernel_size=3, stride=stride, bias=False, act_layer=nn.ReLU))
        in_chans = out_chans
    layers.append(nn.Conv2d(in_chans, embed_dim, kernel_size=1, bias=bias))
    return nn.Sequential(*layers)


@dataclass
class CAPEConfig:
    """CAPE's training-time augmentation of the patch positions; the defaults are the paper's maxima.

    Attributes:
        max_global_shift: each sample's positions move by `U(-m, m)` along each axis.
        max_local_shift: each patch's position moves by `U(-m, m)` grid spacings along each axis.
        max_global_scaling: each sample's positions are scaled by `exp(U(-log m, log m))`.
    """

    max_global_shift: float = 0.5
    max_local_shift: float = 0.5
    max_global_scaling: float = 1.4

    def __post_init__(self) -> None:
        if self.max_global_shift < 0 or self.max_local_shift < 0 or self.max_global_scaling < 1:
            raise ValueError(f"CAPE needs shifts >= 0 and max_global_scaling >= 1, got {self}.")


class CAPE2d(nn.Module):
    """Sinusoidal 2-d position embeddings of a patch grid, augmented in training (CAPE).

    Patch centres lie on a `[-1, 1] x [-1, 1]` grid whatever the grid size. Channel `k` of the
    `dim / 2` cosine and sine pairs has the frequency vector `10^((k+1)/(dim/2)) * (cos k, sin k)`
    (the paper's 2-d embedding), so each pair sees the positions along a different direction.

    Which magnitudes: versions of the reference code differ, `10^((k+1)/(dim/2))` (magnitudes from
    `10^(2/dim)` to 10, used here) or `10^linspace(0, 1, dim/2)` (from 1 to 10). Both span one
    decade and differ by at most a factor `10^(2/dim)` (1.2 % at width 384). We keep the first: the
    frequencies are not stored in checkpoints, so changing them would move the positions of every
    CAPE model already trained.
    """

    def __init__(self, dim: int, config: CAPEConfig | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"CAPE needs an even embedding width, got {dim}.")
        self.config = config or CAPEConfig()
        half = dim // 2
        k = torch.arange(half, dtype=torch.float64)
        rho = 10 ** ((k + 1) / half)
        # Not in the state dict: a function of `dim` alone.
        self.register_buffer("frequencies", torch.stack([rho * k.cos(), rho * k.sin()], -1).float(), persistent=False)

    def grid(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Unaugmented positions `[H, W, 2]` (x, y) of the patch centres on `[-1, 1]`."""
        # One patch sits at the centre; more span [-1, 1] end to end.
        y, x = (torch.linspace(-1, 1, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in (height, width))
        return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)

    def positions(self, batch: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Positions `[B, H, W, 2]`: the grid, augmented per sample and per patch in training."""
        grid = self.grid(height, width, device).expand(batch, height, width, 2)
        if not self.training:
            return grid
        c = self.config
        spacing = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=device)
        global_shift = (torch.rand(batch, 1, 1, 2, device=device) * 2 - 1) * c.max_global_shift
        local_shift = (torch.rand(batch, height, width, 2, device=device) * 2 - 1) * c.max_local_shift * spacing
        log_scale = (torch.rand(batch, 1, 1, 1, device=device) * 2 - 1) * math.log(c.max_global_scaling)
        return (grid + global_shift + local_shift) * log_scale.exp()

    def embed(self, positions: torch.Tensor) -> torch.Tensor:
        """`[..., 2]` positions -> `[..., dim]` embeddings (cosines, then sines), in float32."""
        # Elementwise, not a matmul: autocast would run that in bf16 and round phases of ~100 rad by ~0.5.
        x, y = positions.float().unsqueeze(-1).unbind(-2)
        frequencies = self.frequencies.float()
        phase = math.pi * (x * frequencies[:, 0] + y * frequencies[:, 1])
        return torch.cat([phase.cos(), phase.sin()], dim=-1)

    def forward(self, batch: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Embeddings `[B, H, W, dim]` of a `height x width` patch grid."""
        return self.embed(self.positions(batch, height, width, device))


class PatchEmbedding(PatchEmbed):
    """timm's `PatchEmbed` with a convolutional stem (`stem="conv"`) and/or CAPE positions.

    Pass it to timm's ViT as `embed_layer` (`functools.partial` with these options); with CAPE the
    ViT is built with `pos_embed="none"` and the positions are added here, to the patch tokens only
    (the class token has none). Without either option it is exactly timm's `PatchEmbed`.

    Args:
        stem: `patch` (timm's patchify convolution) or `conv`.
        stem_channels: output channels of the stem's 3x3 convolutions (default `conv_stem_plan`).
        stem_strides: their strides, multiplying to the patch size.
        cape: CAPE positions (None: the ViT's own position embedding).
        **kwargs: timm `PatchEmbed` arguments (the ViT passes them).
    """

    def __init__(
        self,
        *,
        stem: Stem = "patch",
        stem_channels: list[int] | None = None,
        stem_strides: list[int] | None = None,
        cape: CAPEConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if cape is not None:
            kwargs["strict_img_size"] = False  # no position table: any resolution (a multiple of the patch)
        super().__init__(**kwargs)
        embed_dim = self.proj.out_channels
        if stem == "conv":
            patch = self.patch_size[0]
            if self.patch_size[1] != patch:
                raise ValueError(f"The convolutional stem needs square patches, got {self.patch_size}.")
            if stem_channels is None and stem_strides is None:
                stem_channels, stem_strides = conv_stem_plan(embed_dim, patch)
            if stem_channels is None or stem_strides is None or len(stem_channels) != len(stem_strides):
                raise ValueError(
                    f"stem_channels {stem_channels} and stem_strides {stem_strides} must both be given, one "
                    "stride per convolution."
                )
            if math.prod(stem_strides) != patch:
                raise ValueError(
                    f"stem_strides {stem_strides} multiply to {math.prod(stem_strides)}, not the patch size {patch}."
                )
            bias = self.proj.bias is not None
            self.proj = conv_stem(self.proj.in_channels, embed_dim, stem_channels, stem_strides, bias=bias)
        elif stem != "patch" or stem_channels is not None or stem_strides is not None:
            raise ValueError(f"stem is 'patch' or 'conv' (stem_channels/stem_strides need 'conv'), got {stem!r}.")
        self.cape = None if cape is None else CAPE2d(embed_dim, cape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(x)
        if self.cape is None:
            return tokens
        height, width = self.dynamic_feat_size(tuple(x.shape[-2:]))
        positions = self.cape(len(x), height, width, x.device).to(tokens.dtype)  # [B, H, W, C]
        if self.flatten:
            positions = positions.flatten(1, 2)
        elif self.output_fmt == Format.NCHW:
            positions = positions.permute(0, 3, 1, 2)
        elif self.output_fmt != Format.NHWC:
            raise ValueError(f"CAPE supports the NLC, NCHW and NHWC token layouts, not {self.output_fmt}.")
        return tokens + positions

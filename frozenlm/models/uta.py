"""UTA's student (Unmasked Token Alignment; Liu et al., TMLR 2024): a timm ViT that runs on CLS and the kept
patches of an image only, with the heads that carry its tokens to a CLIP teacher's width and, optionally, its
CLS into the teacher's joint image-text space. A plain `nn.Module`: the recipe (masks, the teacher, the
alignment loss, zero-shot evaluation) is [`UnmaskedTokenAlignment`][frozenlm.tasks.UnmaskedTokenAlignment].

A frozen LM block runs after ViT block `llm_position`: inline (LM4VE) in the token path, or as GCR's
auxiliary branch, whose tokens [`UTAStudent.forward`][frozenlm.models.uta.UTAStudent.forward] returns beside the student's (training only) and
[`UTAStudent.project_branch`][frozenlm.models.uta.UTAStudent.project_branch] carries to the teacher's width: through a norm and projection of the
branch's own (`llm.aux_head: separate`) or the student's final norm and `projection` (`shared`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models.vit import ViTConfig

Projection = Literal["auto", "linear", "mlp", "none"]


def vit_base_trunk() -> ViTConfig:
    """The default trunk of [`UTAStudentConfig`][frozenlm.models.UTAStudentConfig]: a ViT-B/16 without a head."""
    return ViTConfig(backbone="vit_base_patch16_224", num_classes=0)


@dataclass
class UTAStudentConfig:
    """UTA's student.

    Attributes:
        vit: the ViT trunk ([`ViTConfig`][frozenlm.models.ViTConfig]; its head is dropped: `num_classes` 0). Its
            patch grid must be square (the teacher's is).
        teacher_width: the width of the teacher's tokens, which `projection` maps the student's to.
        joint_dim: the teacher's joint image-text space, which the `own` zero-shot head maps the CLS into.
        llm, llm_position: a frozen LM block after ViT block `llm_position` (negative: from the end), as
            [`ImageClassifier`][frozenlm.tasks.ImageClassifier]'s; None for none.
        projection: the head from the student's tokens to the teacher's width: `auto` (linear when the widths
            differ, none when equal), `linear`, `mlp` (Linear-GELU-Linear) or `none`.
        zeroshot_head: how the student's CLS reaches the joint space: `teacher` (through `projection` and
            then the teacher's projection, outside this module) or `own` (UTA's: `joint_head`, a linear head
            of the student's, trunc-normal 0.02 initialised).
    """

    vit: ViTConfig = field(default_factory=vit_base_trunk)
    teacher_width: int = 768
    joint_dim: int | None = None
    llm: LLMConfig | None = None
    llm_position: int = -1
    projection: Projection = "auto"
    zeroshot_head: Literal["teacher", "own"] = "teacher"


class UTAStudent(nn.Module):
    """The student: `backbone` (a timm ViT without head), `projection` (to the teacher's width), `llm_block`
    (a frozen LM block, or None), `joint_head` (`zeroshot_head: own`) and `aux_head` (GCR, `separate`).

    `model(images, keep)`: `(tokens, branch)`, the student's final tokens (after its final norm) of CLS and the
    patches at `keep`, and GCR's branch (the LM block's tokens, training only; else None).
    """

    def __init__(self, config: UTAStudentConfig) -> None:
        super().__init__()
        self.config = config
        self.llm_config = LLMConfig(**config.llm) if isinstance(config.llm, dict) else config.llm
        vit = config.vit if isinstance(config.vit, ViTConfig) else ViTConfig(**config.vit)
        self.backbone = dataclasses.replace(vit, num_classes=0).create()
        self.grid = tuple(self.backbone.patch_embed.grid_size)
        if self.grid[0] != self.grid[1]:
            raise ValueError(f"The student's patch grid {self.grid} is not square; the teacher's is.")
        width, depth = self.backbone.embed_dim, len(self.backbone.blocks)
        self.projection = token_projection(config.projection, width, config.teacher_width)
        if not -depth <= config.llm_position < depth:
            raise IndexError(f"llm_position {config.llm_position} is out of range for a ViT with {depth} blocks.")
        self.llm_position = config.llm_position % depth
        self.llm_block = create_block(self.llm_config, width)
        if config.zeroshot_head == "own":  # UTA's: the student's own head into the joint space
            if config.joint_dim is None:
                raise ValueError("zeroshot_head 'own' needs the teacher's joint_dim.")
            self.joint_head = nn.Linear(width, config.joint_dim)
            nn.init.trunc_normal_(self.joint_head.weight, std=0.02)
            nn.init.zeros_(self.joint_head.bias)
        llm = self.llm_config
        if llm is not None and llm.mode == "auxiliary" and llm.aux_head == "separate":  # GCR's branch, its own head
            self.aux_head = nn.Sequential(nn.LayerNorm(width), token_projection(config.projection, width, config.teacher_width))

    def forward(self, images: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """`images [B, 3, H, W]`, `keep [B, K]` (patch indices; None: all) -> `(tokens [B, 1 + K, D], branch)`.
        Masked patches never enter the transformer; the LM block runs after block `llm_position`."""
        vit = self.backbone
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        if keep is not None:
            prefix = vit.num_prefix_tokens
            patches = tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
        branch = None
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index == self.llm_position:
                tokens, branch = apply_block(self.llm_block, tokens)
        return vit.norm(tokens), branch

    def project_branch(self, branch: Tensor) -> Tensor:
        """GCR's branch tokens at the teacher's width: its own norm and projection (`aux_head`), or the student's
        final norm and `projection` (`llm.aux_head: shared`)."""
        if hasattr(self, "aux_head"):
            return self.aux_head(branch)
        return self.projection(self.backbone.norm(branch))


def token_projection(kind: Projection, width: int, teacher_width: int) -> nn.Module:
    """The map from the student's width to the teacher's (`projection`)."""
    if kind == "none" or (kind == "auto" and width == teacher_width):
        if width != teacher_width:
            raise ValueError(f"projection 'none' needs the student's width {width} to be the teacher's {teacher_width}.")
        return nn.Identity()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, teacher_width))
    return nn.Linear(width, teacher_width)

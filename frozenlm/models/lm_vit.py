"""A timm ViT with a frozen LM block after one of its blocks: LM4VE (Pang et al., ICLR 2024) and GCR (Bai et al.,
AAAI 2025), optionally with its blocks decomposed into learngenes (Lin et al., NeurIPS 2024; TLEG, AAAI 2024).

    images -> patch embedding -> positions -> ViT blocks 0 .. p -> [frozen LM block] -> ViT blocks p+1 .. L-1
           -> final norm -> head

`LMViT.forward_features` is that loop, written out; `apply_block` runs where the block goes (block `p` =
`llm_position`). Inline (LM4VE), the tokens go through the block; auxiliary (GCR), the tokens after block `p`
also go through the block as a training-only branch, returned beside the tokens for the auxiliary head. A plain
module: build it without Lightning, `LMViT(LMViTConfig(vit=ViTConfig(...), llm=LLMConfig(...)))`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from frozenlm.llm import LLMConfig, apply_block, create_block
from frozenlm.models.learngene import LearngeneConfig, Learngenes
from frozenlm.models.vit import ViTConfig, prefixed_matcher


@dataclass
class LMViTConfig:
    """An [`LMViT`][frozenlm.models.lm_vit.LMViT].

    Attributes:
        vit: the timm ViT trunk (its fields are the image task's flat flags: `--model.backbone`, `--model.stem`...).
        llm: the frozen LM block (its `mode`: inline for LM4VE, auxiliary for GCR); None for the plain ViT.
        llm_position: the ViT block after which the LM block runs (-1: the last, before the final norm).
        learngene: the ViT's blocks as combinations of shared genes; None for an ordinary ViT.
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    llm: LLMConfig | None = None
    llm_position: int = -1
    learngene: LearngeneConfig | None = None

    def __post_init__(self) -> None:  # dicts (a checkpoint's hyper-parameters, YAML) become their configs
        if isinstance(self.vit, Mapping):
            self.vit = ViTConfig(**self.vit)
        if isinstance(self.llm, Mapping):
            self.llm = LLMConfig(**self.llm)
        if isinstance(self.learngene, Mapping):
            self.learngene = LearngeneConfig(**self.learngene)

    @classmethod
    def from_hparams(cls, values: Mapping[str, Any]) -> LMViTConfig:
        """The config from an image task's hyper-parameters (the flat ViT flags, `llm`, `llm_position`,
        `learngene`)."""
        return cls(vit=ViTConfig.from_hparams(dict(values)), llm=values.get("llm"),
                   llm_position=values.get("llm_position", -1), learngene=values.get("learngene"))  # fmt: skip


class LMViT(nn.Module):
    """A timm ViT (`backbone`) with a frozen LM block (`llm_block`) after ViT block `llm_position`, GCR's
    auxiliary head (`aux_head`, with `llm.aux_head: separate`) and learngenes (`learngenes`)."""

    def __init__(self, config: LMViTConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = config.vit.create()
        depth, dim = len(self.backbone.blocks), self.backbone.embed_dim
        if config.learngene is not None and config.vit.freeze_trunk:
            raise ValueError("freeze_trunk freezes the ViT's own weights; a decomposed ViT (learngene) computes its "
                             "blocks from genes: drop --model.freeze_trunk or --model.learngene.")  # fmt: skip
        self.learngenes = None if config.learngene is None else Learngenes(self.backbone.blocks, config.learngene)
        if not -depth <= config.llm_position < depth:
            raise IndexError(f"llm_position {config.llm_position} is out of range for a ViT with {depth} blocks.")
        self.llm_position = config.llm_position % depth
        self.llm_config = config.llm
        self.llm_block = create_block(config.llm, dim)
        self.aux_head = None
        if self.llm_block is not None and config.llm.mode == "auxiliary" and config.llm.aux_head == "separate":
            self.aux_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, config.vit.num_classes))

    def run_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """ViT block `index` on the tokens; a decomposed ViT's block with the parameters its genes compose."""
        block = self.backbone.blocks[index]
        if self.learngenes is None:
            return block(tokens)
        return functional_call(block, self.learngenes.compose(index), (tokens,))

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(tokens, branch)`: the final-normed tokens `[B, N, D]` (prefix tokens first) and GCR's branch, the
        LM block's output on the tokens after block `llm_position` (training only; None otherwise)."""
        vit = self.backbone
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        branch = None
        for index in range(len(vit.blocks)):
            tokens = self.run_block(index, tokens)
            if index == self.llm_position:
                tokens, branch = apply_block(self.llm_block, tokens)
        return vit.norm(tokens), branch

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ViT's head (pooling, classifier) on final-normed tokens: logits `[B, classes]`."""
        return self.backbone.forward_head(tokens)

    def forward_aux_head(self, branch: torch.Tensor) -> torch.Tensor:
        """GCR's auxiliary logits of the branch's tokens: its own norm and classifier (`llm.aux_head: separate`),
        or the ViT's final norm and head (`shared`), pooled as the ViT pools."""
        if self.aux_head is None:
            return self.forward_head(self.backbone.norm(branch))
        return self.aux_head(self.backbone.pool(branch))

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The ViT's layer groups (timm's), for layer-wise lr decay; what is not the ViT's (the LM block's adapters,
        the auxiliary head) is in the last group, at the full lr."""
        return prefixed_matcher(self.backbone.group_matcher(coarse), "backbone.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, classes]` of `images [B, 3, H, W]`."""
        tokens, _ = self.forward_features(images)
        return self.forward_head(tokens)

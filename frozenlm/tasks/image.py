"""Image classification with a ViT and a frozen LM block (LM4VE, Pang et al., ICLR 2024; GCR, AAAI 2025)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from frozenlm.checkpoints import load_initial_weights, model_state, read_weights
from frozenlm.llm import LLMConfig
from frozenlm.models.learngene import LearngeneConfig, from_genes, learngene_for
from frozenlm.models.lm_vit import LMViT, LMViTConfig
from frozenlm.models.patch_embed import CAPEConfig, Stem
from frozenlm.models.vit import PosEmbed, prefixed_matcher
from frozenlm.tasks.classification import ClassificationTask
from frozenlm.tasks.distillation import DistillConfig


class ImageClassifier(ClassificationTask):
    """A timm ViT whose token sequence passes through a frozen LM block after ViT block `llm_position`
    (the model: [`LMViT`][frozenlm.models.lm_vit.LMViT], `self.model`).

    With the default `llm_position=-1` this is the LM4VE model: ViT blocks -> Linear -> frozen LM
    block -> Linear -> the ViT's final norm -> head, all tokens (CLS + patches) through the block.
    With `llm.mode: auxiliary` it is GCR: the tokens after block `llm_position` also go through
    Linear -> frozen LM block -> Linear -> an auxiliary head during training, the loss is
    `loss_main + llm.aux_weight * loss_aux`, and inference is the plain ViT.
    `llm: null` gives the plain ViT baseline with the same recipe.

    Args:
        backbone: timm model name (`deit_tiny/small/base_patch16_224` in the paper).
        num_classes: number of classes (linked from the datamodule by the CLI).
        img_size: input size override (e.g. 32 for CIFAR).
        patch_size: patch size override (e.g. 4 for 32 px images).
        pretrained: start from timm's pretrained weights (needs the hub or a cache).
        pretrained_file: start from timm weights in a local file.
        drop_path_rate: stochastic depth (DeiT: 0.1).
        backbone_kwargs: further timm `create_model` arguments (`depth`, `embed_dim`, ...).
        freeze_trunk: freeze the ViT's trunk (a pretrained ViT kept as it is): only its head, the LM block's
            adapters, GCR's auxiliary head, the last `trainable_trunk_blocks` blocks and what
            `trainable_patterns` names train; the optimizer holds nothing else. Checkpoints leave the frozen
            weights out when they come from `pretrained_file` (recording its SHA-256, checked on load).
        trainable_trunk_blocks: with `freeze_trunk`: the last k ViT blocks (and the final norm) still train.
        trainable_patterns: with `freeze_trunk`: globs on the ViT's own parameter names (`pos_embed`,
            `blocks.*.norm1.*`) that still train.
        stem: `patch` (the ViT's patchify convolution) or `conv`: a convolutional stem (Xiao et
            al., NeurIPS 2021) of 3x3 convolutions + BatchNorm + ReLU and a 1x1 convolution, with
            `stem_removed_blocks` fewer transformer blocks (see [`create_vit`][frozenlm.models.create_vit]).
        stem_channels: the conv stem's 3x3 convolution widths (default: the paper's plan for the width).
        stem_strides: their strides, multiplying to the patch size (default: the paper's plan).
        stem_removed_blocks: transformer blocks the conv stem replaces (the paper: 1).
        pos_embed: `learn` (the ViT's learned table) or `cape`: continuous augmented positions
            (Likhomanenko et al., NeurIPS 2021), augmented in training only, any input resolution.
        cape: CAPE's augmentation maxima (see `CAPEConfig`).
        learngene: decompose the ViT's blocks into learngenes (Lin et al., NeurIPS 2024; TLEG): every
            block's parameters are fixed combinations of `genes` shared components (see
            [`LearngeneConfig`][frozenlm.models.learngene.LearngeneConfig]); None for an ordinary ViT.
        init_from: start from these weights (a frozenlm `.ckpt`, or a `.safetensors` from `frozenlm
            recompose` / `frozenlm export`); the LM block's adapters, the auxiliary head and genes
            the file lacks keep their initialisation. A UTA checkpoint ([`UnmaskedTokenAlignment`][frozenlm.tasks.UnmaskedTokenAlignment])
            gives its student's trunk; the classification head starts fresh. Not stored in checkpoints (their weights are).
            A decomposed model's weights start a plain ViT of this model's depth from its genes (as
            `frozenlm recompose` would), or a decomposed one with its first genes (its basis must be
            the model's `learngene.basis`, which follows the file's when unset).
        init_genes: with a decomposed `init_from`: use its first this many genes (None: all).
        init_head: load `init_from`'s classification head; False: the head starts fresh (TLEG's
            descendants on a dataset other than their learngenes', whose classes differ).
        distill: train against a frozen teacher's logits too (see
            `DistillConfig`); None for none.
        llm: the frozen LM block (see [`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        llm_position: index of the ViT block after which the LM block runs (-1: after the last,
            before the final norm; 0: the paper's "head" ablation; depth // 2: "middle").
        label_smoothing: label smoothing (DeiT: 0.1).
        mixup: mixup alpha (DeiT: 0.8); 0 disables.
        cutmix: cutmix alpha (DeiT: 1.0); 0 disables.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        **kwargs: optimisation recipe, see [`BaseTask`][frozenlm.tasks.BaseTask] (lr, weight_decay,
            warmup_epochs, min_lr, ...).

    Examples:
        >>> from frozenlm.tasks import ImageClassifier
        >>> task = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=100, img_size=32, patch_size=4)
        >>> model = ImageClassifier.build_model(dict(task.hparams))  # the plain nn.Module it trains

        From the command line, a shipped config: `frozenlm fit --config configs/cifar100_deit.yaml`.
    """

    input_key = "image"
    ignore = ("init_from", "init_genes", "init_head")

    def __init__(
        self,
        backbone: str = "deit_small_patch16_224",
        num_classes: int = 1000,
        img_size: int | None = None,
        patch_size: int | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.1,
        backbone_kwargs: dict[str, Any] | None = None,
        freeze_trunk: bool = False,
        trainable_trunk_blocks: int = 0,
        trainable_patterns: list[str] | None = None,
        stem: Stem = "patch",
        stem_channels: list[int] | None = None,
        stem_strides: list[int] | None = None,
        stem_removed_blocks: int = 1,
        pos_embed: PosEmbed = "learn",
        cape: CAPEConfig | None = None,
        learngene: LearngeneConfig | None = None,
        init_from: str | None = None,
        init_genes: int | None = None,
        init_head: bool = True,
        distill: DistillConfig | None = None,
        llm: LLMConfig | None = None,
        llm_position: int = -1,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_switch_prob: float = 0.5,
        **kwargs: Any,
    ) -> None:
        # The weights are read before the model is built: a decomposed model takes its basis from them.
        state, stored = read_weights(init_from) if init_from is not None else ({}, {})
        state = model_state(state)  # a checkpoint's model.* keys (older ones: backbone.*...) as the model names them
        if learngene is not None:
            learngene = learngene_for(learngene, state, stored, init_from, init_genes)
        super().__init__(**kwargs)
        if learngene is not None:  # the CLI saves its own config (basis unset): store the resolved one
            self.hparams["learngene"] = dataclasses.asdict(learngene)
            self.model.config.learngene = learngene
            self.model.learngenes.use_basis(learngene.basis)
        if init_from is not None:
            self.start_from(state, stored, init_from, init_genes, init_head)
            # A trunk frozen from --model.pretrained_file now holds init_from's weights, not the file's:
            # checkpoints keep them (as for hub or random weights) instead of naming a file that no longer matches.
            for trunk in self.frozen_trunks().values():
                trunk.frozen_trunk = dataclasses.replace(trunk.frozen_trunk, pretrained_file=None, sha256=None)

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> LMViT:
        """The model of these hyper-parameters (the flat ViT flags, `llm`, `llm_position`, `learngene`)."""
        return LMViT(LMViTConfig.from_hparams(hparams))

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def start_from(self, state: dict[str, torch.Tensor], stored: dict[str, Any], source: str, genes: int | None,
                   head: bool) -> None:  # fmt: skip
        """`--model.init_from`: the model starts from `state` (in the model's names); the LM block's adapters,
        the auxiliary head and genes the file lacks keep their initialisation."""
        optional = ("llm_block.", "aux_", "learngenes.genes.")
        if "teacher" in stored:  # a UTA pretraining checkpoint: its student's trunk; the head starts fresh
            state = {k: v for k, v in state.items() if k.startswith(("backbone.", "llm_block."))}
            optional += ("backbone.head.",)
        if not head:
            state = {k: v for k, v in state.items() if not k.startswith(("backbone.head.", "head."))}
            optional += ("backbone.head.",)
        decomposed, depth = self.model.learngenes is not None, len(self.model.backbone.blocks)
        load_initial_weights(self.model, from_genes(state, stored, genes, source, decomposed, depth), source, optional)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The model's layer groups, for `--model.layer_decay` (timm's layer-wise lr decay reads them)."""
        return prefixed_matcher(self.model.group_matcher(coarse), "model.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

"""Image classification with a ViT and a frozen LM block (LM4VE, Pang et al., ICLR 2024; GCR, AAAI 2025)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from frozenlm.checkpoints import InitialWeightsError, load_initial_weights, read_weights
from frozenlm.llm import LLMConfig
from frozenlm.models import create_vit
from frozenlm.models.learngene import (
    DEFAULT_BASIS, LearngeneConfig, Learngenes, gene_state, genes_in, recompose_blocks, stored_learngene,
)  # fmt: skip
from frozenlm.models.patch_embed import CAPEConfig, Stem
from frozenlm.models.vit import PosEmbed, trunk_options
from frozenlm.tasks.classification import ClassificationTask
from frozenlm.tasks.distillation import DistillConfig


class ImageClassifier(ClassificationTask):
    """A timm ViT whose token sequence passes through a frozen LM block after ViT block ``llm_position``.

    With the default ``llm_position=-1`` this is the LM4VE model: ViT blocks -> Linear -> frozen LM
    block -> Linear -> the ViT's final norm -> head, all tokens (CLS + patches) through the block.
    With ``llm.mode: auxiliary`` it is GCR: the tokens after block ``llm_position`` also go through
    Linear -> frozen LM block -> Linear -> an auxiliary head during training, the loss is
    ``loss_main + llm.aux_weight * loss_aux``, and inference is the plain ViT.
    ``llm: null`` gives the plain ViT baseline with the same recipe.

    Args:
        backbone: timm model name (``deit_tiny/small/base_patch16_224`` in the paper).
        num_classes: number of classes (linked from the datamodule by the CLI).
        img_size: input size override (e.g. 32 for CIFAR).
        patch_size: patch size override (e.g. 4 for 32 px images).
        pretrained: start from timm's pretrained weights (needs the hub or a cache).
        pretrained_file: start from timm weights in a local file.
        drop_path_rate: stochastic depth (DeiT: 0.1).
        backbone_kwargs: further timm ``create_model`` arguments (``depth``, ``embed_dim``, ...).
        stem: ``patch`` (the ViT's patchify convolution) or ``conv``: a convolutional stem (Xiao et
            al., NeurIPS 2021) of 3x3 convolutions + BatchNorm + ReLU and a 1x1 convolution, with
            ``stem_removed_blocks`` fewer transformer blocks (see :func:`frozenlm.models.create_vit`).
        stem_channels: the conv stem's 3x3 convolution widths (default: the paper's plan for the width).
        stem_strides: their strides, multiplying to the patch size (default: the paper's plan).
        stem_removed_blocks: transformer blocks the conv stem replaces (the paper: 1).
        pos_embed: ``learn`` (the ViT's learned table) or ``cape``: continuous augmented positions
            (Likhomanenko et al., NeurIPS 2021), augmented in training only, any input resolution.
        cape: CAPE's augmentation maxima (see :class:`frozenlm.models.patch_embed.CAPEConfig`).
        learngene: decompose the ViT's blocks into learngenes (Lin et al., NeurIPS 2024; TLEG): every
            block's parameters are fixed combinations of ``genes`` shared components (see
            :class:`frozenlm.models.learngene.LearngeneConfig`); None for an ordinary ViT.
        init_from: start from these weights (a frozenlm ``.ckpt``, or a ``.safetensors`` from ``frozenlm
            recompose`` / ``frozenlm export``); the LM block's adapters, the auxiliary head and genes
            the file lacks keep their initialisation. A UTA checkpoint (:class:`frozenlm.tasks.UnmaskedTokenAlignment`)
            gives its student's trunk; the classification head starts fresh. Not stored in checkpoints (their weights are).
            A decomposed model's weights start a plain ViT of this model's depth from its genes (as
            ``frozenlm recompose`` would), or a decomposed one with its first genes (its basis must be
            the model's ``learngene.basis``, which follows the file's when unset).
        init_genes: with a decomposed ``init_from``: use its first this many genes (None: all).
        init_head: load ``init_from``'s classification head; False: the head starts fresh (TLEG's
            descendants on a dataset other than their learngenes', whose classes differ).
        distill: train against a frozen teacher's logits too (see
            :class:`frozenlm.tasks.distillation.DistillConfig`); None for none.
        llm: the frozen LM block (see :class:`frozenlm.llm.LLMConfig`); None for none.
        llm_position: index of the ViT block after which the LM block runs (-1: after the last,
            before the final norm; 0: the paper's "head" ablation; depth // 2: "middle").
        label_smoothing: label smoothing (DeiT: 0.1).
        mixup: mixup alpha (DeiT: 0.8); 0 disables.
        cutmix: cutmix alpha (DeiT: 1.0); 0 disables.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        **kwargs: optimisation recipe, see :class:`frozenlm.tasks.BaseTask` (lr, weight_decay,
            warmup_epochs, min_lr, ...).
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
        if learngene is not None:
            learngene = learngene_for(learngene, state, stored, init_from, init_genes)
        super().__init__(**kwargs)
        if learngene is not None:  # the CLI saves its own config (basis unset): store the resolved one
            self.hparams["learngene"] = dataclasses.asdict(learngene)
            self.learngenes.use_basis(learngene.basis)
        if init_from is not None:
            optional = ("llm_block.", "aux_", "learngenes.genes.")
            if "teacher" in stored:  # a UTA pretraining checkpoint: its student's trunk; the head starts fresh
                state = {k.removeprefix("model."): v for k, v in state.items()  # (its student: model.backbone..., once backbone...)
                         if k.removeprefix("model.").startswith(("backbone.", "llm_block."))}  # fmt: skip
                optional += ("backbone.head.",)
            if not init_head:
                state = {k: v for k, v in state.items() if not k.startswith(("backbone.head.", "head."))}
                optional += ("backbone.head.",)
            load_initial_weights(self, self.from_genes(state, stored, init_genes, init_from), init_from, optional)

    def from_genes(self, state: dict[str, torch.Tensor], stored: dict[str, Any], count: int | None, source: str) -> dict:
        """``state`` with a decomposed model's genes turned into what this model takes: its first ``count``
        genes, recomposed into this ViT's blocks when this model is not decomposed."""
        genes = genes_in(state)
        if not genes:
            return state
        count = len(genes) if count is None else count
        if not 1 <= count <= len(genes):
            raise InitialWeightsError(f"--model.init_genes must be in [1, {len(genes)}] for {source}, got {count}.")
        kept = {k: v for k, v in state.items() if not k.startswith("learngenes.")}
        if self.learngenes is not None:
            return kept | gene_state(genes[:count])
        basis, _ = stored_learngene(stored)
        if basis is None:
            raise InitialWeightsError(f"--model.init_from {source} holds learngenes but does not say their basis "
                                      "(learngene_basis): write it with `frozenlm recompose --tied true`.")  # fmt: skip
        blocks = recompose_blocks(genes[:count], basis, len(self.backbone.blocks))
        return kept | {f"backbone.{key}": value for key, value in blocks.items()}

    def configure_models(self) -> None:
        hp = self.hparams
        self.backbone = create_vit(
            hp.backbone, hp.num_classes, img_size=hp.img_size, patch_size=hp.patch_size,
            drop_path_rate=hp.drop_path_rate, pretrained=hp.pretrained, pretrained_file=hp.pretrained_file,
            **trunk_options(hp), **(hp.backbone_kwargs or {}),
        )  # fmt: skip
        self.learngenes = None
        if hp.learngene is not None:
            config = hp.learngene if isinstance(hp.learngene, LearngeneConfig) else LearngeneConfig(**hp.learngene)
            self.learngenes = Learngenes(self.backbone.blocks, config)
        self.llm_block = self.build_llm_after(hp.llm, self.backbone.blocks, hp.llm_position, self.backbone.embed_dim)
        self.configure_auxiliary_head(self.backbone.embed_dim)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(tokens)  # the CLS token for DeiT

    def head_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(self.backbone.norm(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def learngene_for(
    learngene: LearngeneConfig | dict, state: dict[str, torch.Tensor], stored: dict[str, Any], source: str | None,
    init_genes: int | None,
) -> LearngeneConfig:
    """The decomposed model's configuration, its basis taken from the learngenes of ``source``
    (``--model.init_from``) when unset; a basis or a gene count that differs from the file's is refused."""
    config = learngene if isinstance(learngene, LearngeneConfig) else LearngeneConfig(**learngene)
    held = len(genes_in(state))
    if not held:  # no file, or weights without genes (a plain ViT's: refused when loaded)
        return config if config.basis else dataclasses.replace(config, basis=DEFAULT_BASIS)
    basis, genes = stored_learngene(stored)
    if genes is not None and genes != held:
        raise InitialWeightsError(f"--model.init_from {source} says it holds {genes} learngenes but holds {held}: "
                                  "the file is damaged or edited; write it again.")  # fmt: skip
    if basis is None and config.basis is None:
        raise InitialWeightsError(f"--model.init_from {source} does not say the basis of its {held} learngenes: set "
                                  "--model.learngene.basis to the one they were trained with.")  # fmt: skip
    if basis is not None and config.basis not in (None, basis):
        raise InitialWeightsError(
            f"--model.init_from {source} holds {held} learngenes of the {basis} basis, but --model.learngene.basis is "
            f"{config.basis}: leave the basis unset (it follows the file) or set it to {basis}."
        )
    used = held if init_genes is None else init_genes
    if 1 <= used <= held and used > config.genes:  # (a used count outside [1, held] is refused when loading)
        raise InitialWeightsError(
            f"--model.init_from {source} holds {held} learngenes ({basis or config.basis} basis) and {used} are used, "
            f"but --model.learngene.genes is {config.genes}: set it to at least {used}, or --model.init_genes {config.genes}."
        )
    return dataclasses.replace(config, basis=config.basis or basis)

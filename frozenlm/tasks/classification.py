"""Image classification with a ViT and a frozen LM block (LM4VE, Pang et al., ICLR 2024)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from frozenlm.llm import FrozenLMMixin, LLMConfig
from frozenlm.models import create_vit
from frozenlm.tasks.base import BaseTask


class ImageClassifier(FrozenLMMixin, BaseTask):
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
        llm: LLMConfig | None = None,
        llm_position: int = -1,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_switch_prob: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        hp = self.hparams
        self.backbone = create_vit(
            hp.backbone, hp.num_classes, img_size=hp.img_size, patch_size=hp.patch_size,
            drop_path_rate=hp.drop_path_rate, pretrained=hp.pretrained, pretrained_file=hp.pretrained_file,
            **(hp.backbone_kwargs or {}),
        )  # fmt: skip
        depth = len(self.backbone.blocks)
        if not -depth <= hp.llm_position < depth:
            raise IndexError(f"llm_position {hp.llm_position} is out of range for a ViT with {depth} blocks.")
        self.llm_block = self.build_llm(hp.llm, in_dim=self.backbone.embed_dim)
        if self.llm_block is not None:
            # The block is applied by a forward hook on ViT block `llm_position`, so the timm model and
            # its pretrained weights stay unchanged and the final norm and head follow the LM block.
            self.backbone.blocks[hp.llm_position].register_forward_hook(self._llm_hook)
        if self.llm_auxiliary and self.llm_config.aux_head == "separate":
            dim = self.backbone.embed_dim
            self.aux_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hp.num_classes))

    def _llm_hook(self, module: nn.Module, args: tuple, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm_tap(tokens)

    def auxiliary_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """GCR's auxiliary head on the LM branch's tokens, pooled as the trunk pools (CLS for DeiT)."""
        if self.llm_config.aux_head == "shared":
            return self.backbone.forward_head(self.backbone.norm(tokens))
        return self.aux_head(self.backbone.pool(tokens))

    def configure_losses(self) -> None:
        hp = self.hparams
        self.mixup = None
        if hp.mixup > 0 or hp.cutmix > 0:
            # timm's Mixup also applies the label smoothing, to the mixed soft targets.
            self.mixup = Mixup(
                mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, switch_prob=hp.mixup_switch_prob,
                label_smoothing=hp.label_smoothing, num_classes=hp.num_classes,
            )  # fmt: skip
        # cross_entropy takes the soft targets of mixup as they are; hard labels get the smoothing.
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if self.mixup else hp.label_smoothing)

    def configure_metrics(self) -> None:
        num_classes = self.hparams.num_classes
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, targets = batch["image"], batch["label"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.train_criterion(self(images), targets)
        aux_tokens = self.auxiliary_tokens()
        if aux_tokens is not None:  # GCR: loss_main + aux_weight * loss_aux
            aux_loss = self.train_criterion(self.auxiliary_logits(aux_tokens), targets)
            self.log_dict({"train_loss_main": loss, "train_loss_aux": aux_loss}, batch_size=images.shape[0])
            loss = loss + self.llm_config.aux_weight * aux_loss
        self.log("train_loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def probe_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss without mixup, for the gradient-coherence probe."""
        return F.cross_entropy(self(batch["image"]), batch["label"], label_smoothing=self.hparams.label_smoothing)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, stage: str) -> None:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"])
        metrics.update(logits, batch["label"])
        batch_size = logits.shape[0]
        self.log(f"{stage}_loss", loss, sync_dist=True, batch_size=batch_size)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=batch_size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self(batch["image"]).softmax(dim=-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        return {"id": batch["id"], "classes": top.indices, "probs": top.values}

"""Point-cloud classification with Point-BERT and a frozen LM block (LM4VE's ScanObjectNN / ModelNet40)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torchmetrics.classification import MulticlassAccuracy

from frozenlm.llm import LLMConfig
from frozenlm.models.pointbert import PointBERTClassifier, PointBERTClassifierConfig
from frozenlm.tasks.classification import ClassificationTask


class PointCloudClassifier(ClassificationTask):
    """Point-BERT fine-tuning (the model: [`PointBERTClassifier`][frozenlm.models.pointbert.PointBERTClassifier], whose tokens
    (CLS + point groups) pass through a frozen LM block after block `llm_position`, before the final
    LayerNorm, LM4VE; the head reads concat(CLS, max over groups)).

    `llm: null` is the Point-BERT baseline; `llm.mode: auxiliary` is GCR (the block and its own
    head as a training-only branch). Batches hold `points [B, N, 3]` (sampled and augmented by the
    datamodule) and, at test time with voting, `vote_points [B, V, N, 3]`: then `test_vote_acc1`
    (logits averaged over the V views, as Point-BERT votes) is logged beside the single-view `test_acc1`.

    Recipe defaults (Point-BERT fine-tuning, kept by LM4VE): AdamW lr 5e-4 (not scaled by the batch),
    wd 0.05, cosine per epoch to 1e-6 after 10 warmup epochs from 1e-6, plain cross-entropy, no mixup;
    with `param_groups: reference`, LM4VE's three groups: 1-d parameters, biases and tokens at lr x 0.1
    without weight decay, the LM block's adapters at lr x 0.5 without weight decay, the rest at lr.

    Args:
        num_classes: number of classes (linked from the datamodule by the CLI).
        num_groups, group_size, embed_dim, depth, num_heads, encoder_dims, drop_path_rate: the backbone,
            see [`PointBERT`][frozenlm.models.pointbert.PointBERT].
        head_dropout: dropout of the head's hidden layer (Point-BERT: 0.5).
        pretrained_file: Point-BERT's `Point-BERT.pth` or Point-MAE's `pretrain.pth` to start from.
        llm: the frozen LM block (see [`LLMConfig`][frozenlm.llm.LLMConfig]); None for none.
        llm_position: index of the block after which the LM block runs (-1: after the last).
        param_groups: `reference` (LM4VE's groups above) or `default` (timm's: no weight decay on
            1-d parameters and tokens, one lr).
        label_smoothing: label smoothing of the cross-entropy (Point-BERT: none).
        **kwargs: optimisation recipe, see [`BaseTask`][frozenlm.tasks.BaseTask].

    Examples:
        >>> from frozenlm.tasks import PointCloudClassifier
        >>> task = PointCloudClassifier(num_classes=15)

        From the command line: `frozenlm fit --config configs/scanobjectnn_hardest_pointbert_llama.yaml`.
    """

    input_key = "points"

    def __init__(
        self,
        num_classes: int = 40,
        num_groups: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        encoder_dims: int = 256,
        drop_path_rate: float = 0.1,
        head_dropout: float = 0.5,
        pretrained_file: str | None = None,
        llm: LLMConfig | None = None,
        llm_position: int = -1,
        param_groups: str = "reference",
        label_smoothing: float = 0.0,
        lr: float = 5e-4,
        lr_reference_batch: int = 0,
        weight_decay: float = 0.05,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        warmup_lr: float = 1e-6,
        schedule_interval: str = "epoch",
        **kwargs: Any,
    ) -> None:
        if param_groups not in ("reference", "default"):
            raise ValueError(f"param_groups must be 'reference' or 'default', got {param_groups!r}.")
        super().__init__(
            lr=lr, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay, min_lr=min_lr,
            warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, schedule_interval=schedule_interval, **kwargs,
        )  # fmt: skip

    @staticmethod
    def build_model(hparams: Mapping[str, Any], **context: Any) -> PointBERTClassifier:
        """The plain Point-BERT classifier of these hyper-parameters (no trainer needed)."""
        return PointBERTClassifier(PointBERTClassifierConfig.from_hparams(hparams))

    def configure_models(self) -> None:
        self.model = self.build_model(self.hparams)

    def configure_metrics(self) -> None:
        super().configure_metrics()
        self.vote_accuracy = MulticlassAccuracy(self.hparams.num_classes, top_k=1, average="micro")

    def optimizer_parameters(self, lr: float, weight_decay: float) -> nn.Module | list[dict]:
        if self.hparams.param_groups == "default":
            return super().optimizer_parameters(lr, weight_decay)
        no_decay, adapters, decay = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("model.llm_block."):  # the reference's "llama" parameters: the trainable adapters
                adapters.append(param)
            elif param.ndim == 1 or name.endswith(".bias") or "token" in name:
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"params": no_decay, "lr": lr * 0.1, "weight_decay": 0.0},
            {"params": adapters, "lr": lr * 0.5, "weight_decay": 0.0},
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
        ]
        return [group for group in groups if group["params"]]

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.model(points)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if "vote_points" in batch:
            views = batch["vote_points"]
            logits = self(views.flatten(0, 1)).view(*views.shape[:2], -1).mean(dim=1)
            logits, labels = self.scored(batch, self.restrict_logits(logits), batch["label"])
            if len(labels):
                self.vote_accuracy.update(logits, labels)
                self.log("test_vote_acc1", self.vote_accuracy, batch_size=len(labels))

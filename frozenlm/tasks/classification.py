"""`ClassificationTask`: what every classifier shares, whatever its input (images, videos).

The model is the task's `self.model` (built by the task's `build_model`): `model.forward_features(x)`
gives `(tokens, branch)`, the trunk's tokens and GCR's auxiliary branch (training only, else None);
`model.forward_head(tokens)` the logits, `model.forward_aux_head(branch)` the auxiliary logits, and
`model(x)` the inference logits (see [`LMViT`][frozenlm.models.lm_vit.LMViT]). Everything else is here,
once: mixup/cutmix with label smoothing, distillation, the LM4VE/GCR training step, top-1/top-5
evaluation (averaging the softmax over the views a test batch may carry), and predictions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from frozenlm.llm import FrozenLMMixin
from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.distillation import DistillConfig, build_teacher, distillation_loss


class ClassificationTask(FrozenLMMixin, BaseTask):
    """Base of the classifiers; subclasses set `input_key` (the batch entry holding the inputs).

    Hyper-parameters it reads: `num_classes`, `label_smoothing`, `mixup`, `cutmix`,
    `mixup_switch_prob`, `distill` (a teacher, `distillation`). Batches are
    dicts with `input_key`, `label` and `id`; a loader that drops unreadable samples adds
    `unreadable` (their files), counted as `data/unreadable/<stage>`.

    Examples:
        Subclassed by [`ImageClassifier`][frozenlm.tasks.ImageClassifier],
        [`VideoClassifier`][frozenlm.tasks.VideoClassifier] and
        [`PointCloudClassifier`][frozenlm.tasks.PointCloudClassifier]; a new classifier family gives it a
        `build_model` (see the architecture page).
    """

    input_key: str
    monitor = "val_acc1"
    monitor_mode = "max"

    def configure_losses(self) -> None:
        hp = self.hparams
        self.mixup = None
        if hp.get("mixup", 0.0) > 0 or hp.get("cutmix", 0.0) > 0:  # tasks without image-like inputs have none
            # timm's Mixup also applies the label smoothing, to the mixed soft targets.
            self.mixup = Mixup(
                mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, switch_prob=hp.mixup_switch_prob,
                label_smoothing=hp.label_smoothing, num_classes=hp.num_classes,
            )  # fmt: skip
        # cross_entropy takes the soft targets of mixup as they are; hard labels get the smoothing.
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if self.mixup else hp.label_smoothing)
        distill = hp.get("distill")
        self.distill_config = DistillConfig(**distill) if isinstance(distill, dict) else distill
        # Kept out of the module tree: not in the student's state dict, checkpoints or optimizer.
        teacher = build_teacher(self.distill_config, hp.num_classes) if distill is not None else None
        object.__setattr__(self, "teacher", teacher)

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
        # Losses averaged by torchmetrics, exactly over processes with unequal shares (Lightning's synced
        # epoch mean divides by an integer mean of the batch sizes: (7 + 6) / 2 samples count as 6).
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's mixup/cutmix on `[B, C, H, W]` inputs (video tasks fold frames into channels)."""
        if len(inputs) % 2:  # timm's Mixup pairs samples; a dropped unreadable sample can make a batch odd
            inputs, targets = inputs[:-1], targets[:-1]
        return self.mixup(inputs, targets)

    def class_probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax over classes; tasks whose test batches carry several views average over them."""
        return self(inputs).softmax(dim=-1)

    def evaluated_classes(self) -> torch.Tensor | None:
        """Bool mask of the classes predictions are restricted to, when the datamodule covers only some
        (its `class_subset`, e.g. ImageNet-A/R's 200 of ImageNet's 1000); None for all."""
        subset = getattr(self.trainer.datamodule, "class_subset", None) if self._trainer is not None else None
        if subset is None:
            return None
        mask = torch.zeros(self.hparams.num_classes, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(subset, device=self.device)] = True
        return mask

    def restrict_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` with the classes outside the evaluated ones ([`evaluated_classes`][frozenlm.tasks.classification.ClassificationTask.evaluated_classes]) at the
        lowest value, so that no prediction, vote or attack picks them."""
        mask = self.evaluated_classes()
        return logits if mask is None else logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def evaluation_probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """[`class_probabilities`][frozenlm.tasks.classification.ClassificationTask.class_probabilities], renormalised over the evaluated classes."""
        probs = self.class_probabilities(inputs)
        mask = self.evaluated_classes()
        if mask is None:
            return probs
        probs = probs * mask
        return probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not self._log_unreadable(batch, "train"):
            return self.zero_loss()  # every sample was unreadable
        inputs, targets = batch[self.input_key], batch["label"]
        if self.mixup is not None:
            inputs, targets = self.mix(inputs, targets)
        tokens, branch = self.model.forward_features(inputs)  # branch: GCR's tokens (training only), else None
        logits = self.model.forward_head(tokens)
        loss = self.train_criterion(logits, targets)
        if self.teacher is not None:  # distillation: (1 - alpha) CE + alpha KD (DeiT's)
            with torch.no_grad():
                teacher_logits = self.teacher.to(inputs.device)(inputs)
            distill = self.distill_config
            kd = distillation_loss(logits, teacher_logits, distill.temperature, distill.kind, distill.reduction)
            self.log_dict({"train_loss_ce": loss, "train_loss_kd": kd}, batch_size=len(inputs))
            loss = (1 - distill.alpha) * loss + distill.alpha * kd
        if branch is not None:  # GCR: loss_main + aux_weight * loss_aux
            aux_loss = self.train_criterion(self.model.forward_aux_head(branch), targets)
            loss = self.with_auxiliary_loss(loss, aux_loss, self.model.llm_config.aux_weight, len(inputs))
        self.log("train_loss", loss, prog_bar=True, batch_size=len(inputs))
        return self.finite_loss(loss, batch, batch_idx)

    def probe_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss without mixup, for the gradient-coherence probe."""
        return F.cross_entropy(self(batch[self.input_key]), batch["label"], label_smoothing=self.hparams.label_smoothing)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, stage: str) -> None:
        if not self._log_unreadable(batch, stage):
            return
        # The forward runs on the whole batch (every process runs the same steps); repeats that only even
        # out the processes' shares are dropped before scoring.
        probs, labels = self.scored(batch, self.evaluation_probabilities(batch[self.input_key]), batch["label"])
        if not len(labels):
            return
        loss = getattr(self, f"{stage}_loss")
        loss.update(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="none"))
        metrics.update(probs, labels)
        self.log(f"{stage}_loss", loss, batch_size=len(probs))
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=len(probs))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if self.input_key not in batch:
            return {"id": [], "classes": [], "probs": []}
        top = self.evaluation_probabilities(batch[self.input_key]).topk(min(5, self.hparams.num_classes), dim=-1)
        ids, classes, probs = self.scored(batch, batch["id"], top.indices, top.values)
        return {"id": ids, "classes": classes, "probs": probs}

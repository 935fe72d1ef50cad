"""Knowledge distillation from a frozen teacher, as the learngene papers train (Lin et al., NeurIPS 2024:
cross-entropy + KL to a RegNet-16GF; TLEG: DeiT's soft distillation from LeViT-384).

The loss is DeiT's (facebookresearch/deit `losses.py`, `DistillationLoss`): `(1 - alpha) CE + alpha
KD` on the student's logits `s` and the teacher's `t` for the same (mixed) inputs, where KD is

* `soft` (default): `T^2 KL(softmax(t / T) || softmax(s / T))`, summed over the batch and the classes
  and divided by the number of logits `s.numel()` (DeiT's `reduction='sum' ... / outputs_kd.numel()`),
  i.e. the per-sample KL divided by the number of classes; `reduction: batchmean` divides by the batch
  size only (`C` times larger: frozenlm's earlier loss, kept as an option);
* `hard`: `CE(s, argmax t)` (DeiT's hard distillation, no label smoothing).

The NeurIPS paper's "CE + KL" is `alpha 0.5` up to a factor 2, TLEG's `soft, alpha 1, T 1` (its
README's Aux-S command; its `losses.py` is DeiT's). The teacher is frozen and in eval mode, runs once
per batch without gradients, and is not part of the student's checkpoints.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class DistillConfig:
    """The teacher (`--model.distill '{teacher: regnety_160, pretrained: true}'`).

    Args:
        teacher: a timm model name, or a frozenlm `.ckpt` of a baseline or GCR image classifier
            (its plain ViT is the teacher).
        weights: with a timm name, its weights in a local file (timm `.pth` / `.safetensors`).
        pretrained: with a timm name, timm's pretrained weights (from the hub or its cache).
        alpha: weight of the distillation term (1 - alpha for the cross-entropy).
        temperature: softmax temperature `T` of both distributions (`soft` only).
        kind: `soft` (KL to the teacher's distribution) or `hard` (cross-entropy to the teacher's
            top class), DeiT's `--distillation-type`.
        reduction: of the soft loss: `deit` (DeiT's: summed, divided by the number of logits) or
            `batchmean` (divided by the batch size: `num_classes` times DeiT's).
    """

    teacher: str
    weights: str | None = None
    pretrained: bool = False
    alpha: float = 0.5
    temperature: float = 1.0
    kind: Literal["soft", "hard"] = "soft"
    reduction: Literal["deit", "batchmean"] = "deit"

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {self.temperature}.")
        if self.kind not in ("soft", "hard"):
            raise ValueError(f"distill.kind must be soft or hard, got {self.kind!r}.")
        if self.reduction not in ("deit", "batchmean"):
            raise ValueError(f"distill.reduction must be deit or batchmean, got {self.reduction!r}.")


def build_teacher(config: DistillConfig, num_classes: int) -> nn.Module:
    """The frozen teacher in eval mode."""
    if config.teacher.endswith(".ckpt"):
        from frozenlm.export import load_trunk

        if not Path(config.teacher).is_file():
            raise FileNotFoundError(f"distill.teacher {config.teacher}: no such checkpoint.")
        teacher = load_trunk(config.teacher)
    else:
        import timm

        overlay = {"pretrained_cfg_overlay": {"file": config.weights}} if config.weights else {}
        if config.weights and not Path(config.weights).is_file():
            raise FileNotFoundError(f"distill.weights {config.weights}: no such file.")
        teacher = timm.create_model(config.teacher, pretrained=config.pretrained or bool(config.weights),
                                    num_classes=num_classes, **overlay)  # fmt: skip
    out = getattr(teacher, "num_classes", num_classes)
    if out != num_classes:
        raise ValueError(f"distill.teacher {config.teacher} predicts {out} classes, the task {num_classes}.")
    return teacher.eval().requires_grad_(False)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, kind: str = "soft", reduction: str = "deit"
) -> torch.Tensor:
    """DeiT's distillation term of a batch of logits (see `DistillConfig`): `soft`,
    `T^2 KL(softmax(teacher / T) || softmax(student / T))` summed and divided by `student.numel()`
    (`reduction="deit"`) or by the batch size (`"batchmean"`); `hard`, `CE(student, argmax teacher)`."""
    if kind == "hard":
        return F.cross_entropy(student.float(), teacher.argmax(dim=-1))
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) * temperature**2
    return kl / (student.numel() if reduction == "deit" else len(student))

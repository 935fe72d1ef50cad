"""Adversarial robustness of an image classifier during `frozenlm test`: accuracy under FGSM and PGD.

The attacks are torchattacks' (L-inf, in [0, 1] pixel space; the datamodule's normalisation is undone
and redone by torchattacks around the model), run on every test batch next to the clean evaluation:

    frozenlm test --config configs/imagenet_deit_small_llama.yaml --ckpt_path CKPT \\
        --trainer.callbacks+=frozenlm.analysis.AdversarialAccuracy

logs `test_fgsm_acc1` and `test_pgd_acc1` beside `test_acc1`. The defaults (eps 1/255; PGD 5
steps of eps/4 from a random start) are common choices for ViTs, not values published by LM4VE.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

ATTACKS = ("fgsm", "pgd")


class _EvaluatedLogits(nn.Module):
    """The task's logits restricted to its evaluated classes (ImageNet-A/R: 200), so attacks and
    predictions see the same classes."""

    def __init__(self, task: L.LightningModule) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.restrict_logits(self.task(images))


class AdversarialAccuracy(L.Callback):
    """Top-1 accuracy on adversarial versions of each test batch (image classifiers).

    Args:
        attacks: any of `fgsm` and `pgd`.
        eps: L-inf radius in [0, 1] pixel units.
        pgd_steps: PGD iterations.
        pgd_alpha: PGD step size; None = `eps / 4`.
    """

    def __init__(
        self, attacks: list[str] | None = None, eps: float = 1 / 255, pgd_steps: int = 5, pgd_alpha: float | None = None
    ) -> None:
        self.attacks = list(attacks or ATTACKS)
        unknown = set(self.attacks) - set(ATTACKS)
        if unknown:
            raise ValueError(f"Unknown attack(s) {sorted(unknown)}; choose from {ATTACKS}.")
        self.eps, self.pgd_steps = eps, pgd_steps
        self.pgd_alpha = eps / 4 if pgd_alpha is None else pgd_alpha

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "input_key", None) != "image":
            raise TypeError("AdversarialAccuracy attacks image classifiers (ImageClassifier) only.")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.correct = dict.fromkeys(self.attacks, 0)
        self.total = 0

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if "image" not in batch:  # every sample of the batch was unreadable
            return
        images, labels = pl_module.scored(batch, batch["image"], batch["label"])  # each sample once
        if not len(labels):
            return
        import torchattacks  # the optional `robustness` extra

        datamodule = trainer.datamodule
        model = _EvaluatedLogits(pl_module)
        # Lightning tests under inference mode; the attacks need input gradients (clones of the batch
        # made here are ordinary tensors).
        with torch.inference_mode(False), torch.enable_grad():
            images, labels = images.clone(), labels.clone()
            self.total += len(labels)
            for name in self.attacks:
                if name == "fgsm":
                    attack = torchattacks.FGSM(model, eps=self.eps)
                else:
                    attack = torchattacks.PGD(model, eps=self.eps, alpha=self.pgd_alpha, steps=self.pgd_steps)
                attack.set_normalization_used(mean=list(datamodule.mean), std=list(datamodule.std))
                adversarial = attack(images, labels)
                with torch.no_grad():
                    self.correct[name] += int((model(adversarial).argmax(dim=-1) == labels).sum())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Counts summed over the processes: the exact accuracy, whatever each process's share.
        total = trainer.strategy.reduce(torch.tensor(float(self.total), device=pl_module.device), reduce_op="sum")
        for name in self.attacks:
            correct = trainer.strategy.reduce(torch.tensor(float(self.correct[name]), device=pl_module.device), reduce_op="sum")
            pl_module.log(f"test_{name}_acc1", correct / total.clamp_min(1))

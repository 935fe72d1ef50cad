"""``BaseTask``: the small base class every task LightningModule builds on.

Subclasses implement three hooks, called in this order from ``__init__``: ``configure_models``,
``configure_losses``, ``configure_metrics``. The base class owns what every task shares: saving
hyper-parameters, the DeiT-style optimizer and schedule (AdamW, lr scaled by the global batch,
linear warmup then cosine, per step, with timm's implementations), and per-epoch reseeding so that
a run resumed from an epoch-end checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import lightning
import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn


class BaseTask(lightning.LightningModule):
    """Shared optimisation recipe; the ``optim_*`` arguments of each task are forwarded here.

    Args:
        lr: base learning rate for a global batch of ``lr_reference_batch`` (DeiT: 5e-4 per 512).
        lr_reference_batch: the learning rate is ``lr * global_batch / lr_reference_batch``;
            set it to 0 to use ``lr`` as is.
        weight_decay: AdamW weight decay (none on norms, biases, tokens and position embeddings).
        optimizer: any optimizer name timm's ``create_optimizer_v2`` knows.
        min_lr: cosine floor.
        warmup_epochs: linear warmup from ``warmup_lr`` (fractional epochs allowed).
        warmup_lr: learning rate at step 0.
        layer_decay: layer-wise lr decay (timm); None for none.
        scale_min_lr: scale ``min_lr`` and ``warmup_lr`` by the global batch too, like ``lr``
            (VideoMAE's fine-tuning does; DeiT does not).
        schedule_interval: ``step``: warmup and cosine advance every optimizer step (DeiT here);
            ``epoch``: once per epoch, warmup in whole epochs (Point-BERT's recipe).
    """

    ignore: tuple[str, ...] = ()

    def __init__(
        self,
        lr: float = 5e-4,
        lr_reference_batch: int = 512,
        weight_decay: float = 0.05,
        optimizer: str = "adamw",
        min_lr: float = 1e-5,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        layer_decay: float | None = None,
        scale_min_lr: bool = False,
        schedule_interval: str = "step",
    ) -> None:
        super().__init__()
        if schedule_interval not in ("step", "epoch"):
            raise ValueError(f"schedule_interval must be 'step' or 'epoch', got {schedule_interval!r}.")
        self.save_hyperparameters(ignore=self.ignore)
        # Checkpoints hold plain containers only: Lightning reads hyper-parameters back with
        # torch.load(weights_only=True), which refuses arbitrary classes such as dataclasses.
        for key, value in self.hparams.items():
            if dataclasses.is_dataclass(value):
                self.hparams[key] = dataclasses.asdict(value)
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Build the networks."""

    def configure_losses(self) -> None:
        """Build the loss functions."""

    def configure_metrics(self) -> None:
        """Build the torchmetrics collections."""

    # -- optimisation ------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all processes."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "batch_size"):
            raise ValueError("Learning-rate scaling needs a datamodule with a `batch_size` attribute.")
        return datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def lr_scale(self) -> float:
        """``global_batch / lr_reference_batch`` (1 when ``lr_reference_batch`` is 0)."""
        hp = self.hparams
        return self.global_batch_size() / hp.lr_reference_batch if hp.lr_reference_batch else 1.0

    def optimizer_parameters(self, lr: float, weight_decay: float) -> nn.Module | list[dict]:
        """What the optimizer gets: the module itself (timm then skips parameters that do not require
        grad, the frozen block, and reads ``no_weight_decay()`` and, with layer decay,
        ``group_matcher()``), or explicit parameter groups of a task's own recipe."""
        return self

    def configure_optimizers(self):
        hp = self.hparams
        scale = self.lr_scale()
        lr = hp.lr * scale
        floor_scale = scale if hp.scale_min_lr else 1.0
        optimizer = create_optimizer_v2(
            self.optimizer_parameters(lr, hp.weight_decay), opt=hp.optimizer, lr=lr, weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
        )  # fmt: skip
        # Scheduled per optimizer step or per epoch. Setting up the train loader creates its first
        # iterator, so this is where the first epoch of the fit is seeded (see `_reseed`). Lightning skips
        # the set-up when only max_steps bounds the run, but warmup is given in epochs, so it is done here.
        self._reseed(self._fit_first_epoch)
        self.trainer.fit_loop.setup_data()
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        if hp.schedule_interval == "epoch":
            total, warmup = max(1, math.ceil(total_steps / steps_per_epoch)), int(hp.warmup_epochs)
        else:
            total, warmup = total_steps, int(hp.warmup_epochs * steps_per_epoch)
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=total,
            lr_min=hp.min_lr * floor_scale,
            warmup_t=min(warmup, total - 1),
            warmup_lr_init=hp.warmup_lr * floor_scale,
            warmup_prefix=True,
            t_in_epochs=hp.schedule_interval == "epoch",
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp.schedule_interval}}

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        # timm schedulers are stateless in the step count: each call sets the lr of the coming update
        # (per step) or of the coming epoch (per epoch; Lightning calls this at the end of an epoch).
        if self.hparams.schedule_interval == "epoch":
            scheduler.step(epoch=self.current_epoch + 1)
        else:
            scheduler.step_update(num_updates=self.global_step)

    # -- exact resumption --------------------------------------------------------------------
    # Lightning does not checkpoint RNG states, so a run resumed at an epoch boundary would shuffle,
    # augment, mix and drop paths differently from an uninterrupted one. Instead every epoch's
    # randomness is made a function of (seed, epoch, rank): all RNGs are reseeded right before the
    # epoch's loader iterator is created. For the first epoch of a `fit`, that iterator is created
    # (and a batch prefetched) when `configure_optimizers` sets up the train loader, after the
    # checkpoint's modules are restored: that epoch is seeded there, from the epoch the restored
    # checkpoint resumes at.
    _fit_first_epoch: int = 0

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        self._fit_first_epoch = progress.get("processed", checkpoint.get("epoch", -1) + 1)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch != self._fit_first_epoch:
            self._reseed(self.current_epoch)

    def _reseed(self, epoch: int) -> None:
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = (base + 1_000_003 * epoch + 7919 * self.global_rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

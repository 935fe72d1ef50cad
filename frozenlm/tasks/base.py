"""`BaseTask`: the small base class every task LightningModule builds on.

Subclasses implement three hooks, called in this order from `__init__`: `configure_models`,
`configure_losses`, `configure_metrics`. The base class owns what every task shares: saving
hyper-parameters, the DeiT-style optimizer and schedule (AdamW, lr scaled by the global batch,
linear warmup then cosine, per step, with timm's implementations), per-epoch reseeding so that
a run resumed from an epoch-end checkpoint continues exactly as an uninterrupted one, and the guard
against non-finite training losses ([`BaseTask.finite_loss`][frozenlm.tasks.base.BaseTask.finite_loss], which every `training_step`
returns through).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import warnings
from typing import Any

import lightning
import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn

from frozenlm.errors import FrozenLMError


TASK_KEY = "frozenlm_task"


class NonFiniteLossError(FrozenLMError, FloatingPointError):
    """A training loss was NaN or infinite (more often than `max_nonfinite_steps` allows): the message
    names the step and the batch's samples."""


class BaseTask(lightning.LightningModule):
    """Shared optimisation recipe; the `optim_*` arguments of each task are forwarded here.

    Args:
        lr: base learning rate for a global batch of `lr_reference_batch` (DeiT: 5e-4 per 512).
        lr_reference_batch: the learning rate is `lr * global_batch / lr_reference_batch`;
            set it to 0 to use `lr` as is.
        weight_decay: AdamW weight decay (none on norms, biases, tokens and position embeddings).
        optimizer: any optimizer name timm's `create_optimizer_v2` knows.
        min_lr: the schedule's floor (cosine), or its end (linear).
        warmup_epochs: linear warmup from `warmup_lr` (fractional epochs allowed).
        warmup_lr: learning rate at step 0.
        layer_decay: layer-wise lr decay (timm); None for none.
        scale_min_lr: scale `min_lr` and `warmup_lr` by the global batch too, like `lr`
            (VideoMAE's fine-tuning does; DeiT does not).
        schedule_interval: `step`: warmup and cosine advance every optimizer step (DeiT here);
            `epoch`: once per epoch, warmup in whole epochs (Point-BERT's recipe).
        betas: Adam(W)'s betas; None for the optimizer's default (0.9, 0.999).
        schedule: after warmup, `cosine` (DeiT) or `linear` decay to `min_lr` at the last step (METER:
            transformers' `get_polynomial_decay_schedule_with_warmup` with power 1); or `constant`: `lr`
            throughout, no warmup (SQA3D's ScanQA).
        max_nonfinite_steps: training steps whose loss is NaN or infinite that are skipped (no update;
            counted as `train/nonfinite_steps_skipped`) before the run stops with
            `NonFiniteLossError`; 0 stops at the first. The weights are never updated from such
            a loss, so every checkpoint stays finite.

    Examples:
        Every task derives from it; a config names the task and its arguments:
        `frozenlm fit --config configs/mnist_vit.yaml --model.lr 1e-3 --print_config`.
    """

    ignore: tuple[str, ...] = ()
    # The batch entry naming each sample, for the error of a non-finite loss.
    sample_id_key: str = "id"
    # The batch entry holding the inputs; a batch without it had every sample unreadable.
    input_key: str = "image"
    # The metric the default checkpoint callback keeps the best of, and whether higher ("max") or lower is better.
    monitor: str = "val_loss"
    monitor_mode: str = "min"

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
        max_nonfinite_steps: int = 0,
        betas: tuple[float, float] | None = None,
        schedule: str = "cosine",
    ) -> None:
        super().__init__()
        if schedule_interval not in ("step", "epoch"):
            raise ValueError(f"schedule_interval must be 'step' or 'epoch', got {schedule_interval!r}.")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}.")
        if schedule == "constant" and warmup_epochs:
            raise ValueError(f"schedule 'constant' has no warmup: set warmup_epochs 0 (got {warmup_epochs}).")
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be 0 or more, got {max_nonfinite_steps}.")
        self.nonfinite_steps_skipped = 0
        self._skip_this_step = False
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
        """`global_batch / lr_reference_batch` (1 when `lr_reference_batch` is 0)."""
        hp = self.hparams
        return self.global_batch_size() / hp.lr_reference_batch if hp.lr_reference_batch else 1.0

    def optimizer_parameters(self, lr: float, weight_decay: float) -> nn.Module | list[dict]:
        """What the optimizer gets: the module itself (timm then skips parameters that do not require
        grad, the frozen block, and reads `no_weight_decay()` and, with layer decay,
        `group_matcher()`), or explicit parameter groups of a task's own recipe."""
        return self

    def configure_optimizers(self):
        hp = self.hparams
        scale = self.lr_scale()
        lr = hp.lr * scale
        floor_scale = scale if hp.scale_min_lr else 1.0
        optimizer = create_optimizer_v2(
            self.optimizer_parameters(lr, hp.weight_decay), opt=hp.optimizer, lr=lr, weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay, **({"betas": tuple(hp.betas)} if hp.get("betas") else {}),
        )  # fmt: skip
        # Scheduled per optimizer step or per epoch. Setting up the train loader creates its first
        # iterator, so this is where the first epoch of the fit is seeded (see `_reseed`). Lightning skips
        # the set-up when only max_steps bounds the run, but warmup is given in epochs, so it is done here.
        self._reseed(self._fit_first_epoch)
        self.trainer.fit_loop.setup_data()
        if hp.get("schedule") == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        if hp.schedule_interval == "epoch":
            total, warmup = max(1, math.ceil(total_steps / steps_per_epoch)), int(hp.warmup_epochs)
        else:
            total, warmup = total_steps, int(hp.warmup_epochs * steps_per_epoch)
        warmup = min(warmup, total - 1)
        common = dict(lr_min=hp.min_lr * floor_scale, warmup_t=warmup, warmup_lr_init=hp.warmup_lr * floor_scale,
                      warmup_prefix=True, t_in_epochs=hp.schedule_interval == "epoch")  # fmt: skip
        if hp.get("schedule", "cosine") == "linear":  # reaches min_lr at the last step, as METER's
            scheduler = PolyLRScheduler(optimizer, t_initial=total - warmup, power=1.0, **common)
        else:
            scheduler = CosineLRScheduler(optimizer, t_initial=total, **common)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp.schedule_interval}}

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        # timm schedulers are stateless in the step count: each call sets the lr of the coming update
        # (per step) or of the coming epoch (per epoch; Lightning calls this at the end of an epoch).
        if self.hparams.schedule_interval == "epoch":
            scheduler.step(epoch=self.current_epoch + 1)
        else:
            scheduler.step_update(num_updates=self.global_step)

    # -- losses -------------------------------------------------------------------------------
    def with_auxiliary_loss(
        self, loss: torch.Tensor, aux_loss: torch.Tensor | None, weight: float, batch_size: int
    ) -> torch.Tensor:
        """GCR's training loss: `loss_main + weight * loss_aux` (`weight`: `llm.aux_weight`; `loss` itself
        when there is no auxiliary branch), logging `train_loss_main` and `train_loss_aux`. The one place
        every task combines the two."""
        if aux_loss is None:
            return loss
        self.log_dict({"train_loss_main": loss, "train_loss_aux": aux_loss}, batch_size=batch_size)
        return loss + weight * aux_loss

    # -- one sample's forward ----------------------------------------------------------------
    def sample_forward(self, batch: dict[str, Any], samples: int = 1) -> tuple[Any, tuple]:
        """`(function, inputs)`: the model's inference forward on the first `samples` samples of `batch`
        (an evaluation batch as `validation_step` gets it, on this module's device), run as
        `function(*inputs)` in eval mode. What `frozenlm sweep` counts FLOPs per sample on (with
        `flop_counter`, attention included), and what a benchmark can time. Tasks whose
        forward takes more than `batch[input_key]` override it."""
        return self, (batch[self.input_key][:samples],)

    # -- exact evaluation on any number of processes -------------------------------------------
    @staticmethod
    def scored(batch: dict[str, Any], *values: Any) -> tuple[Any, ...]:
        """`values` (tensors or lists with one row per sample of `batch`) without the rows that only
        even out the processes' shares of an evaluation split (`batch["padding"]`, see
        `distributed`), so that every sample is scored exactly once."""
        padding = batch.get("padding")
        if padding is None or not bool(padding.any()):
            return values
        keep = ~padding.bool()
        return tuple(
            v[keep.to(v.device)] if torch.is_tensor(v) else [x for x, k in zip(v, keep.tolist()) if k] for v in values
        )

    def _log_unreadable(self, batch: dict[str, Any], stage: str) -> bool:
        """Log the count of unreadable samples the loader dropped (`data/unreadable/<stage>`, the epoch's sum
        over every process's batches: synced once, at the epoch's end); False when the whole batch was dropped."""
        if "unreadable" in batch:
            count = float(len(batch["unreadable"]))
            self.log(f"data/unreadable/{stage}", count, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1,
                     sync_dist=True)  # fmt: skip
        return self.input_key in batch

    # -- non-finite losses -------------------------------------------------------------------
    def finite_loss(self, loss: torch.Tensor, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """What `training_step` returns: `loss` when it is finite in every process.

        A NaN or infinite loss (in any process) is never back-propagated into the weights: while fewer
        than `max_nonfinite_steps` steps were skipped, every process skips this one (a zero loss keeps
        DDP's gradient all-reduce in step, then the gradients are dropped before the optimizer, so
        neither the weights nor the optimizer state move); past that, the run stops with
        `NonFiniteLossError` naming the batch's samples. Costs one host sync per step (and, under
        DDP, the all-reduce of one number).
        """
        finite = torch.isfinite(loss.detach()).all().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if finite.item():
            return loss
        ids = batch.get(self.sample_id_key, [])
        where = (f"epoch {self.current_epoch}, step {self.global_step} (batch {batch_idx}); this process's batch: "
                 f"loss {loss.detach().float().item()}, samples {list(ids)[:8]}{' ...' if len(ids) > 8 else ''}")  # fmt: skip
        limit = self.hparams.get("max_nonfinite_steps", 0)
        if self.nonfinite_steps_skipped >= limit:
            raise NonFiniteLossError(
                f"The training loss is not finite at {where}. Check those samples' files for NaN or infinite "
                "values, or lower the learning rate; --model.max_nonfinite_steps N skips up to N such steps "
                f"instead ({self.nonfinite_steps_skipped} skipped so far)."
            )
        self.nonfinite_steps_skipped += 1
        warnings.warn(f"Skipping a training step with a non-finite loss ({self.nonfinite_steps_skipped} of at most "
                      f"{limit}) at {where}", stacklevel=2)  # fmt: skip
        self._skip_this_step = True
        return self.zero_loss()

    def zero_loss(self) -> torch.Tensor:
        """A loss of 0 over every trainable parameter: a step that learns nothing but still runs the
        backward, so DDP's gradient all-reduce stays in step with the other processes (returning None
        would leave them waiting)."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_this_step:  # no gradient, no update: AdamW leaves a parameter without one untouched
            optimizer.zero_grad(set_to_none=True)
            self._skip_this_step = False

    def on_train_epoch_end(self) -> None:
        if self.hparams.get("max_nonfinite_steps", 0):
            self.log("train/nonfinite_steps_skipped", float(self.nonfinite_steps_skipped), on_epoch=True)

    # -- exact resumption --------------------------------------------------------------------
    # Lightning does not checkpoint RNG states, so a run resumed at an epoch boundary would shuffle,
    # augment, mix and drop paths differently from an uninterrupted one. Instead every epoch's
    # randomness is made a function of (seed, epoch, rank): all RNGs are reseeded right before the
    # epoch's loader iterator is created. For the first epoch of a `fit`, that iterator is created
    # (and a batch prefetched) when `configure_optimizers` sets up the train loader, after the
    # checkpoint's modules are restored: that epoch is seeded there, from the epoch the restored
    # checkpoint resumes at.
    _fit_first_epoch: int = 0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # Which task wrote it, for `frozenlm.load_model` (the CLI's hyper-parameters also say, as `_class_path`).
        checkpoint[TASK_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        migrate_model_keys(self, checkpoint)
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


def migrate_model_keys(task: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Move a checkpoint written before the task held its network as `self.model` to today's keys, in place.

    Then the task's modules (`backbone`, `llm_block`, `head`...) were its own children; now they are the
    model's: a state-dict key (and a stored frozen block's name) whose first part is a child of `task.model`
    and not of the task gets the `model.` prefix. A checkpoint already in today's layout is left as it is."""
    model = getattr(task, "model", None)
    if not isinstance(model, nn.Module):
        return
    moved = {name for name, _ in model.named_children()} - {name for name, _ in task.named_children()}

    def key(name: str) -> str:
        return f"model.{name}" if name.split(".", 1)[0] in moved else name

    for entry in ("state_dict", "frozen_lm"):
        if isinstance(checkpoint.get(entry), dict):
            checkpoint[entry] = {key(k): v for k, v in checkpoint[entry].items()}

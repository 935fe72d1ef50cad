"""Trainer callbacks every task uses: a predictions writer and an end-of-fit summary."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from frozenlm.predictions import ClassPredictionsCSV, ClassPredictionsJSON, PredictionFile


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions to one file as batches finish (`predictions`).

    The file is opened before the first batch, so a path that cannot be written (no permission, a
    parent that is a file, an unknown suffix) stops `predict` before any work; an interrupted pass
    leaves every finished batch in it. Tasks with their own formats (motion forecasting: CSV, or
    Argoverse 2's submission `.parquet`) provide `prediction_file(path)`.

    Args:
        output: `.csv` or `.json` file (`.parquet` for Argoverse 2 submissions); None writes
            `predictions.csv` in the trainer's log dir. Under DDP each process writes
            `<stem>.rank<N><suffix>` as it goes, and process 0 joins them into `output` at the end (in
            dataset order: the file one process writes); an interrupted pass leaves the per-process files.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self.file: PredictionFile | None = None
        self.path = Path()  # the requested file, set when predict starts

    def on_predict_start(self, trainer: lightning.Trainer, pl_module) -> None:
        self.path = path = Path(self.output) if self.output else Path(trainer.log_dir or ".") / "predictions.csv"
        if trainer.world_size > 1:
            path = self.part(trainer.global_rank)
        if hasattr(pl_module, "prediction_file"):
            self.file = pl_module.prediction_file(path)
        else:
            class_names = getattr(trainer.datamodule, "classes", None)
            self.file = (ClassPredictionsJSON if path.suffix == ".json" else ClassPredictionsCSV)(path, class_names)

    def part(self, rank: int) -> Path:
        """The file process `rank` writes under DDP."""
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        self.file.write_batch(prediction, batch)

    def on_predict_end(self, trainer: lightning.Trainer, pl_module) -> None:
        count, kind = self.file.close(), type(self.file)
        self.file = None
        if trainer.world_size == 1:
            print(f"Wrote {count} predictions to {self.path}")
            return
        trainer.strategy.barrier()  # every process's file is complete
        if trainer.is_global_zero:
            parts = [self.part(rank) for rank in range(trainer.world_size)]
            count = kind.join(parts, self.path)
            print(f"Wrote {count} predictions to {self.path} (from {trainer.world_size} processes)")
        trainer.strategy.barrier()


class RunSummary(Callback):
    """Prints, at the end of `fit`, the best monitored metric and where the logs and checkpoints are."""

    def on_fit_end(self, trainer: lightning.Trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if not trainer.is_global_zero:
            return
        lines = ["", "Run summary"]
        checkpoints = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        for checkpoint in checkpoints:
            if checkpoint.monitor and checkpoint.best_model_score is not None:
                lines.append(f"  best {checkpoint.monitor}: {checkpoint.best_model_score.item():.4f}")
        for name, value in sorted(trainer.callback_metrics.items()):
            if name.startswith("val_"):
                lines.append(f"  last {name}: {value.item():.4f}")
        if log_dir:
            lines.append(f"  TensorBoard: tensorboard --logdir {log_dir}")
        for checkpoint in checkpoints:
            label = "best" if checkpoint.monitor else "latest"
            for path in {checkpoint.best_model_path, checkpoint.last_model_path} - {""}:
                size = Path(path).stat().st_size / 2**20
                lines.append(f"  {label if path == checkpoint.best_model_path else 'last'} checkpoint: {path} ({size:.1f} MiB)")
        for name, block in getattr(pl_module, "frozen_lm_blocks", dict)().items():
            stored = "embedded in" if block.embed_weights or block.trainable else "not stored in"
            lora = "; its LoRA adapters are stored" if block.lora is not None else ""
            lines.append(
                f"  {name}: weights {stored} checkpoints (source {block.source}, layers {block.layer_indices}){lora}"
            )
        print("\n".join(lines))


class ScenePlots(Callback):
    """Draws the first `count` scenes of the first validation batch each epoch, with the model's K
    forecasts shaded by score and the ground truth, to TensorBoard (`val_scenes`), for motion
    forecasting (see `draw_scene`).

    Args:
        count: scenes per figure.
    """

    def __init__(self, count: int = 4) -> None:
        self.count = count

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or not hasattr(experiment, "add_figure"):
            return
        from frozenlm.analysis.scenes import scenes_figure

        trajectories, logits = pl_module(batch)
        figure = scenes_figure(batch, trajectories, logits.softmax(dim=-1), self.count)
        experiment.add_figure("val_scenes", figure, global_step=trainer.global_step, close=True)


class EMA(Callback):
    """Exponential moving average of the trainable weights only (DeiT's model EMA).

    Lightning's `EMAWeightAveraging` deep-copies the whole module and writes the copy into every
    checkpoint, which would duplicate a frozen LM block (0.8 GB for a LLaMA-7B layer); this keeps an
    average of the parameters that train and nothing else. Validation (and test) run on the averaged
    weights when `evaluate_average` is on; checkpoints keep the live weights in `state_dict` and
    the average in this callback's state, so a resumed run continues the same average.

    Add it with `--trainer.callbacks+=frozenlm.callbacks.EMA --trainer.callbacks.decay 0.99996`.

    Args:
        decay: per-step decay (DeiT: 0.99996).
        evaluate_average: validate and test with the averaged weights.
    """

    def __init__(self, decay: float = 0.99996, evaluate_average: bool = True) -> None:
        self.decay = decay
        self.evaluate_average = evaluate_average
        self.average: dict[str, torch.Tensor] | None = None

    def _trainable(self, pl_module) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: lightning.Trainer, pl_module) -> None:
        params = self._trainable(pl_module)
        if self.average is None:
            self.average = {name: p.detach().clone() for name, p in params.items()}
        elif set(self.average) != set(params):
            # A checkpoint written before the task held its network as `model`: the same rule as its state dict's.
            moved = {(f"model.{n}" if n not in params and f"model.{n}" in params else n): t
                     for n, t in self.average.items()}  # fmt: skip
            if set(moved) != set(params):
                raise ValueError("The EMA state in the checkpoint does not match the model's trainable parameters.")
            self.average = moved
        self.average = {name: t.to(params[name].device) for name, t in self.average.items()}

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = self._trainable(pl_module)
        names = list(self.average)
        torch._foreach_lerp_([self.average[n] for n in names], [params[n].detach() for n in names], 1.0 - self.decay)

    def _swap(self, pl_module) -> None:
        if not self.evaluate_average or self.average is None:
            return
        for name, param in self._trainable(pl_module).items():
            live = param.detach().clone()
            param.data.copy_(self.average[name])
            self.average[name].copy_(live)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._swap(pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._swap(pl_module)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": self.average}

    def load_state_dict(self, state_dict: dict) -> None:
        self.average = state_dict["average"]

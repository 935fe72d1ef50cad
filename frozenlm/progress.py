"""Progress for logs: plain lines when the output is not a terminal (a SLURM job, `nohup`, a pipe).

A rich (or tqdm) progress bar redraws one line of a terminal; written to a file it shows nothing
until the run ends. `ProgressLines` prints, instead, one flushed line at every
`every_fraction` of a pass (training epoch, validation, test, predict) and at least every
`every_seconds` in a long one, from process 0 only:

    Epoch 3/99  batch 126/1251 (10%)  train_loss 2.346  5.21 it/s  elapsed 0:00:24  ETA 0:03:34
    Epoch 3/99  validation  batch 5/50 (10%)  10.3 it/s  elapsed 0:00:00  ETA 0:00:04
    Epoch 3/99  validated  val_acc1 0.5133  val_loss 1.872

The epoch is counted from 0 with the last one after the slash, as the rich bar and the checkpoint names
count; `it/s` is batches per second since the pass began, and `ETA` the rest of the pass at that rate.
The trainer commands choose it themselves (`progress_bar`): the rich bar in a terminal, these lines
elsewhere; `--progress.every_fraction` and `--progress.every_seconds` set when lines are printed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import lightning
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


@dataclasses.dataclass
class _Pass:
    """One pass over a dataloader being reported: its label, batches, and when lines are next due."""

    label: str
    total: float  # batches; inf when the loader has no length
    started: float  # clock at the start of the pass
    last_line: float  # clock at the last line printed
    first: int | None = None  # batches done before this process's first one (a resumed epoch's)
    mark: int = 0  # the batch count at which the next fraction line is due


class ProgressLines(ProgressBar):
    """Training, validation, test and predict progress as one plain line at a time (see the module).

    Args:
        every_fraction: a line each time this fraction of a pass is done (0.1: at 10 %, 20 %, ... 100 %).
        every_seconds: also a line when this many seconds passed since the last one (long epochs).
    """

    clock = staticmethod(time.monotonic)  # seconds; tests give a fake one

    def __init__(self, every_fraction: float = 0.1, every_seconds: float = 300.0) -> None:
        super().__init__()
        if not 0 < every_fraction <= 1:
            raise ValueError(f"--progress.every_fraction must be in (0, 1], got {every_fraction}.")
        if not every_seconds > 0:
            raise ValueError(f"--progress.every_seconds must be positive, got {every_seconds}.")
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self._enabled = True
        self._pass: _Pass | None = None
        self._training: _Pass | None = None  # the epoch's pass, resumed after a validation within it

    def disable(self) -> None:  # Lightning disables the bar on every process but 0
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # Lines

    def _epoch(self, trainer: lightning.Trainer) -> str:
        last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else None
        return f"Epoch {trainer.current_epoch}" + (f"/{last}" if last is not None else "")

    def _begin(self, label: str, total: float) -> _Pass:
        now = self.clock()
        return _Pass(label, total, started=now, last_line=now)

    def _next_mark(self, done: int, total: float) -> int:
        """The batch count of the first fraction line after `done` batches (`total` for the last)."""
        step = self.every_fraction * total
        k = math.floor(round(done / step, 9)) + 1
        return min(math.ceil(round(k * step, 9)), int(total))

    def _batch_done(self, progress: _Pass, batch_idx: int, metrics: dict[str, Any] | None = None) -> None:
        done = batch_idx + 1
        if progress.first is None:
            progress.first = batch_idx
            progress.mark = self._next_mark(batch_idx, progress.total) if _counted(progress.total) else 0
        now = self.clock()
        due_mark = _counted(progress.total) and done >= progress.mark
        if not (due_mark or now - progress.last_line >= self.every_seconds):
            return
        if due_mark:
            progress.mark = self._next_mark(done, progress.total)
        progress.last_line = now
        self._print_line(progress, done, now, metrics or {})

    def _print_line(self, progress: _Pass, done: int, now: float, metrics: dict[str, Any]) -> None:
        if not self._enabled:
            return
        elapsed = now - progress.started
        rate = (done - progress.first) / elapsed if elapsed > 0 else math.nan
        fields = [progress.label]
        if math.isfinite(progress.total):
            fields.append(f"batch {done}/{int(progress.total)} ({100 * done / max(progress.total, 1):.0f}%)")
        else:
            fields.append(f"batch {done}")
        fields += [f"{name} {_number(value)}" for name, value in metrics.items()]
        fields.append(f"{rate:.3g} it/s" if math.isfinite(rate) else "? it/s")
        fields.append(f"elapsed {_duration(elapsed)}")
        if math.isfinite(progress.total) and math.isfinite(rate) and rate > 0:
            fields.append(f"ETA {_duration((progress.total - done) / rate)}")
        self.print("  ".join(fields), flush=True)

    def _metrics(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> dict[str, Any]:
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    # Training

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._training = self._pass = self._begin(self._epoch(trainer), self.total_train_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._training is not None:  # the last validation's metrics have their own line
            metrics = {k: v for k, v in self._metrics(trainer, pl_module).items() if not k.startswith("val")}
            self._batch_done(self._training, batch_idx, metrics)

    # Evaluation: validation (within fit or alone), test, predict

    def _eval_batch_start(self, trainer: lightning.Trainer, name: str, totals: Any, dataloader_idx: int) -> None:
        if trainer.sanity_checking or not self.has_dataloader_changed(dataloader_idx):
            return
        total = totals[dataloader_idx] if isinstance(totals, list) else totals
        label = name + (f" (dataloader {dataloader_idx})" if isinstance(totals, list) and len(totals) > 1 else "")
        if trainer.state.fn == "fit":
            label = f"{self._epoch(trainer)}  {label}"
        self._pass = self._begin(label, total)

    def _eval_batch_end(self, trainer: lightning.Trainer, batch_idx: int) -> None:
        if not trainer.sanity_checking and self._pass is not None and self._pass is not self._training:
            self._batch_done(self._pass, batch_idx)

    def _eval_end(self) -> None:
        self.reset_dataloader_idx_tracker()
        self._pass = self._training

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "validation", trainer.num_val_batches, dataloader_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, batch_idx)

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._enabled:
            metrics = {k: v for k, v in self._metrics(trainer, pl_module).items() if not k.startswith("train")}
            self.print("  ".join([f"{self._epoch(trainer)}  validated", *(f"{k} {_number(v)}" for k, v in metrics.items())]),
                       flush=True)  # fmt: skip
        self._eval_end()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "test", trainer.num_test_batches, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, batch_idx)

    def on_test_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._eval_end()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_start(trainer, "predict", trainer.num_predict_batches, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, batch_idx)

    def on_predict_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._eval_end()


def progress_bar(lines: ProgressLines) -> ProgressBar:
    """The progress display for this process's standard output: the rich bar in a terminal, `lines`
    otherwise (a file or pipe, where the bar would show nothing until the run ends)."""
    isatty = getattr(sys.stdout, "isatty", None)
    return RichProgressBar() if isatty is not None and isatty() else lines


def _counted(total: float) -> bool:
    """Whether a pass has a known, positive number of batches (fraction lines need one)."""
    return math.isfinite(total) and total > 0


def _number(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

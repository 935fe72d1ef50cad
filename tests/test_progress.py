"""Progress where the output is not a terminal (SLURM logs, nohup, pipes): plain lines during each pass."""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import Callback, RichProgressBar

from frozenlm.progress import ProgressLines, progress_bar
from tests.cli_helpers import last_checkpoint, run_cli

LINE = re.compile(r"(?P<label>.*?)  batch (?P<done>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\)(?P<rest>.*)")


class Pipe(io.RawIOBase):
    """The far end of a pipe: holds only what the process flushed (Python buffers the rest)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.seen: list[str] = []  # what had been received when each training batch started

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.received += bytes(data)
        return len(data)


class SeenBeforeEachBatch(Callback):
    """Records what had reached the pipe standing in for stdout when each training batch started."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pipe = sys.stdout.buffer.raw
        pipe.seen.append(pipe.received.decode())


def lines(text: str, label: str) -> list[re.Match]:
    return [m for m in map(LINE.fullmatch, text.splitlines()) if m and m["label"] == label]


def test_fit_and_test_print_progress_lines_as_they_go_when_stdout_is_a_pipe(tmp_path, monkeypatch):
    pipe = Pipe()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(pipe, buffer_size=1 << 20)))
    progress = ["--trainer.enable_progress_bar", "true", "--progress.every_fraction", "0.2"]
    cli = run_cli("fit", "image_baseline", tmp_path, *progress, "--trainer.limit_train_batches", "10",
                  "--trainer.callbacks+=tests.test_progress.SeenBeforeEachBatch")  # fmt: skip
    assert isinstance(cli.trainer.progress_bar_callback, ProgressLines)

    # A line at every 20 % of the epoch, each in the pipe before the next batch started.
    before_batch_5 = lines(pipe.seen[4], "Epoch 0/0")
    assert [int(m["done"]) for m in before_batch_5] == [2, 4]
    train = lines(pipe.received.decode(), "Epoch 0/0")
    assert [(int(m["done"]), int(m["total"]), int(m["percent"])) for m in train] == [(2, 10, 20), (4, 10, 40), (6, 10, 60),
                                                                                     (8, 10, 80), (10, 10, 100)]  # fmt: skip
    for match in train:
        assert re.fullmatch(r"  train_loss \d\.\d+  [\d.]+ it/s  elapsed 0:\d\d:\d\d  ETA 0:\d\d:\d\d", match["rest"]), match[0]
    # Validation within the epoch (2 batches): its own lines, then its metrics.
    output = pipe.received.decode()
    assert [int(m["done"]) for m in lines(output, "Epoch 0/0  validation")] == [1, 2]
    assert re.search(r"^Epoch 0/0  validated  val_acc1 [\d.]+  val_acc5 [\d.]+$", output, re.M)

    run_cli("test", "image_baseline", tmp_path, *progress, "--ckpt_path", str(last_checkpoint(tmp_path)))
    assert [int(m["done"]) for m in lines(pipe.received.decode(), "test")] == [1, 2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stub_trainer(rank: int = 0) -> SimpleNamespace:
    """What a progress bar reads of a trainer during a 10-batch training epoch (epoch 2 of 0..4)."""
    return SimpleNamespace(is_global_zero=rank == 0, current_epoch=2, max_epochs=5, max_steps=-1, global_step=20,
                           num_training_batches=10, loggers=[], progress_bar_metrics={"train_loss": 1.5})  # fmt: skip


@pytest.mark.parametrize("rank", [0, 1])
def test_long_epochs_print_a_line_every_every_seconds(rank, capsys):
    """25 s per batch, a line per minute (and the fraction lines only at the end): lines after batches 3,
    6 and 9 (75 s after the previous one each), and the last batch; none on other processes."""
    bar, clock, trainer = ProgressLines(every_fraction=1.0, every_seconds=60), FakeClock(), stub_trainer(rank)
    bar.clock = clock
    bar.setup(trainer, None, "fit")
    bar.on_train_epoch_start(trainer, None)
    for batch_idx in range(10):
        clock.now += 25
        bar.on_train_batch_end(trainer, None, None, None, batch_idx)
    out = capsys.readouterr().out
    if rank:
        assert out == ""
        return
    assert out.splitlines() == [
        "Epoch 2/4  batch 3/10 (30%)  train_loss 1.5  0.04 it/s  elapsed 0:01:15  ETA 0:02:55",
        "Epoch 2/4  batch 6/10 (60%)  train_loss 1.5  0.04 it/s  elapsed 0:02:30  ETA 0:01:40",
        "Epoch 2/4  batch 9/10 (90%)  train_loss 1.5  0.04 it/s  elapsed 0:03:45  ETA 0:00:25",
        "Epoch 2/4  batch 10/10 (100%)  train_loss 1.5  0.04 it/s  elapsed 0:04:10  ETA 0:00:00",
    ]


def test_a_terminal_keeps_the_rich_bar(monkeypatch):
    lines_bar = ProgressLines()
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(isatty=lambda: True))
    assert isinstance(progress_bar(lines_bar), RichProgressBar)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert progress_bar(lines_bar) is lines_bar


@pytest.mark.parametrize("options", [{"every_fraction": 0}, {"every_fraction": 1.5}, {"every_seconds": 0}])
def test_intervals_out_of_range_are_refused(options):
    with pytest.raises(ValueError, match="--progress.every_"):
        ProgressLines(**options)

"""Non-finite values never reach the weights: a NaN or infinite training loss stops the run naming the
batch's samples (or skips the step, counted, up to a limit), and no checkpoint with non-finite weights
is ever written."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from frozenlm.checkpoints import AtomicCheckpointIO, NonFiniteWeightsError
from frozenlm.cli import main
from frozenlm.tasks.base import NonFiniteLossError
from tests.cli_helpers import load_checkpoint, run_cli

POISON = ["--trainer.callbacks+=tests.test_nonfinite.PoisonBatch", "--trainer.callbacks.step", "4"]


class PoisonBatch(Callback):
    """Puts a NaN into the first image of the batch at optimizer step ``step`` (a damaged sample), and
    records whether that step changed any weight."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] | None = None
        self.changed: bool | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch["image"][0, 0, 0, 0] = float("nan")
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is not None and self.changed is None:
            self.changed = any(not torch.equal(v, self.before[k]) for k, v in pl_module.state_dict().items())


def checkpoints(root):
    return sorted(p for p in root.rglob("*.ckpt") if p.is_file() and not p.is_symlink())


def test_a_nan_loss_stops_the_run_naming_the_samples_and_keeps_finite_checkpoints(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 4 \(batch 1\).*samples \['digits/"):
        run_cli("fit", "image_baseline", tmp_path, "--trainer.max_epochs", "3", *POISON)
    saved = checkpoints(tmp_path)
    assert saved and all(p.name.split("-")[0] in ("best", "epoch000") for p in saved)  # epoch 0's, none after
    for path in saved:
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["state_dict"].values())


def test_nonfinite_steps_are_skipped_up_to_the_limit_without_an_update(tmp_path):
    cli = run_cli("fit", "image_baseline", tmp_path, "--trainer.max_epochs", "2", "--model.max_nonfinite_steps", "1", *POISON)
    poison = next(c for c in cli.trainer.callbacks if type(c).__name__ == "PoisonBatch")
    assert poison.changed is False  # the skipped step moved no weight (nor, with AdamW, any moment)
    assert cli.model.nonfinite_steps_skipped == 1
    assert cli.trainer.callback_metrics["train/nonfinite_steps_skipped"] == 1
    assert cli.trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_the_console_script_prints_a_nonfinite_loss_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["frozenlm", "fit", "--config", "tests/conf/image_baseline.yaml",
                                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                                     str(tmp_path), "--trainer.max_epochs", "2", *POISON])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[0].startswith("frozenlm: error: NonFiniteLossError: The training loss is not finite")


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(NonFiniteWeightsError, match=r"last.ckpt: 1 of 2 tensors hold NaN or infinite values \(b\)"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

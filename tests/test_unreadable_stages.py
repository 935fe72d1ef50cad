"""The error that stops a run with too many unreadable samples names the first files of each stage apart."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from lightning.pytorch.trainer.states import RunningStage

from frozenlm.data.base import ClassificationDataModule, TooManyUnreadableSamplesError


def test_the_too_many_unreadable_samples_error_lists_the_first_files_per_stage():
    data = ClassificationDataModule(batch_size=4, max_unreadable_fraction=0.25)
    trainer = SimpleNamespace(state=SimpleNamespace(stage=RunningStage.VALIDATING), current_epoch=0,
                              num_val_batches=[100], num_training_batches=2)  # fmt: skip
    data.trainer = trainer
    with pytest.warns(UserWarning, match="Skipping unreadable sample"):
        data._count_unreadable(["val/a.png (OSError)", "val/b.png (OSError)"])  # 2 of 400: fine
        trainer.state.stage = RunningStage.TRAINING
        data._count_unreadable(["train/e.png (OSError)"])  # 1 of 8: fine
        with pytest.raises(TooManyUnreadableSamplesError) as error:
            data._count_unreadable(["train/d.png (OSError)", "train/c.png (OSError)", "train/f.png (OSError)"])
    message = str(error.value)
    assert "4 unreadable samples in this train epoch" in message
    # This stage's first three as they came, then the other stage's (all stages sorted together would give
    # train/c, train/d, train/e, hiding that validation had unreadable files too, or the other way round).
    files = re.search(r"\(first files (.*)\)\. Repair", message).group(1)
    assert files == ("of train: ['train/e.png (OSError)', 'train/d.png (OSError)', 'train/c.png (OSError)']; "
                     "of validate: ['val/a.png (OSError)', 'val/b.png (OSError)']")  # fmt: skip

"""`make demo` end to end: the real pretrained MiniLM layer on Digits reaches a sensible accuracy (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from frozenlm.cli import run
from tests.cli_helpers import last_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_learns_digits_without_storing_frozen_weights(tmp_path, minilm_checkpoint):
    cli = run(
        [
            "fit", "--config", str(REPO / "configs/demo.yaml"),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert cli.model.model.llm_block.source == minilm_checkpoint
    assert cli.trainer.callback_metrics["val_acc1"].item() > 0.6  # chance is 0.1
    state = load_checkpoint(last_checkpoint(tmp_path))["state_dict"]
    assert not [key for key in state if key.startswith("model.llm_block.layers.")]

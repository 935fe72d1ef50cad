"""Exact resumption after a kill, and 2-process DDP on CPU (gloo), through the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli, run_cli_subprocess


def cli_subprocess(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m frozenlm.cli fit --config tests/conf/image_llama.yaml ...`` in a fresh process."""
    return run_cli_subprocess("fit", "image_llama", root, *args)


@pytest.mark.parametrize("repeated_augmentation", [1, 3])
def test_killed_run_resumes_exactly(tmp_path, tiny_llama_checkpoint, repeated_augmentation):
    common = [
        "--model.llm.checkpoint", str(tiny_llama_checkpoint), "--trainer.max_epochs", "3",
        "--data.repeated_augmentation", str(repeated_augmentation),
    ]  # fmt: skip
    straight = run_cli("fit", "image_llama", tmp_path / "straight", *common)

    killed = cli_subprocess(
        tmp_path / "killed", *common, "--trainer.callbacks+=tests.cli_helpers.ExitAtEpoch", "--trainer.callbacks.epoch", "2"
    )
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert load_checkpoint(last_checkpoint(tmp_path / "killed"))["global_step"] == 6  # 2 epochs x 3 steps

    resumed = run_cli("fit", "image_llama", tmp_path / "killed", *common, "--ckpt_path", "last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 9
    # `last` resolved to the killed run's checkpoint and the run kept logging into its version.
    assert len(list((tmp_path / "killed" / "frozenlm").glob("version_*"))) == 1

    for name in ("val_loss", "val_acc1", "train_loss"):
        assert torch.equal(resumed.trainer.callback_metrics[name], straight.trainer.callback_metrics[name]), name
    expected = straight.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_ddp_two_processes_on_cpu(tmp_path, tiny_llama_checkpoint):
    run = cli_subprocess(
        tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    state = load_checkpoint(last_checkpoint(tmp_path))
    assert state["global_step"] == 3
    assert not [k for k in state["state_dict"] if k.startswith("llm_block.layers.")]
    # lr = 5e-4 x global batch / 512, global batch = 16 per process x 2 processes.
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 5e-4 * 32 / 512

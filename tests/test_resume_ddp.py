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


def test_killed_ddp_run_resumes_exactly_with_a_random_stream_per_process(tmp_path, tiny_llama_checkpoint):
    """2 gloo processes with the config's augmentation (RandAugment, random erasing, mixup/cutmix,
    stochastic depth): each process draws from its own random streams, and a run killed after 2 epochs
    and resumed from `last` ends bit-identical to an uninterrupted one."""
    common = [
        "--model.llm.checkpoint", str(tiny_llama_checkpoint), "--trainer.max_epochs", "3",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    streams = tmp_path / "streams"
    record = ["--trainer.callbacks+=tests.cli_helpers.RecordRandomStreams", "--trainer.callbacks.path", str(streams)]
    straight = cli_subprocess(tmp_path / "straight", *common, *record)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli_subprocess(
        tmp_path / "killed", *common, "--trainer.callbacks+=tests.cli_helpers.ExitAtEpoch", "--trainer.callbacks.epoch", "2"
    )
    assert killed.returncode == 17, killed.stderr[-3000:]
    resumed = cli_subprocess(tmp_path / "killed", *common, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, state = (load_checkpoint(last_checkpoint(tmp_path / run)) for run in ("straight", "killed"))
    assert state["global_step"] == expected["global_step"] == 9
    for key, value in expected["state_dict"].items():
        assert torch.equal(state["state_dict"][key], value), key
    assert not [k for k in state["state_dict"] if k.startswith("model.llm_block.layers.")]
    # lr = 5e-4 x global batch / 512, global batch = 16 per process x 2 processes.
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 5e-4 * 32 / 512

    rank0, rank1 = (dict(line.split() for line in streams.with_name(f"streams.rank{r}").read_text().splitlines()) for r in (0, 1))
    assert rank0.keys() == rank1.keys() == {str(step) for step in range(9)}
    assert all(rank0[step] != rank1[step] for step in rank0)  # no step where both processes drew alike
    assert len(set(rank0.values()) | set(rank1.values())) == 18

"""Running the `frozenlm` CLI in-process from tests, with every output under a temporary folder."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from frozenlm.cli import main, run

CONF = Path(__file__).parent / "conf"
REPO = Path(__file__).resolve().parents[1]


def run_cli(subcommand: str, config: str, root: Path, *args: str):
    """``frozenlm <subcommand> --config tests/conf/<config>.yaml`` with logs and checkpoints under ``root``."""
    return run(
        [
            subcommand,
            "--config", str(CONF / f"{config}.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            *args,
        ]
    )  # fmt: skip


def main_args(argv: list[str]) -> None:
    """`frozenlm <argv>` through the console entry point (`frozenlm.cli.main`, which reads `sys.argv`)."""
    old, sys.argv = sys.argv, ["frozenlm", *argv]
    try:
        main()
    finally:
        sys.argv = old


def cli_command(subcommand: str, config: str, root: Path, *args: str) -> list[str]:
    """The command line of ``run_cli`` in a fresh process (``python -m frozenlm.cli``)."""
    return [
        sys.executable, "-m", "frozenlm.cli", subcommand, "--config", str(CONF / f"{config}.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *args,
    ]  # fmt: skip


def start_cli_subprocess(command: list[str], **env: str) -> subprocess.Popen:
    """Start ``command`` with ``env`` added, in its own process group, so that a time-out can kill the
    DDP processes it starts too (they hold its output pipes)."""
    # One thread, like the in-process runs (conftest), so float reductions match bit for bit.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a started process; kill its process group and fail after ``timeout`` seconds."""
    with process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"{' '.join(process.args)} ran past {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_cli_subprocess(subcommand: str, config: str, root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``run_cli`` in a fresh process, e.g. to launch DDP processes."""
    return finish(start_cli_subprocess(cli_command(subcommand, config, root, *args)), timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DumpMetrics(Callback):
    """Writes the metrics of a ``test`` run (rank 0's, synced over the processes) to the JSON file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_test_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))


def last_checkpoint(root: Path) -> Path:
    """The newest last.ckpt under ``root``."""
    return max(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class ExitAtEpoch(Callback):
    """Ends the process abruptly (no cleanup, like a kill) when training reaches ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(17)


def check_lora_round_trip(config: str, root: Path, *args: str) -> None:
    """Fit ``config`` with a LoRA-unlocked block, then validate its last checkpoint: the checkpoint
    holds the adapters only (no frozen weight), and the restored model scores exactly as trained."""
    fit = run_cli("fit", config, root, *args, "--model.llm.lora", "{r: 4, alpha: 8}")
    checkpoint = last_checkpoint(root)
    keys = [k for k in load_checkpoint(checkpoint)["state_dict"] if k.removeprefix("model.").startswith("llm_block.layers.")]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    validate = run_cli("validate", config, root, *args, "--ckpt_path", str(checkpoint))
    assert torch.equal(validate.trainer.callback_metrics["val_loss"], fit.trainer.callback_metrics["val_loss"])


class RecordRandomStreams(Callback):
    """Appends, for every training step, a fingerprint of this process's random states (Python, NumPy and
    torch: what augmentation, mixup and stochastic depth draw from) to ``<path>.rank<N>``, one per line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        states = pickle.dumps((random.getstate(), np.random.get_state(), torch.random.get_rng_state().numpy()))
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as file:
            file.write(f"{trainer.global_step} {hashlib.sha256(states).hexdigest()}\n")


class InitialWeights(Callback):
    """Keeps a copy of the model's state dict as training starts (``.state``), for in-process runs."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}


class PreemptOnce(Callback):
    """Sends this process the signal a cluster sends before a time limit or a preemption (submitit's
    SIGUSR2) at the start of training epoch ``epoch``, on the first attempt only (a marker file at
    ``path`` remembers it)."""

    def __init__(self, path: str, epoch: int = 2) -> None:
        self.path, self.epoch = Path(path), epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and not self.path.exists():
            self.path.touch()
            os.kill(os.getpid(), signal.SIGUSR2)

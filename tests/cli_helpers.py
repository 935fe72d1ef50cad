"""Running the `frozenlm` CLI in-process from tests, with every output under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import torch

from frozenlm.cli import main

CONF = Path(__file__).parent / "conf"


def run_cli(subcommand: str, config: str, root: Path, *args: str):
    """``frozenlm <subcommand> --config tests/conf/<config>.yaml`` with logs and checkpoints under ``root``."""
    return main(
        [
            subcommand,
            "--config", str(CONF / f"{config}.yaml"),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            *args,
        ]
    )  # fmt: skip


def last_checkpoint(root: Path) -> Path:
    """The newest last.ckpt under ``root``."""
    return max(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)

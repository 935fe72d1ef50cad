"""Checkpoints through the CLI under faults: a full disk, an unwritable directory, a damaged file to
resume from, and resuming with values that differ from the checkpoint's."""

from __future__ import annotations

import errno
import os
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch

import frozenlm.checkpoints
from frozenlm.checkpoints import AtomicCheckpointIO, CheckpointDirectoryError
from frozenlm.cli import ConfigurationError, main
from frozenlm.files import write_atomically
from frozenlm.tasks import ImageClassifier
from tests.cli_helpers import run_cli

EPOCHS = ["--trainer.max_epochs", "2"]


def checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "checkpoints" in p.parts)


def test_a_disk_that_fills_during_a_save_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    other_tmp = tmp_path / "system-tmp"  # TMPDIR elsewhere, as on most clusters: it must not matter
    other_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(other_tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    real_save, saves = torch.save, []

    def fills_the_disk(obj, file):
        saves.append(os.readlink(f"/proc/self/fd/{file.fileno()}"))  # where the bytes go
        if len(saves) <= 2:  # epoch 0: the best and the latest checkpoint
            return real_save(obj, file)
        file.write(b"PK\x03\x04" + b"\0" * 1000)  # the first kilobyte, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frozenlm.checkpoints.torch, "save", fills_the_disk)
    with pytest.raises(OSError, match="No space left"):
        run_cli("fit", "image_baseline", tmp_path / "runs", *EPOCHS)
    assert len(saves) == 3 and all(Path(name).parent.name == "checkpoints" for name in saves)  # beside the target
    files = checkpoint_files(tmp_path / "runs")
    assert [f.name for f in files if f.suffix != ".ckpt"] == []  # no partial file left behind
    assert {f.name.split("-")[0] for f in files} == {"best", "epoch000", "last.ckpt"}
    for file in files:
        torch.load(file, weights_only=True)  # every checkpoint name holds a complete checkpoint
    assert list(other_tmp.iterdir()) == []


def test_a_failed_save_keeps_the_previous_file_under_that_name(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    def fails(obj, file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frozenlm.checkpoints.torch, "save", fails)
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_cli_trainer_writes_checkpoints_atomically(tmp_path):
    cli = run_cli("fit", "image_baseline", tmp_path)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_an_unwritable_checkpoint_directory_stops_the_run_before_the_first_step(tmp_path, monkeypatch):
    version = tmp_path / "frozenlm" / "version_0"
    version.mkdir(parents=True)
    (version / "checkpoints").write_text("a file where the checkpoint directory should be")
    monkeypatch.setattr(ImageClassifier, "training_step", lambda *a: pytest.fail("trained before the check"))
    with pytest.raises(CheckpointDirectoryError, match=rf"cannot be written to {version / 'checkpoints'}"):
        run_cli("fit", "image_baseline", tmp_path, "--trainer.logger.init_args.version", "0")


@pytest.fixture
def two_epochs(tmp_path) -> Path:
    run_cli("fit", "image_baseline", tmp_path, *EPOCHS)
    return tmp_path


def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(two_epochs, capsys):
    checkpoints = two_epochs / "frozenlm" / "version_0" / "checkpoints"
    latest = (checkpoints / "last.ckpt").resolve()
    assert latest.name.startswith("epoch001")
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a save cut short
    damaged = rf"checkpoint {checkpoints / 'last.ckpt'} \(a link to {latest}\) is damaged"
    with pytest.raises(ConfigurationError, match=damaged) as error:
        run_cli("fit", "image_baseline", two_epochs, *EPOCHS, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    assert f"resuming from {checkpoints / 'last.ckpt'}" in capsys.readouterr().out  # the file `last` resolved to
    intact = Path(str(error.value).split("resume with --ckpt_path ")[1].rstrip("."))
    assert intact.parent == checkpoints and intact.resolve() != latest
    torch.load(intact, weights_only=True)

    empty = checkpoints / "empty.ckpt"
    empty.touch()
    with pytest.raises(ConfigurationError, match=rf"{empty} is damaged .*resume with --ckpt_path"):
        run_cli("validate", "image_baseline", two_epochs, "--ckpt_path", str(empty))


def test_the_console_script_prints_a_configuration_error_as_one_reason(tmp_path, monkeypatch, capsys):
    argv = ["frozenlm", "fit", "--config", "configs/imagenet_deit_small.yaml", "--data.root", str(tmp_path / "none"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(Path(__file__).parents[1])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        f"frozenlm: error: DatasetNotFoundError: ImageFolderDataModule: no class folders in {tmp_path / 'none' / 'train'}. "
        "Expected root/train/<class>/*.JPEG and root/val/<class>/*.JPEG; pass --data.root DIR pointing at the "
        "directory that holds train/ and val/."
    )
    assert len(err) == 2 and "FROZENLM_DEBUG=1" in err[1]  # no traceback, no config dump

    monkeypatch.setenv("FROZENLM_DEBUG", "1")
    with pytest.raises(SystemExit):
        main()
    debug = capsys.readouterr().err.strip().splitlines()
    assert debug[0] == debug[-1] == err[0] and any(line.startswith("Traceback") for line in debug)


def test_resuming_with_other_values_names_each_differing_key(tiny_llama_checkpoint, tmp_path):
    llm = ["--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    run_cli("fit", "image_llama", tmp_path / "llm", *llm)
    ckpt = next((tmp_path / "llm").rglob("last.ckpt"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli = run_cli("validate", "image_llama", tmp_path / "llm", *llm, "--ckpt_path", str(ckpt),
                      "--model.llm.layers", "[2]", "--model.llm.init", "random", "--model.lr", "0.1")  # fmt: skip
    (message,) = [str(w.message) for w in record if "the checkpoint's are used" in str(w.message)]
    assert message.splitlines()[1:] == [
        "  model.llm.layers: [-1] from the checkpoint (given [2])",
        "  model.llm.init: 'pretrained' from the checkpoint (given 'random')",
        "  model.lr: 0.0005 from the checkpoint (given 0.1)",
    ]
    assert cli.model.model.llm_block.layer_indices == [5] and cli.model.model.llm_block.init == "pretrained"


def test_a_missing_checkpoint_is_named_with_the_newest_intact_one(two_epochs):
    checkpoints = two_epochs / "frozenlm" / "version_0" / "checkpoints"
    missing = checkpoints / "epoch009-step30.ckpt"
    with pytest.raises(ConfigurationError, match=rf"{missing} does not exist .*resume with --ckpt_path {checkpoints}"):
        run_cli("validate", "image_baseline", two_epochs, "--ckpt_path", str(missing))


def test_last_passes_over_a_link_to_a_deleted_checkpoint(two_epochs, capsys):
    checkpoints = two_epochs / "frozenlm" / "version_0" / "checkpoints"
    dangling = checkpoints / "last-v1.ckpt"
    dangling.symlink_to("epoch007-step24.ckpt")  # what a resumed run with other settings left behind
    resumed = run_cli("fit", "image_baseline", two_epochs, *EPOCHS, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    out = capsys.readouterr().out
    assert f"--ckpt_path last: ignoring 1 link(s) to deleted checkpoints: {dangling}" in out
    assert f"resuming from {checkpoints / 'last.ckpt'}" in out and resumed.trainer.current_epoch == 3


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_checkpoints_and_atomic_files_get_the_permissions_of_a_plain_write(tmp_path, umask):
    """The temporary file renamed into place used to keep mkstemp's 0600, so a lab's shared folder was
    unreadable to colleagues; now every file gets 0o666 less the umask, as ``open()`` and ``torch.save`` give."""
    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "ckpt" / "last.ckpt")
        write_atomically(tmp_path / "result.json", "{}")
        torch.save({}, tmp_path / "plain.pt")
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("ckpt/last.ckpt", "result.json", "plain.pt")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left

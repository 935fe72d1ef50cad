"""Checkpoint files that no failure can damage, and clear words when one is damaged anyway.

Lightning writes a local checkpoint through an fsspec transaction, whose temporary file lives in the
system temporary directory: committing it moves it across file systems, a copy that a full disk cuts
short, leaving a truncated file under the checkpoint's name. `AtomicCheckpointIO` writes the
temporary file beside the target instead and renames it into place, so a checkpoint name only ever
holds a complete file, and refuses to write weights that are NaN or infinite, so neither the best nor
the last checkpoint is ever one that cannot be resumed; `CheckpointDirectoryCheck` tries the
checkpoint directories before the first epoch, instead of failing after an epoch of work. `frozenlm`
installs both in every trainer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from frozenlm.errors import FrozenLMError
from frozenlm.files import atomic_path


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is missing or cannot be read; the message names it and an intact one to
    use instead."""


class CheckpointDirectoryError(OSError):
    """A checkpoint directory that cannot be written to."""


class NonFiniteWeightsError(FrozenLMError, FloatingPointError):
    """A checkpoint whose weights hold NaN or infinite values was about to be written; it was not."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, with local files written to a temporary file in the target's
    directory, flushed to disk, then renamed over the target (an atomic replace on POSIX and Windows),
    and no checkpoint written whose `state_dict` holds a NaN or infinite value
    (`NonFiniteWeightsError`, naming the tensors; the checkpoints already written stay as they
    are). Remote paths (`s3://` ...) are written by Lightning as before."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        check_finite_weights(checkpoint.get("state_dict", {}), path)
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path, fsync=True) as partial, open(partial, "wb") as file:
            torch.save(checkpoint, file)


def check_finite_weights(state_dict: dict[str, Any], path) -> None:
    """Raise `NonFiniteWeightsError` when a floating-point tensor of `state_dict` is not finite."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeightsError(
            f"Not writing the checkpoint {path}: {len(bad)} of {len(state_dict)} tensors hold NaN or infinite values "
            f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}). The checkpoints written before are intact: resume "
            "from one with a lower learning rate, or look for NaN or infinite values in the data."
        )


class CheckpointDirectoryCheck(Callback):
    """Before fitting starts, writes and removes a small file in each checkpoint directory, so a
    read-only, missing or full location stops the run at once with the directory named."""

    def on_fit_start(self, trainer: lightning.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # only rank 0 writes checkpoints
            return
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if dirpath and isinstance(get_filesystem(dirpath), LocalFileSystem):
                check_writable(Path(dirpath))


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise CheckpointDirectoryError(
            f"Checkpoints cannot be written to {directory} ({type(error).__name__}: {error}). Free space or fix the "
            "permissions there, or write elsewhere: --trainer.default_root_dir DIR and "
            "--trainer.logger.init_args.save_dir DIR (or the dirpath of your ModelCheckpoint)."
        ) from error


def check_checkpoint(path: str | Path) -> None:
    """Raise `DamagedCheckpointError` when `path` is not a readable checkpoint, naming the newest
    intact checkpoint beside it. Reads the file's structure only (tensors are memory-mapped)."""
    path = Path(path)
    try:
        _read(path)
    except Exception as error:  # missing, truncated, empty, not a checkpoint: whatever torch.load says
        intact = newest_intact_checkpoint(path.parent, exclude=path) if path.parent.is_dir() else None
        instead = (
            f"The newest intact checkpoint beside it is {intact}: resume with --ckpt_path {intact}."
            if intact
            else f"No intact checkpoint is beside it in {path.parent}."
        )
        name = f"{path} (a link to {path.resolve()})" if path.is_symlink() else str(path)
        problem = "does not exist" if not path.exists() else "is damaged or not a checkpoint"
        raise DamagedCheckpointError(
            f"The checkpoint {name} {problem} ({type(error).__name__}: {error}). {instead}"
        ) from error


def newest_intact_checkpoint(directory: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written `*.ckpt` in `directory` that reads (links to `exclude` skipped)."""
    excluded = exclude.resolve() if exclude is not None else None
    candidates = [p for p in directory.glob("*.ckpt") if p.is_file() and p.resolve() != excluded]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            _read(candidate)
        except Exception:
            continue
        return candidate
    return None


def _read(path: Path) -> None:
    with open(path, "rb"):  # a missing or unreadable file fails here with its own message
        pass
    torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class InitialWeightsError(FrozenLMError, ValueError):
    """`--model.init_from` names weights that do not fit the model (the message says which and the fix)."""


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(state dict, hyper-parameters)` of `--model.init_from`: a Lightning `.ckpt` of a frozenlm task,
    or a `.safetensors` (its metadata as the hyper-parameters)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InitialWeightsError(f"--model.init_from {path}: no such file; pass a .ckpt or .safetensors file.")
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
        return load_file(path), metadata
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return stored["state_dict"], stored.get("hyper_parameters", {})


def model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task checkpoint's state dict in its model's names: `model.backbone.*` (a task holding `self.model`)
    becomes `backbone.*`, as checkpoints written before it did name it; those, and plain files (a timm ViT's,
    `frozenlm recompose`'s), pass as they are. The inverse of `migrate_model_keys`."""
    return {key.removeprefix("model."): value for key, value in state.items()}


def load_initial_weights(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, optional_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Start `module` (a task's model) from `state` (read from `source` by `read_weights`, then
    `model_state`), in the model's names (`backbone.`, `learngenes.`, ...) or a plain timm ViT's (as
    `frozenlm export` and `frozenlm recompose` write them; read as the model's `backbone.`).

    Every tensor of `state` must fit the module. The module's tensors it lacks keep their own
    initialisation only under `optional_prefixes` (e.g. a frozen LM block's adapters, genes added in a
    later phase); any other gap is an error. Returns the keys left at their initialisation."""
    own = module.state_dict()
    if not any(key in own for key in state):  # a plain timm ViT: the task's backbone
        state = {f"backbone.{key}": value for key, value in state.items()}
    unexpected = [key for key in state if key not in own]
    mismatched = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}"
                  for key in state if key in own and state[key].shape != own[key].shape]  # fmt: skip
    missing = [key for key in own if key not in state]
    required = [key for key in missing if not key.startswith(optional_prefixes)]
    for problem, keys in (("holds tensors the model does not have", unexpected), ("has tensors of other shapes", mismatched),
                          ("lacks tensors of the model", required)):  # fmt: skip
        if keys:
            raise InitialWeightsError(
                f"--model.init_from {source} {problem}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} "
                f"({len(keys)}); build the model the weights came from (depth, width, genes, num_classes)."
            )
    module.load_state_dict(state, strict=False)
    return missing

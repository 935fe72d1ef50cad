"""What the vision-language datamodules share: CLIP's image preprocessing, reading JSON annotation files,
and batches that keep texts as strings (the task tokenizes them with its text tower's tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from frozenlm.data.base import (
    DECODE_ERRORS,
    BaseDataModule,
    DatasetFileError,
    DatasetNotFoundError,
    Unreadable,
    to_rgb,
)

# CLIP's normalisation (OpenAI), which METER's CLIP towers are fine-tuned with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transform(img_size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
    """METER's `clip` transform: bicubic resize of the short side, centre crop, CLIP normalisation."""
    return transforms.Compose([
        transforms.Resize(img_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def read_image(path: Path, transform) -> torch.Tensor | Unreadable:
    """The transformed image, or `Unreadable` when the file cannot be decoded."""
    try:
        image = to_rgb(path)
    except DECODE_ERRORS as error:
        return Unreadable.of(path, error)
    return transform(image)


def read_json(path: Path, hint: str) -> Any:
    """A JSON annotation file; a missing or damaged one raises an error naming it and `hint`."""
    if not path.is_file():
        raise DatasetNotFoundError(f"Missing {path}. {hint}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFileError(f"{path} is not valid JSON ({error}). {hint}") from None


def collate_samples(samples: list[dict | Unreadable]) -> dict[str, Any]:
    """A batch of the readable samples: tensors stacked, numbers and flags as tensors, everything else (texts, lists
    of answers) as lists; `unreadable` names the dropped files as `"path (reason)"` (None, the padding
    repeat of an unreadable sample under DDP, is dropped uncounted)."""
    samples = [s for s in samples if s is not None]
    kept = [s for s in samples if not isinstance(s, Unreadable)]
    batch: dict[str, Any] = {"unreadable": [f"{s.path} ({s.reason})" for s in samples if isinstance(s, Unreadable)]}
    for key in kept[0] if kept else ():
        values = [s[key] for s in kept]
        if torch.is_tensor(values[0]):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):  # ids, indices, the padding mark
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class VisionLanguageDataModule(BaseDataModule):
    """Loader settings of `BaseDataModule` (per-process batches,
    workers, unreadable images dropped and counted, exact evaluation under DDP) with
    `collate_samples` batches. Subclasses implement the four `*_dataloader` methods."""

    collate_fn = staticmethod(collate_samples)

    def __init__(self, root: str | Path, batch_size: int, num_workers: int | None, pin_memory: bool | None,
                 max_unreadable_fraction: float, hint: str) -> None:  # fmt: skip
        super().__init__(batch_size, num_workers, pin_memory, max_unreadable_fraction=max_unreadable_fraction)
        self.root = Path(root)
        self.hint = hint
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"{type(self).__name__}: --data.root {self.root} is not a directory. {hint}")

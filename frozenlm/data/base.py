"""The image classification datamodule every dataset builds on: timm transforms, loaders, machine defaults."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from frozenlm.data.augment import with_safe_posterize
from frozenlm.data.distributed import EvaluationSampler, MarkedPadding, TrainingSampler
from frozenlm.errors import FrozenLMError

# A file path, a decoded image, or an HxWx3 uint8 array (array datasets stay compact in memory).
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


class DatasetError(FrozenLMError):
    """A dataset that cannot be used as it is on disk. The message names the file and the fix; the
    console script prints it as one line (exit status 2), wherever the run raised it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset is missing or incomplete on disk; the message names the path and the fix."""


class DatasetFileError(DatasetError, ValueError):
    """A dataset file that is damaged or malformed (unparsable, truncated, non-finite values, an empty
    listing); the message names the file (and the line or key where it helps) and the fix."""


class TooManyUnreadableSamplesError(DatasetError, RuntimeError):
    """More of an epoch's samples could not be decoded than the datamodule's `max_unreadable_fraction`."""


class Unreadable(NamedTuple):
    """What a dataset returns in place of a sample whose file cannot be decoded (corrupt, truncated,
    not an image or video, missing): the batch drops it, and the main process reports and counts it."""

    path: str
    reason: str

    @classmethod
    def of(cls, path: str | os.PathLike, error: BaseException) -> Unreadable:
        return cls(str(path), f"{type(error).__name__}: {error}")


def collate_readable(samples: list[dict | list[dict] | Unreadable | None]) -> dict:
    """`default_collate` of the samples that were read; `unreadable` lists `"path (reason)"` of the
    others, so a corrupt file costs one sample, never the epoch. A list stands for several samples of
    one file (e.g. differently augmented clips of one video), each its own row of the batch; None (the
    padding repeat of an unreadable sample, `MarkedPadding`) is dropped."""
    samples = [s for item in samples for s in (item if isinstance(item, list) else [item]) if s is not None]
    kept = [s for s in samples if not isinstance(s, Unreadable)]
    batch = default_collate(kept) if kept else {}
    batch["unreadable"] = [f"{s.path} ({s.reason})" for s in samples if isinstance(s, Unreadable)]
    return batch


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers for this machine: all usable cores but one (left to the training process), at most 8."""
    return max(0, min(8, usable_cores() - 1))


# What Pillow raises for a file it cannot decode: missing or not an image (OSError, including
# UnidentifiedImageError), truncated ("image file is truncated", an OSError), broken chunks (SyntaxError,
# ValueError), or a decompression bomb.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(source: ImageSource) -> Image.Image:
    """Decode one image source as RGB (grayscale, CMYK and palette images included)."""
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as image:
            return image.convert("RGB")  # decodes now (the whole file), so the file is closed on return
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    return source.convert("RGB")


class Split(NamedTuple):
    """One split of a dataset as parallel sequences."""

    images: Sequence[ImageSource]
    labels: Sequence[int]
    ids: Sequence[str]


class LabeledImages(Dataset):
    """A split's samples as `{"image": FloatTensor[3,H,W], "label": int, "id": str}` dicts, or
    `Unreadable` for a file that cannot be decoded (only decoding is guarded: an error of the
    transform is a bug and is raised)."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> dict | Unreadable:
        source = self.split.images[index]
        try:
            image = to_rgb(source)
        except DECODE_ERRORS as error:
            return Unreadable.of(source, error)
        return {
            "image": self.transform(image),
            "label": int(self.split.labels[index]),
            "id": self.split.ids[index],
        }


class BaseDataModule(L.LightningDataModule):
    """Loader settings every datamodule shares (classification, motion forecasting, vision-language): a per-process batch size, workers and pinned memory
    that suit the machine, even training batches (timm's Mixup pairs samples), and unreadable files.

    A sample whose file cannot be decoded is dropped from its batch (`collate_readable`); the
    training process warns once per file, naming it, and the task logs the count per epoch
    (`data/unreadable/<stage>`). Once more than `max_unreadable_fraction` of an epoch's samples
    were unreadable the run stops with `TooManyUnreadableSamplesError`: the data is broken.

    Args:
        batch_size: samples per batch in each process (DDP multiplies it by the world size).
        num_workers: loader processes; None = all usable cores but one, at most 8.
        pin_memory: None = whether CUDA is available.
        repeated_augmentation: DeiT's repeated augmentation (timm's `RepeatAugSampler`): each
            sampled image appears this many times per epoch, differently augmented, spread over the
            processes (DeiT: 3). The sampler does its own sharding, so set
            `--trainer.use_distributed_sampler false` with it under DDP. 1 = off.
        max_unreadable_fraction: the largest fraction of an epoch's samples (per process) that may be
            unreadable before the run stops; 0 stops at the first.
    """

    # How samples become a batch: drops unreadable samples and lists them.
    collate_fn: Callable = staticmethod(collate_readable)

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        repeated_augmentation: int = 1,
        max_unreadable_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.repeated_augmentation = repeated_augmentation
        if not 0 <= max_unreadable_fraction <= 1:
            raise ValueError(f"max_unreadable_fraction must be in [0, 1], got {max_unreadable_fraction}.")
        self.max_unreadable_fraction = max_unreadable_fraction
        self.reported_unreadable: set[str] = set()
        self.first_unreadable: dict[str, list[str]] = {}  # stage -> its first 3 unreadable samples, for the error
        self._unreadable_count: tuple[tuple, int] = ((), 0)  # (stage, epoch) -> unreadable samples so far

    def __str__(self) -> str:
        # Lightning's __str__ builds every dataloader to report its size: it would list, decode or
        # preprocess every split (jsonargparse calls it while instantiating the CLI's classes), in every
        # process and before DDP starts.
        return f"{type(self).__name__}(batch_size={self.batch_size}, num_workers={self.num_workers})"

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Runs in the training process for every batch: reports and counts its unreadable samples."""
        unreadable = batch.get("unreadable") if isinstance(batch, dict) else None
        if unreadable:
            self._count_unreadable(unreadable)
        return batch

    def _count_unreadable(self, unreadable: list[str]) -> None:
        trainer = self.trainer
        stage = trainer.state.stage if trainer else None
        first = self.first_unreadable.setdefault(stage.value if stage else "", [])
        for entry in unreadable:
            if entry not in self.reported_unreadable:  # each file once, however many epochs read it
                self.reported_unreadable.add(entry)
                warnings.warn(f"Skipping unreadable sample {entry}", stacklevel=2)
            if len(first) < 3 and entry not in first:
                first.append(entry)
        key = (stage, trainer.current_epoch if trainer else 0)
        count = (self._unreadable_count[1] if self._unreadable_count[0] == key else 0) + len(unreadable)
        self._unreadable_count = (key, count)
        samples = _epoch_batches(trainer, stage) * self.batch_size
        if count > self.max_unreadable_fraction * samples:
            raise TooManyUnreadableSamplesError(
                f"{count} unreadable samples in this {stage.value if stage else ''} epoch (of about {samples:.0f}), "
                f"more than --data.max_unreadable_fraction {self.max_unreadable_fraction}: the dataset looks damaged "
                f"(first files {self._first_unreadable(stage.value if stage else '')}). Repair or remove the files named "
                "in the warnings above, or raise --data.max_unreadable_fraction."
            )

    def _first_unreadable(self, stage: str) -> str:
        """The first unreadable samples of each stage, `stage`'s first: `of train: [...]; of sanity_check: [...]`."""
        stages = sorted(self.first_unreadable, key=lambda name: name != stage)
        return "; ".join(f"of {name or 'this run'}: {self.first_unreadable[name]}" for name in stages)

    def _train_loader(self, dataset: Dataset) -> DataLoader:
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if len(dataset) // world_size < self.batch_size:
            raise DatasetError(
                f"{type(self).__name__}: the train split has {len(dataset)} samples, fewer than one batch "
                f"(batch_size {self.batch_size}) per process ({world_size}), and incomplete batches are dropped; "
                "lower --data.batch_size."
            )
        # Dropping the last incomplete batch keeps batches even, as timm's Mixup requires.
        if self.repeated_augmentation == 1:
            sampler = TrainingSampler(dataset, world_size, rank, self.batch_size)
            return self._loader(dataset, sampler=sampler, drop_last=True)
        # Lightning would shard this already-sharded sampler again (its private flag, read defensively).
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "repeated_augmentation shards the data itself: add --trainer.use_distributed_sampler false."
            )
        sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=self.repeated_augmentation)
        return self._loader(dataset, sampler=sampler, drop_last=True)  # Lightning calls its set_epoch

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        """An evaluation (validate, test, predict) loader: under several processes, each gets its share of
        the split and every sample is scored exactly once (`distributed`)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self._loader(dataset)
        sampler = EvaluationSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return self._loader(MarkedPadding(dataset), sampler=sampler)

    def _loader(self, dataset: Dataset, drop_last: bool = False, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )


class ClassificationDataModule(BaseDataModule):
    """The base of labelled samples' datamodules (images, videos, point clouds): `BaseDataModule`'s
    loaders, and `num_classes`, which a subclass sets by the end of `__init__` (the CLI links it into the
    model's head)."""

    num_classes: int


def _epoch_batches(trainer, stage: RunningStage | None) -> float:
    """Batches in one epoch of `stage`; inf when unknown (an iterable dataset, no trainer) and for the
    sanity check, a peek at a few batches that the validation epoch after it counts again."""
    batches = {
        RunningStage.TRAINING: lambda: trainer.num_training_batches,
        RunningStage.VALIDATING: lambda: sum(trainer.num_val_batches),
        RunningStage.TESTING: lambda: sum(trainer.num_test_batches),
        RunningStage.PREDICTING: lambda: sum(trainer.num_predict_batches),
    }.get(stage)
    return float("inf") if batches is None else float(batches())


class ImageDataModule(ClassificationDataModule):
    """Single-label image classification with the DeiT training recipe's augmentation as defaults.

    Subclasses set `num_classes` by the end of `__init__` (the CLI links it to the model) and implement
    `load_split("train" | "val")`. The val split doubles as the test and predict split; predict is
    unshuffled and unaugmented. Mixup/CutMix are applied by the task on batches, not here.

    Args:
        root: dataset directory.
        batch_size, num_workers, pin_memory, repeated_augmentation, max_unreadable_fraction: see
            `BaseDataModule`.
        img_size: side of the square images the model receives.
        auto_augment: timm auto-augment recipe (DeiT: RandAugment "rand-m9-mstd0.5-inc1"); None = off.
        re_prob: random-erasing probability.
        hflip: horizontal-flip probability.
        color_jitter: color-jitter strength; None = off (timm skips it anyway while auto_augment is on).
        scale: area range of the random resized crop.
        crop_pct: eval center-crop fraction (resize to img_size / crop_pct, then crop img_size).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
    """

    def __init__(
        self,
        root: str | Path | None,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        img_size: int = 224,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        repeated_augmentation: int = 1,
        max_unreadable_fraction: float = 0.01,
    ):
        super().__init__(batch_size, num_workers, pin_memory, repeated_augmentation, max_unreadable_fraction)
        self.root = None if root is None else Path(root)
        self.img_size = img_size
        self.mean, self.std = mean, std
        self.train_transform = with_safe_posterize(create_transform(
            input_size=img_size,
            is_training=True,
            scale=scale,
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=re_prob,
            re_mode="pixel",  # DeiT erases with per-pixel noise
            mean=mean,
            std=std,
        ))
        self.eval_transform = create_transform(
            input_size=img_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std
        )
        self.train_set: LabeledImages | None = None
        self.val_set: LabeledImages | None = None

    def load_split(self, split: str) -> Split:
        """Images, labels and ids of the "train" or the "val" split."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        # Only fitting needs the train split, which can be slow to list (ImageNet: 1.28M files).
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = LabeledImages(self.load_split("train"), self.train_transform)
        if self.val_set is None:
            self.val_set = LabeledImages(self.load_split("val"), self.eval_transform)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return self._eval_loader(self.val_set)

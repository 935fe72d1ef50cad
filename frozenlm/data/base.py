"""The image classification datamodule every dataset builds on: timm transforms, loaders, machine defaults."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Union

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, Sampler

# A file path, a decoded image, or an HxWx3 uint8 array (array datasets stay compact in memory).
ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or incomplete on disk; the message names the path and the fix."""


def default_num_workers() -> int:
    """Loader workers for this machine: all usable cores but one (left to the training process), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def to_rgb(source: ImageSource) -> Image.Image:
    """Decode one image source as RGB (grayscale, CMYK and palette images included)."""
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as image:
            return image.convert("RGB")  # decodes now, so the file is closed on return
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    return source.convert("RGB")


class Split(NamedTuple):
    """One split of a dataset as parallel sequences."""

    images: Sequence[ImageSource]
    labels: Sequence[int]
    ids: Sequence[str]


class LabeledImages(Dataset):
    """A split's samples as `{"image": FloatTensor[3,H,W], "label": int, "id": str}` dicts."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.transform(to_rgb(self.split.images[index])),
            "label": int(self.split.labels[index]),
            "id": self.split.ids[index],
        }


class ClassificationDataModule(L.LightningDataModule):
    """Loader settings every datamodule shares: a per-process batch size, workers and pinned memory
    that suit the machine, and even training batches (timm's Mixup pairs samples).

    Args:
        batch_size: samples per batch in each process (DDP multiplies it by the world size).
        num_workers: loader processes; None = all usable cores but one, at most 8.
        pin_memory: None = whether CUDA is available.
        repeated_augmentation: DeiT's repeated augmentation (timm's ``RepeatAugSampler``): each
            sampled image appears this many times per epoch, differently augmented, spread over the
            processes (DeiT: 3). The sampler does its own sharding, so set
            ``--trainer.use_distributed_sampler false`` with it under DDP. 1 = off.
    """

    num_classes: int
    # How samples become a batch; None = torch's default_collate.
    collate_fn: Callable | None = None

    def __init__(
        self,
        batch_size: int,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        repeated_augmentation: int = 1,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.repeated_augmentation = repeated_augmentation

    def _train_loader(self, dataset: Dataset) -> DataLoader:
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"{type(self).__name__}: the train split has {len(dataset)} samples, fewer than one batch "
                f"(batch_size {self.batch_size}), and incomplete batches are dropped; lower --data.batch_size."
            )
        # Dropping the last incomplete batch keeps batches even, as timm's Mixup requires.
        if self.repeated_augmentation == 1:
            return self._loader(dataset, shuffle=True, drop_last=True)
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        # Lightning would shard this already-sharded sampler again (its private flag, read defensively).
        connector = getattr(trainer, "_accelerator_connector", None)
        if world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "repeated_augmentation shards the data itself: add --trainer.use_distributed_sampler false."
            )
        sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=self.repeated_augmentation)
        return self._loader(dataset, sampler=sampler, drop_last=True)  # Lightning calls its set_epoch

    def _loader(
        self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False, sampler: Sampler | None = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )


class ImageDataModule(ClassificationDataModule):
    """Single-label image classification with the DeiT training recipe's augmentation as defaults.

    Subclasses set `num_classes` by the end of `__init__` (the CLI links it to the model) and implement
    `load_split("train" | "val")`. The val split doubles as the test and predict split; predict is
    unshuffled and unaugmented. Mixup/CutMix are applied by the task on batches, not here.

    Args:
        root: dataset directory.
        batch_size, num_workers, pin_memory, repeated_augmentation: see :class:`ClassificationDataModule`.
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
    ):
        super().__init__(batch_size, num_workers, pin_memory, repeated_augmentation)
        self.root = None if root is None else Path(root)
        self.img_size = img_size
        self.train_transform = create_transform(
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
        )
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
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return self._loader(self.val_set)

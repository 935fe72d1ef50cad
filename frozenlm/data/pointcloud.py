"""What every point-cloud classification datamodule shares: clouds held in memory, and Point-BERT's
sampling and augmentation, done on the training device on whole batches (as Point-BERT does on the GPU).

Training (per batch): FPS to `sample_points` (Point-BERT: 1,200 for 1,024 input points, 4,800 for
4,096, all of 8,192), then one random `num_points` of those for the whole batch, then each cloud scaled
per axis by U[2/3, 3/2] and translated by U[-0.2, 0.2] (`PointcloudScaleAndTranslate`). Evaluation:
FPS to `num_points`. Test with `test_votes` V > 0 adds V training-style views of each cloud
(`vote_points`), whose logits the task averages: Point-BERT's voting, run once (its reported numbers
are the best of 9 such runs, chosen on the test set). Each cloud's views come from a random stream of
its own, so the voted accuracy is the same on any number of processes and any batch size.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch.trainer.states import RunningStage
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import ClassificationDataModule, DatasetFileError
from frozenlm.models.point_ops import farthest_point_sample, gather_points


class PointClouds(Dataset):
    """A split's clouds `[M, P, 3]` as `{"points": [P, 3], "label", "id"}` dicts; `shuffle` permutes
    each cloud's points (in training, as Point-BERT: then FPS starts from a random point of the cloud)."""

    def __init__(self, points: Tensor, labels: Sequence[int], ids: Sequence[str], shuffle: bool = False):
        self.points, self.labels, self.ids, self.shuffle = points, list(labels), list(ids), shuffle

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        points = self.points[index]
        if self.shuffle:
            points = points[torch.randperm(len(points))]
        return {"points": points, "label": self.labels[index], "id": self.ids[index]}


def held_out(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices `(kept, held out)` with `fraction` held out, stratified by label when every class
    can give one (else at random), reproducibly for `seed`."""
    indices = np.arange(len(labels))
    if fraction == 0:
        return indices.tolist(), []
    present = np.bincount(labels)
    present = present[present > 0]
    stratified = present.min() >= 2 and math.ceil(fraction * len(labels)) >= len(present)
    kept, held = train_test_split(indices, test_size=fraction, stratify=labels if stratified else None, random_state=seed)
    return sorted(kept.tolist()), sorted(held.tolist())


def sample_count(num_points: int, cloud_size: int) -> int:
    """Point-BERT's FPS size before the random subset: `num_points x 75/64` (1,024 -> 1,200), at most the cloud."""
    return min(cloud_size, round(num_points * 75 / 64))


def scale_and_translate(
    points: Tensor, scale: tuple[float, float] = (2 / 3, 3 / 2), shift: float = 0.2, generator: torch.Generator | None = None
) -> Tensor:  # fmt: skip
    """Each cloud of `[B, N, 3]` scaled per axis by U[scale] and translated by U[-shift, shift]."""
    batch = len(points)
    factors = torch.empty(batch, 1, 3, device=points.device).uniform_(*scale, generator=generator)
    offsets = torch.empty(batch, 1, 3, device=points.device).uniform_(-shift, shift, generator=generator)
    return points * factors + offsets


class PointCloudDataModule(ClassificationDataModule):
    """Base of the point-cloud datamodules: subclasses set `classes` and `num_classes` in
    `__init__` and implement `load_split("train" | "test") -> (points [M, P, 3], labels, ids)`.

    Neither ScanObjectNN nor ModelNet40 has a validation split, and Point-BERT (and LM4VE after it)
    validated on the test split, so its best checkpoints were chosen on the test set. Here
    `val_fraction` of the training clouds (stratified by class, seeded) are held out instead: the
    val split picks checkpoints, the test split is only tested. `val_fraction: 0` trains on all of
    the training split and validates on the test split, as the reference did. Predict runs on test.

    Args:
        batch_size, num_workers, pin_memory, max_unreadable_fraction: see
            `BaseDataModule`.
        num_points: points per cloud the model receives (Point-BERT: 1,024; ModelNet40 also 4,096, 8,192).
        sample_points: FPS size before training's random subset; None = Point-BERT's
            `num_points x 75/64`, at most the cloud's size.
        scale: range of the per-axis training scale.
        shift: range of the training translation, `[-shift, shift]`.
        test_votes: views per cloud voted at test time (Point-BERT: 10); 0 = single view only.
        augment: False trains on the evaluation view (FPS to `num_points` from the cloud's first point,
            no random subset, scale or shift), for ablations and for runs that must be deterministic.
        val_fraction: fraction of the training clouds held out as the val split; 0 = validate on test.
        split_seed: seed of that hold-out.
    """

    classes: list[str]

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_points: int = 1024,
        sample_points: int | None = None,
        scale: tuple[float, float] = (2 / 3, 3 / 2),
        shift: float = 0.2,
        test_votes: int = 10,
        augment: bool = True,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        max_unreadable_fraction: float = 0.01,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, max_unreadable_fraction=max_unreadable_fraction)
        self.num_points, self.sample_points = num_points, sample_points
        self.scale, self.shift, self.test_votes, self.augment = tuple(scale), shift, test_votes, augment
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.datasets: dict[str, PointClouds] = {}

    def load_split(self, split: str) -> tuple[Tensor, list[int], list[str]]:
        """Points `[N, P, 3]`, labels and ids of the "train" or the "test" split."""
        raise NotImplementedError

    def dataset(self, split: str) -> PointClouds:
        """The `train`, `val` (held out from train, or test when `val_fraction` is 0) or `test` clouds."""
        if split == "val" and self.val_fraction == 0:
            split = "test"
        if split not in self.datasets:
            points, labels, ids = self.load_split("test" if split == "test" else "train")
            if points.shape[1] < self.num_points:
                raise DatasetFileError(
                    f"{type(self).__name__}: the clouds have {points.shape[1]} points, fewer than "
                    f"--data.num_points {self.num_points}."
                )
            if split == "test":
                self.datasets["test"] = PointClouds(points, labels, ids)
            else:
                train, val = held_out(labels, self.val_fraction, self.split_seed)
                for name, rows in (("train", train), ("val", val)):
                    shuffle = name == "train" and self.augment
                    self.datasets[name] = PointClouds(
                        points[rows], [labels[i] for i in rows], [ids[i] for i in rows], shuffle=shuffle
                    )
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    # -- sampling and augmentation, on the device --------------------------------------------------
    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        points = batch.get("points")
        if points is None:
            return batch
        stage = self.trainer.state.stage if self.trainer is not None else None
        if stage == RunningStage.TRAINING and self.augment:
            batch["points"] = self.random_views(points, 1)[:, 0]
            return batch
        if stage == RunningStage.TESTING and self.test_votes > 0:
            batch["vote_points"] = self.vote_views(points, batch["id"])
        batch["points"] = gather_points(points, farthest_point_sample(points, self.num_points).to(points.device))
        return batch

    def random_views(self, points: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
        """`[B, count, num_points, 3]`: Point-BERT's training sampling and augmentation, `count` times
        from one FPS of each cloud (its test-time voting)."""
        total = self.sample_points or sample_count(self.num_points, points.shape[1])
        if total < points.shape[1]:
            points = gather_points(points, farthest_point_sample(points, total).to(points.device))
        views = []
        for _ in range(count):
            chosen = torch.randperm(points.shape[1], device=points.device, generator=generator)[: self.num_points]
            views.append(scale_and_translate(points[:, chosen], self.scale, self.shift, generator))
        return torch.stack(views, dim=1)

    def vote_views(self, points: Tensor, ids: Sequence[str]) -> Tensor:
        """`[B, test_votes, num_points, 3]`: each cloud's voting views, drawn from a random stream of its
        own (seeded by `--seed_everything` and the cloud's id), so that a cloud's votes do not depend on
        the batch it is in or on the number of processes."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        views = []
        for cloud, sample_id in zip(points, ids):
            generator = torch.Generator(device=points.device).manual_seed(seed * 1_000_003 + zlib.crc32(str(sample_id).encode()))
            views.append(self.random_views(cloud[None], self.test_votes, generator)[0])
        return torch.stack(views)

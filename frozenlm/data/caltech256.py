"""Caltech-256 with the GCR paper's seeded, stratified 7:3 train/test split."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torchvision
from sklearn.model_selection import train_test_split

from frozenlm.data.base import DatasetNotFoundError, ImageDataModule, Split

TEST_FRACTION = 0.3
CLUTTER_NUMBER = 257
CATEGORY_FOLDER = re.compile(r"^(\d{3})\.")


class Caltech256DataModule(ImageDataModule):
    """Caltech-256: 30,607 images of 256 object categories plus a clutter category (257.clutter).

    On disk (torchvision's layout):

        root/caltech256/256_ObjectCategories/001.ak47/001_0001.jpg
        ...
        root/caltech256/256_ObjectCategories/257.clutter/257_0001.jpg

    Download: `download=True` fetches and extracts it with `torchvision.datasets.Caltech256` in
    `prepare_data`. The label of folder "NNN.name" is NNN - 1, as in torchvision. The dataset has no
    official split: each class is split 7:3 into train and val (= test = predict) with a seeded
    stratified shuffle. Ids are paths relative to root.

    Args:
        root: the directory that holds (or will hold) caltech256/.
        download: fetch the dataset when it is missing.
        include_clutter: keep 257.clutter as a class (257 classes) or drop it (256).
        seed: seed of the train/val split.
        Others: as `ImageDataModule`.

    Examples:
        >>> from frozenlm.data import Caltech256DataModule
        >>> datamodule = Caltech256DataModule(root="data/caltech256", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/caltech256_deit.yaml`); `--data.root` points it at your copy.
    """

    @staticmethod
    def classes_for(include_clutter: bool = True, **_: object) -> int:
        """The class count of a config, without the files: 257 with the clutter class, 256 without."""
        return CLUTTER_NUMBER if include_clutter else CLUTTER_NUMBER - 1

    def __init__(
        self, root: str | Path, download: bool = False, include_clutter: bool = True, seed: int = 0, **kwargs
    ):
        super().__init__(root, **kwargs)
        self.download = download
        self.include_clutter = include_clutter
        self.seed = seed
        self.num_classes = self.classes_for(include_clutter)
        self.folder = self.root / "caltech256" / "256_ObjectCategories"
        if not download:
            self.check_files()

    def category_folders(self) -> list[Path]:
        """The category folders (`NNN.name`), sorted."""
        folders = sorted(p for p in self.folder.iterdir() if p.is_dir() and CATEGORY_FOLDER.match(p.name))
        return [p for p in folders if self.include_clutter or category_number(p) != CLUTTER_NUMBER]

    def check_files(self) -> None:
        """Raise `DatasetNotFoundError` naming what is missing under `root`."""
        if not self.folder.is_dir() or not self.category_folders():
            raise DatasetNotFoundError(
                f"Caltech256DataModule: no category folders (like 001.ak47/) in {self.folder}. Pass --data.root DIR "
                "where DIR/caltech256/256_ObjectCategories/ holds the extracted 256_ObjectCategories.tar, "
                "or set --data.download true."
            )

    def prepare_data(self) -> None:
        if self.download:
            torchvision.datasets.Caltech256(str(self.root), download=True)
        self.check_files()

    def load_split(self, split: str) -> Split:
        paths, labels = [], []
        for folder in self.category_folders():
            # The real data holds a few non-image files (e.g. 198.spider/RENAME2).
            images = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
            paths += images
            labels += [category_number(folder) - 1] * len(images)
        train_indices, val_indices = train_test_split(
            np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=self.seed
        )
        indices = np.sort(train_indices if split == "train" else val_indices)
        return Split(
            [paths[i] for i in indices],
            [labels[i] for i in indices],
            [paths[i].relative_to(self.root).as_posix() for i in indices],
        )


def category_number(folder: Path) -> int:
    """The NNN of a category folder "NNN.name"."""
    return int(CATEGORY_FOLDER.match(folder.name)[1])

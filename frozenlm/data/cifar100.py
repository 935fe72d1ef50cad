"""CIFAR-100 read from torchvision's on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision

from frozenlm.data.base import DatasetNotFoundError, ImageDataModule, Split
from frozenlm.data.safe_pickle import load_arrays


class CIFAR100DataModule(ImageDataModule):
    """CIFAR-100: 50,000 train and 10,000 test 32x32 images, 100 fine classes; val = the official test split.

    On disk (torchvision's layout, from the python-version tarball):

        root/cifar-100-python/train   pickle: "data" uint8 [N, 3072] (channel-major 3x32x32), "fine_labels"
        root/cifar-100-python/test    same keys
        root/cifar-100-python/meta    pickle: "fine_label_names"

    Download: `download=True` fetches and extracts it with `torchvision.datasets.CIFAR100` in
    `prepare_data`. Ids are "train/<row>" and "test/<row>". Defaults keep 32px images uncropped at eval.

    Args:
        root: the directory that holds (or will hold) cifar-100-python/.
        download: fetch the dataset when it is missing.
        Others: as `ImageDataModule`.

    Examples:
        >>> from frozenlm.data import CIFAR100DataModule
        >>> datamodule = CIFAR100DataModule(root="data/cifar100", download=True, batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/cifar100_deit.yaml`); `--data.root` points it at your copy.
    """

    num_classes = 100
    required_files = ("train", "test")

    def __init__(
        self, root: str | Path, download: bool = False, img_size: int = 32, crop_pct: float = 1.0, **kwargs
    ):
        super().__init__(root, img_size=img_size, crop_pct=crop_pct, **kwargs)
        self.download = download
        self.folder = self.root / "cifar-100-python"
        if not download:
            self.check_files()

    def check_files(self) -> None:
        """Raise `DatasetNotFoundError` naming what is missing under `root`."""
        missing = [name for name in self.required_files if not (self.folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR100DataModule: no CIFAR-100 {' and '.join(missing)} file in {self.folder}. Pass "
                "--data.root DIR where DIR/cifar-100-python/ holds the extracted python-version tarball, "
                "or set --data.download true."
            )

    def prepare_data(self) -> None:
        if self.download:
            torchvision.datasets.CIFAR100(str(self.root), download=True)
        self.check_files()

    def load_split(self, split: str) -> Split:
        name = "train" if split == "train" else "test"
        with open(self.folder / name, "rb") as file:
            batch = load_arrays(file, str(self.folder / name), "Extract the python-version tarball again (or --data.download true).")
        # Rows are channel-major; HxWxC in one contiguous block makes per-sample PIL conversion cheap.
        rows = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        images = np.ascontiguousarray(rows.transpose(0, 2, 3, 1))
        labels = batch["fine_labels"]
        return Split(images, labels, [f"{name}/{row}" for row in range(len(labels))])

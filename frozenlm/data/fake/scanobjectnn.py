"""Writes a tiny fake ScanObjectNN in the official h5_files layout: main_split/ (obj_bg and the
"hardest" augmentedrot_scale75 files) and main_split_nobg/ (obj_only), each file with `data` float32
[N, 2048, 3], `label` [N] and `mask` [N, 2048] (-1 = background), as the real ones."""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

NUM_CLASSES, POINTS = 15, 2048
FILES = {
    "main_split": ("training_objectdataset.h5", "test_objectdataset.h5",
                   "training_objectdataset_augmentedrot_scale75.h5", "test_objectdataset_augmentedrot_scale75.h5"),
    "main_split_nobg": ("training_objectdataset.h5", "test_objectdataset.h5"),
}  # fmt: skip


def ellipsoids(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`[N, 2048, 3]` points on ellipsoids whose axes depend on the class, so classes are learnable."""
    directions = rng.normal(size=(len(labels), POINTS, 3))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    axes = 0.3 + 0.6 * np.stack([(labels % 3) / 2, (labels // 3 % 5) / 4, np.full(len(labels), 0.5)], axis=-1)
    return (directions * axes[:, None, :] + rng.normal(scale=0.01, size=directions.shape)).astype(np.float32)


def write(root: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0) -> Path:
    """Write every file of the layout under `root`; returns root."""
    rng = np.random.default_rng(seed)
    for folder, names in FILES.items():
        (Path(root) / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            per_class = train_per_class if name.startswith("training") else test_per_class
            labels = np.repeat(np.arange(NUM_CLASSES), per_class)
            with h5py.File(Path(root) / folder / name, "w") as file:
                file.create_dataset("data", data=ellipsoids(labels, rng))
                file.create_dataset("label", data=labels.astype(np.int64))
                file.create_dataset("mask", data=np.where(rng.random((len(labels), POINTS)) < 0.2, -1, 1).astype(np.int32))
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write main_split/ and main_split_nobg/ into")
    print(write(parser.parse_args().root))

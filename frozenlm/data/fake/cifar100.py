"""Writes a tiny fake CIFAR-100 in torchvision's on-disk format (python-version pickles)."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

NUM_CLASSES = 100


def write(root: Path, num_train: int = 12, num_test: int = 6, seed: int = 0) -> Path:
    """Write root/cifar-100-python/{train,test,meta} with random images and labels; returns root."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train", num_train), ("test", num_test)):
        fine_labels = rng.integers(0, NUM_CLASSES, count).tolist()
        batch = {
            "filenames": [f"fake_{name}_{row}.png" for row in range(count)],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine_labels,
            "coarse_labels": [label // 5 for label in fine_labels],
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(NUM_CLASSES)],
        "coarse_label_names": [f"superclass_{i}" for i in range(NUM_CLASSES // 5)],
    }
    with open(folder / "meta", "wb") as file:
        pickle.dump(meta, file)
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write cifar-100-python/ into")
    print(write(parser.parse_args().root))

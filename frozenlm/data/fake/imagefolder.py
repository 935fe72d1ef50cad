"""Writes a tiny fake ImageNet-layout dataset: root/{train,val}/<class>/*.JPEG."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850")


def write(
    root: Path, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0, size: tuple[int, int] = (30, 40)
) -> Path:
    """Write random RGB JPEGs of `size` (height, width; ImageNet's are ~400 x 350), plus one grayscale and
    one CMYK JPEG (real ImageNet has both); returns root."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)  # not square, as real photos
                Image.fromarray(pixels).save(folder / f"{name}_{split}_{i}.JPEG")
    first_train = Path(root) / "train" / CLASSES[0]
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(first_train / "grayscale.JPEG")
    Image.new("CMYK", (40, 30), (0, 128, 255, 0)).save(first_train / "cmyk.JPEG")
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write train/ and val/ into")
    print(write(parser.parse_args().root))

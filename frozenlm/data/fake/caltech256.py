"""Writes a tiny fake Caltech-256 in torchvision's layout: root/caltech256/256_ObjectCategories/NNN.name/*.jpg."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("001.ak47", "002.american-flag", "003.backpack", "257.clutter")


def write(root: Path, per_category: int = 10, seed: int = 0) -> Path:
    """Write small random JPEGs named like the real ones, one of them grayscale; returns root."""
    rng = np.random.default_rng(seed)
    for category in CATEGORIES:
        folder = Path(root) / "caltech256" / "256_ObjectCategories" / category
        folder.mkdir(parents=True, exist_ok=True)
        number = category.split(".")[0]
        for i in range(1, per_category + 1):
            pixels = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{number}_{i:04d}.jpg")
    first = Path(root) / "caltech256" / "256_ObjectCategories" / CATEGORIES[0]
    Image.fromarray(rng.integers(0, 256, (24, 36), dtype=np.uint8)).save(first / f"001_{per_category:04d}.jpg")
    (first / "RENAME2").write_text("a stray non-image file, as in the real 198.spider/\n")
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write caltech256/ into")
    print(write(parser.parse_args().root))

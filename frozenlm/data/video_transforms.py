"""Decoding, frame sampling and clip augmentation for video classification (VideoMAE's SSv2 recipe).

Decoding uses PyAV, which bundles FFmpeg with the VP9 decoder SSv2's .webm files need and installs
as a wheel (torchvision's video reading is deprecated; torchcodec needs a system FFmpeg). A .webm
header reports no frame count, so videos are decoded whole (SSv2 clips are 2-6 s at 12 fps) and
only the sampled frames are converted to arrays.

Clips are uint8 `[T, 3, H, W]` tensors until normalisation; the model receives `[3, T, H, W]`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import v2

from frozenlm.data.augment import rand_augment_transform

if TYPE_CHECKING:
    import av


class UnreadableVideoError(OSError):
    """A video file FFmpeg cannot open or decode."""


def decode_frames(path: str | Path) -> list[av.VideoFrame]:
    """Every frame of the first video stream of `path`; `UnreadableVideoError` if there is none."""
    try:
        import av  # the optional `video` extra; imported here so image-only installs never need it
    except ImportError as error:
        raise ImportError("Decoding videos needs PyAV: pip install 'frozenlm[video]' (or pip install av).") from error
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableVideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = list(container.decode(stream))
    except av.FFmpegError as error:
        raise UnreadableVideoError(f"{path}: {error}") from error
    if not frames:
        raise UnreadableVideoError(f"{path} has no decodable frame")
    return frames


def read_clip(frames: Sequence[av.VideoFrame], indices: Sequence[int]) -> torch.Tensor:
    """The frames at `indices` as a uint8 `[T, 3, H, W]` tensor."""
    arrays = [frames[i].to_ndarray(format="rgb24") for i in indices]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def segment_indices(length: int, num_segments: int) -> np.ndarray:
    """Training sampling (TSN, as VideoMAE on SSv2): the video is cut into `num_segments` equal
    segments and one frame is drawn uniformly from each, so a clip spans the whole action. Videos
    shorter than `num_segments` repeat frames."""
    edges = np.linspace(0, length, num_segments + 1)
    positions = edges[:-1] + np.random.random(num_segments) * np.diff(edges)
    return np.minimum(positions.astype(int), length - 1)


def uniform_clip_indices(length: int, num_segments: int, num_clips: int) -> list[np.ndarray]:
    """Evaluation sampling: `num_clips` deterministic clips over the same segments; clip `k` takes
    the frame at fraction `(k + 0.5) / num_clips` of every segment (one clip: the segment centres)."""
    edges = np.linspace(0, length, num_segments + 1)
    return [
        np.minimum((edges[:-1] + (k + 0.5) / num_clips * np.diff(edges)).astype(int), length - 1)
        for k in range(num_clips)
    ]


class VideoTrainTransform:
    """Training augmentation of one clip, the same for every frame: random resized crop, horizontal
    flip, timm's RandAugment, normalisation, then timm's random erasing per frame (as VideoMAE).

    RandAugment draws its ops and magnitudes from Python's `random` and NumPy; a seed drawn once per
    clip is set before each frame (and the generators restored afterwards), so every frame gets the
    identical ops and the clip stays temporally consistent.
    """

    def __init__(
        self,
        img_size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        re_prob: float = 0.25,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        # v2 transforms treat the leading T dimension as a batch: one crop and flip for the whole clip.
        self.crop_flip = v2.Compose(
            [v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio), v2.RandomHorizontalFlip(hflip)]
        )
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        self.rand_augment = rand_augment_transform(auto_augment, hparams) if auto_augment else None
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        self.erase = RandomErasing(re_prob, mode="pixel", device="cpu") if re_prob > 0 else None

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        clip = self.crop_flip(clip)
        if self.rand_augment is not None:
            clip = self._same_rand_augment(clip)
        clip = self.normalize(clip)
        if self.erase is not None:
            clip = self.erase(clip)
        return clip.transpose(0, 1)  # [3, T, H, W]

    def _same_rand_augment(self, clip: torch.Tensor) -> torch.Tensor:
        seed = random.getrandbits(32)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        frames = []
        for frame in clip.permute(0, 2, 3, 1).numpy():
            random.seed(seed)
            np.random.seed(seed)
            frames.append(np.asarray(self.rand_augment(Image.fromarray(frame))))
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


class VideoEvalTransform:
    """Evaluation views of one clip: the short side resized to `img_size`, then `num_crops` square
    crops spread along the long side (1: centre; 3: both ends and the centre, VideoMAE's test crops).
    Returns `[num_crops, 3, T, H, W]`."""

    def __init__(
        self,
        img_size: int = 224,
        num_crops: int = 1,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ):
        self.img_size = img_size
        self.num_crops = num_crops
        self.resize = v2.Resize(img_size)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        clip = self.resize(clip)
        height, width = clip.shape[-2:]
        size = self.img_size
        spare_h, spare_w = height - size, width - size
        views = []
        for k in range(self.num_crops):
            fraction = 0.5 if self.num_crops == 1 else k / (self.num_crops - 1)
            if spare_w >= spare_h:  # landscape: the crops move along the width
                top, left = spare_h // 2, round(spare_w * fraction)
            else:
                top, left = round(spare_h * fraction), spare_w // 2
            views.append(self.normalize(clip[..., top : top + size, left : left + size]).transpose(0, 1))
        return torch.stack(views)

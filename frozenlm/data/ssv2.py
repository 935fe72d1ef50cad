"""Something-Something-v2 (Goyal et al., ICCV 2017): 220,847 videos of 174 templated hand-object actions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import ClassificationDataModule, DatasetFileError, DatasetNotFoundError, Unreadable
from frozenlm.data.video_transforms import (
    VideoEvalTransform,
    VideoTrainTransform,
    decode_frames,
    read_clip,
    segment_indices,
    uniform_clip_indices,
)

VIDEO_FOLDERS = ("20bn-something-something-v2", "videos")
SPLIT_FILES = {"train": "train.json", "val": "validation.json"}
DOWNLOAD_HINT = (
    "Download Something-Something-v2 from https://developer.qualcomm.com/software/ai-datasets/something-something "
    "(20bn-something-something-v2-00 ... -19 and the labels zip), extract the videos with "
    "`cat 20bn-something-something-v2-?? | tar -xz` and the labels into DIR/labels/, and pass --data.root DIR."
)



def read_json(path: Path):
    """A JSON annotation file; a damaged one raises `DatasetFileError` naming it."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFileError(f"{path} is not valid JSON ({error}). {DOWNLOAD_HINT}") from None

class VideoSplit(NamedTuple):
    """One split as parallel lists: video files, class indices and ids."""

    paths: list[Path]
    labels: list[int]
    ids: list[str]


def class_name(template: str) -> str:
    """The labels.json key of an annotation's template: "Putting [something] on [something]" ->
    "Putting something on something"."""
    return template.replace("[", "").replace("]", "")


class LabeledVideos(Dataset):
    """A split's clips as `{"video", "label", "id"}` dicts, or `Unreadable` for an unreadable video.

    `video` is `[3, T, H, W]` for `views="train"` (a segment-sampled, augmented clip; with
    `num_clips` > 1 a list of that many dicts, each clip sampled and augmented anew, as VideoMAE's
    `num_sample`) and `views="val"` (the segment centres, centre crop), and `[V, 3, T, H, W]` with
    `V = num_clips x num_crops` for `views="test"`. An unreadable or missing file is dropped from
    its batch and reported (see `BaseDataModule`).
    """

    def __init__(
        self, split: VideoSplit, views: str, num_frames: int, transform: Callable, num_clips: int = 1
    ):
        self.split = split
        self.views = views
        self.num_frames = num_frames
        self.transform = transform
        self.num_clips = num_clips

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> dict | list[dict] | Unreadable:
        path = self.split.paths[index]
        try:
            frames = decode_frames(path)
        except OSError as error:  # unreadable, corrupt or missing file
            return Unreadable.of(path, error)
        label, sample_id = int(self.split.labels[index]), self.split.ids[index]
        if self.views == "train":
            samples = [
                {"video": self.transform(read_clip(frames, segment_indices(len(frames), self.num_frames))),
                 "label": label, "id": sample_id}
                for _ in range(self.num_clips)
            ]  # fmt: skip
            return samples if self.num_clips > 1 else samples[0]
        clips = uniform_clip_indices(len(frames), self.num_frames, self.num_clips)
        views = torch.cat([self.transform(read_clip(frames, indices)) for indices in clips])
        return {"video": views[0] if self.views == "val" else views, "label": label, "id": sample_id}


class SSv2DataModule(ClassificationDataModule):
    """Something-Something-v2 in its official layout, VideoMAE's fine-tuning data pipeline.

    On disk (as the official download extracts):

        root/20bn-something-something-v2/<id>.webm    (root/videos/<id>.webm is accepted too)
        root/labels/labels.json        {"Approaching something with your camera": "0", ...}
        root/labels/train.json         [{"id": "78687", "label": "...", "template": "Holding [something] ...",
        root/labels/validation.json      "placeholders": [...]}, ...]

    The class of an annotation is its template with the brackets removed, looked up in labels.json.
    The validation split (24,777 videos) is the val, test and predict split: test.json has no labels.
    Videos are decoded with PyAV (see `video_transforms`).

    Batches: `{"video", "label", "id", "unreadable"}`; `video` is `[B, 3, T, H, W]` for train
    (`B = batch_size x train_clips`) and val (one clip, val = segment centres, centre crop) and
    `[B, V, 3, T, H, W]` for test and predict with `V = test_clips x test_crops` views; `unreadable` names the videos dropped from the batch.

    Args:
        root: dataset directory (see above).
        batch_size: videos per batch in each process.
        num_workers, pin_memory, max_unreadable_fraction: see
            `BaseDataModule`.
        num_frames: frames per clip, one per temporal segment (VideoMAE: 16).
        img_size: side of the square clips.
        train_clips: differently sampled and augmented clips of each training video in a batch, which
            then holds `batch_size x train_clips` clips (VideoMAE's `num_sample`: 2 on SSv2; its lr
            scaling counts videos, and so does `lr_reference_batch` here).
        test_clips: temporal clips per test video (VideoMAE on SSv2: 2).
        test_crops: spatial crops per test clip (VideoMAE: 3).
        auto_augment: timm RandAugment recipe applied identically to the frames of a clip; None = off.
        re_prob: random-erasing probability (per frame, as VideoMAE).
        hflip: horizontal-flip probability. 0 by default: SSv2 has direction classes ("Pushing something
            from left to right"), so VideoMAE does not flip SSv2.
        scale: area range of the clip's random resized crop.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.

    Examples:
        >>> from frozenlm.data import SSv2DataModule
        >>> datamodule = SSv2DataModule(root="data/ssv2", num_frames=16, batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/ssv2_videomae_small.yaml`); `--data.root` points it at your copy.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 8,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_frames: int = 16,
        img_size: int = 224,
        train_clips: int = 1,
        test_clips: int = 2,
        test_crops: int = 3,
        auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        re_prob: float = 0.25,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        max_unreadable_fraction: float = 0.01,
    ):
        super().__init__(batch_size, num_workers, pin_memory, max_unreadable_fraction=max_unreadable_fraction)
        self.root = Path(root)
        self.num_frames = num_frames
        self.train_clips = train_clips
        self.test_clips = test_clips
        self.video_folder = self.find_video_folder()
        self.class_index = self.read_labels()
        self.num_classes = len(self.class_index)
        self.classes = sorted(self.class_index, key=self.class_index.get)  # names by index, for predictions
        self.train_transform = VideoTrainTransform(
            img_size, scale=scale, hflip=hflip, auto_augment=auto_augment, re_prob=re_prob, mean=mean, std=std
        )
        self.val_transform = VideoEvalTransform(img_size, num_crops=1, mean=mean, std=std)
        self.test_transform = VideoEvalTransform(img_size, num_crops=test_crops, mean=mean, std=std)
        self.splits: dict[str, VideoSplit] = {}

    # -- files -------------------------------------------------------------------------------
    def find_video_folder(self) -> Path:
        """The folder holding the videos (under either name the downloads use)."""
        for name in VIDEO_FOLDERS:
            if (self.root / name).is_dir():
                return self.root / name
        raise DatasetNotFoundError(
            f"SSv2DataModule: no video folder {' or '.join(str(self.root / n) for n in VIDEO_FOLDERS)}. "
            + DOWNLOAD_HINT
        )

    def read_labels(self) -> dict[str, int]:
        """The class index of each class name (labels.json); the annotation files must be there."""
        labels = self.root / "labels"
        missing = [labels / f for f in ("labels.json", *SPLIT_FILES.values()) if not (labels / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"SSv2DataModule: missing label file(s) {', '.join(map(str, missing))}. " + DOWNLOAD_HINT
            )
        return {name: int(index) for name, index in read_json(labels / "labels.json").items()}

    def load_split(self, split: str) -> VideoSplit:
        """Files, classes and ids of the "train" or the "val" split, from its annotation file."""
        if split not in self.splits:
            path = self.root / "labels" / SPLIT_FILES[split]
            paths, labels, ids = [], [], []
            for entry in read_json(path):
                template = entry["template"]
                name = class_name(template)
                if name not in self.class_index:
                    raise DatasetFileError(f"{path}: the template {template!r} of video {entry['id']} is not in labels.json")
                paths.append(self.video_folder / f"{entry['id']}.webm")
                labels.append(self.class_index[name])
                ids.append(str(entry["id"]))
            self.splits[split] = VideoSplit(paths, labels, ids)
        return self.splits[split]

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = LabeledVideos(self.load_split("train"), "train", self.num_frames, self.train_transform, self.train_clips)
        return self._train_loader(dataset)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(LabeledVideos(self.load_split("val"), "val", self.num_frames, self.val_transform))

    def test_dataloader(self) -> DataLoader:
        dataset = LabeledVideos(self.load_split("val"), "test", self.num_frames, self.test_transform, self.test_clips)
        return self._eval_loader(dataset)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

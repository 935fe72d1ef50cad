"""Flickr30k (Young et al., TACL 2014) with Karpathy's splits: 31,783 images, five captions each."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.vision_language import (
    CLIP_MEAN,
    CLIP_STD,
    VisionLanguageDataModule,
    clip_transform,
    read_image,
    read_json,
)

ANNOTATION_FILE = "dataset_flickr30k.json"
IMAGE_FOLDER = "flickr30k-images"
DOWNLOAD_HINT = (
    "Request Flickr30k's images at https://shannon.cs.illinois.edu/DenotationGraph/ (flickr30k-images/), take "
    "Karpathy's splits (dataset_flickr30k.json, in caption_datasets.zip of cs.stanford.edu/people/karpathy/deepimagesent), "
    "put both in one folder and pass it as --data.root."
)


class CaptionedImage(NamedTuple):
    path: Path
    captions: list[str]


class CaptionPairs(Dataset):
    """Training samples, one per caption: `{"image", "texts": [positive, *negatives], "id"}`. The negatives are
    `negatives` captions of other images, drawn afresh each time (METER's ranking loss: 1 + 15). With
    `false_image`, `"false_image"` is another image of the split, drawn the same way (METER's
    `get_false_image`, the negatives of its image-text matching loss)."""

    def __init__(self, images: list[CaptionedImage], negatives: int, transform, false_image: bool = False) -> None:
        self.images, self.negatives, self.transform, self.false_image = images, negatives, transform, false_image
        self.pairs = [(i, c) for i, image in enumerate(images) for c in range(len(image.captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_index, caption = self.pairs[index]
        item = self.images[image_index]
        image = read_image(item.path, self.transform)
        if not torch.is_tensor(image):
            return image
        texts = [item.captions[caption]]
        while len(texts) < 1 + self.negatives:  # the loader's per-process, per-epoch seeded stream
            other, which = self.pairs[int(torch.randint(len(self.pairs), ()))]
            if other != image_index:
                texts.append(self.images[other].captions[which])
        sample = {"image": image, "texts": texts, "id": f"{item.path.name}#{caption}"}
        if self.false_image:
            other = image_index
            while other == image_index and len(self.images) > 1:
                other = int(torch.randint(len(self.images), ()))
            false_image = read_image(self.images[other].path, self.transform)
            if not torch.is_tensor(false_image):
                return false_image  # the sample needs it: dropped and counted, naming that file
            sample["false_image"] = false_image
        return sample


class EvaluationImages(Dataset):
    """The images of an evaluation split: `{"image", "index", "id"}` (index: position in the split)."""

    def __init__(self, images: list[CaptionedImage], transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.images[index].path, self.transform)
        if not torch.is_tensor(image):
            return image
        return {"image": image, "index": index, "id": self.images[index].path.name}


class Flickr30kDataModule(VisionLanguageDataModule):
    """Flickr30k with Karpathy's splits (29,000 / 1,014 / 1,000 images), METER's retrieval fine-tuning data.

    On disk:

        root/dataset_flickr30k.json     {"images": [{"filename", "split": train|val|test,
                                          "sentences": [{"raw": ...}, ...]}, ...]}
        root/flickr30k-images/<filename>.jpg

    Training batches: `{"image" [B, 3, S, S], "texts" [[positive, 15 negatives]], "id", "unreadable"}`, and
    `"false_image" [B, 3, S, S]` (another image per sample, for METER's image-text matching loss) unless
    `false_image` is off.
    Evaluation batches hold images only (`{"image", "index", "id"}`); the task scores each against every
    caption of the split ([`captions`][frozenlm.data.flickr30k.Flickr30kDataModule.captions]), so each retrieval metric covers the whole split. Validation
    uses `val`, test and predict `test`. An unreadable evaluation image is an error (recall over a split
    missing an image is not the split's); an unreadable training image drops its samples and is counted.

    Args:
        root: dataset folder (see above).
        batch_size: images per batch in each process.
        img_size: image side (METER's Flickr30k recipe: 384).
        negatives: captions of other images per training sample (METER: 15).
        false_image: draw one other image per training sample (METER's `draw_false_image: 1`), which
            [`ImageTextRetrieval`][frozenlm.tasks.ImageTextRetrieval] needs for its ITM loss (`itm_weight`); off saves
            reading a second image per sample when `itm_weight` is 0.
        num_workers, pin_memory, max_unreadable_fraction: see
            `BaseDataModule`.
        mean, std: image normalisation (CLIP's).

    Examples:
        >>> from frozenlm.data import Flickr30kDataModule
        >>> datamodule = Flickr30kDataModule(root="data/flickr30k", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/flickr30k_meter.yaml`); `--data.root` points it at your copy.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        img_size: int = 384,
        negatives: int = 15,
        false_image: bool = True,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        max_unreadable_fraction: float = 0.01,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, max_unreadable_fraction, DOWNLOAD_HINT)
        self.negatives, self.false_image = negatives, false_image
        self.mean, self.std = mean, std  # what a model undoing the normalisation reads
        self.transform = clip_transform(img_size, mean, std)
        self.splits = self.read_splits()

    def read_splits(self) -> dict[str, list[CaptionedImage]]:
        """Karpathy's splits: the images of train (restval included), val and test, with their captions."""
        path = self.root / ANNOTATION_FILE
        data = read_json(path, DOWNLOAD_HINT)
        folder = self.root / IMAGE_FOLDER
        if not folder.is_dir():
            raise DatasetNotFoundError(f"Flickr30kDataModule: missing the image folder {folder}. {DOWNLOAD_HINT}")
        splits: dict[str, list[CaptionedImage]] = {"train": [], "val": [], "test": []}
        try:
            for entry in data["images"]:
                captions = [sentence["raw"] for sentence in entry["sentences"]]
                if not captions or not all(isinstance(c, str) for c in captions):
                    raise ValueError(f"image {entry['filename']} has no captions")
                split = "train" if entry["split"] == "restval" else entry["split"]
                splits[split].append(CaptionedImage(folder / entry["filename"], captions))
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetFileError(
                f"{path} is not in Karpathy's format ({type(error).__name__}: {error}). {DOWNLOAD_HINT}"
            ) from None
        empty = [name for name, images in splits.items() if not images]
        if empty:
            raise DatasetFileError(f"{path} has no images in the {', '.join(empty)} split(s). {DOWNLOAD_HINT}")
        return splits

    @staticmethod
    def evaluation_split(stage: str) -> str:
        return "val" if stage in ("val", "validate", "sanity_check") else "test"

    def captions(self, stage: str) -> tuple[list[str], torch.Tensor]:
        """Every caption of `stage`'s split and the index of its image in the split."""
        images = self.splits[self.evaluation_split(stage)]
        texts = [caption for image in images for caption in image.captions]
        owners = torch.tensor([i for i, image in enumerate(images) for _ in image.captions])
        return texts, owners

    # -- loaders -----------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return self._train_loader(CaptionPairs(self.splits["train"], self.negatives, self.transform, self.false_image))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(EvaluationImages(self.splits["val"], self.transform))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(EvaluationImages(self.splits["test"], self.transform))

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

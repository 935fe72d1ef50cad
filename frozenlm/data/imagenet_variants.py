"""ImageNet's distribution-shift test sets, for evaluating an ImageNet-1k classifier (`frozenlm test`).

ImageNet-A (Hendrycks et al., CVPR 2021, natural adversarial examples) and ImageNet-R (Hendrycks et
al., ICCV 2021, renditions) cover 200 of the 1000 classes: predictions are restricted to those
(`class_subset`, read by the task, which masks the other classes). ImageNet-Sketch (Wang et al.,
NeurIPS 2019) covers all 1000; ImageNet-C (Hendrycks & Dietterich, ICLR 2019) holds 15 corruptions x 5
severities of the 50,000 val images, so the accuracy over all of them is the mean over corruptions and
severities (1 - it is the unnormalised mean corruption error; the mCE of the paper further divides each
corruption's error by AlexNet's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from timm.data import ImageNetInfo
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from frozenlm.data.base import DatasetError, DatasetNotFoundError, ImageDataModule, Split

# The 15 corruptions of the ImageNet-C benchmark (the 4 extra ones of its download are opt-in).
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
DOWNLOADS = {
    "a": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar (extract; --data.root is imagenet-a/)",
    "r": "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (extract; --data.root is imagenet-r/)",
    "sketch": "https://github.com/HaohanWang/ImageNet-Sketch (--data.root is its sketch/ folder)",
    "c": "https://zenodo.org/record/2235448 (extract every tar into one folder; --data.root is that folder)",
}


class ImageNetVariantDataModule(ImageDataModule):
    """An ImageNet-1k distribution-shift test set, for `validate`, `test` and `predict` only.

    On disk (as each is published):

        variant a:       root/<wnid>/*.jpg                       200 classes, 7,500 images
        variant r:       root/<wnid>/*.jpg                       200 classes, 30,000 images
        variant sketch:  root/<wnid>/*.JPEG                      1000 classes, 50,889 images
        variant c:       root/<corruption>/<1..5>/<wnid>/*.JPEG  1000 classes, 50,000 per set

    Labels follow the model's class order: the 1000 ImageNet-1k synsets in sorted order (what
    [`ImageFolderDataModule`][frozenlm.data.ImageFolderDataModule] gives a model trained on ImageNet), or the class folders of
    `class_order_root/train` for a model trained on another ImageFolder dataset.

    Args:
        root: the variant's folder (see above).
        variant: `a`, `r`, `sketch` or `c`.
        corruptions: ImageNet-C corruptions to evaluate together (default: the benchmark's 15).
        severities: ImageNet-C severities (default 1-5).
        class_order_root: an ImageFolder root whose `train/` class folders give the model's classes.
        crop_pct: eval centre-crop fraction; None = 1.0 for ImageNet-C (already 224 px centre crops),
            0.875 otherwise.
        Others: as [`ImageDataModule`][frozenlm.data.base.ImageDataModule] (only the evaluation transform is used).

    Examples:
        >>> from frozenlm.data import ImageNetVariantDataModule
        >>> datamodule = ImageNetVariantDataModule(root="data/imagenet-r", variant="r")  # doctest: +SKIP

        As a config's `data:` section (`class_path: frozenlm.data.ImageNetVariantDataModule`, `variant: r`),
        `frozenlm test --ckpt_path` evaluates a trained checkpoint on it (see the image guide).
    """

    def __init__(
        self,
        root: str | Path,
        variant: Literal["a", "r", "sketch", "c"],
        corruptions: list[str] | None = None,
        severities: list[int] | None = None,
        class_order_root: str | Path | None = None,
        crop_pct: float | None = None,
        **kwargs,
    ):
        super().__init__(root, crop_pct=(1.0 if variant == "c" else 0.875) if crop_pct is None else crop_pct, **kwargs)
        if variant not in DOWNLOADS:
            raise ValueError(f"Unknown ImageNet variant {variant!r}; choose one of {sorted(DOWNLOADS)}.")
        self.variant = variant
        self.corruptions = list(corruptions or IMAGENET_C_CORRUPTIONS)
        self.severities = list(severities or range(1, 6))
        if class_order_root is None:
            self.classes = list(ImageNetInfo().label_names())
        else:
            self.classes = find_classes(Path(class_order_root) / "train")[0]
        self.num_classes = len(self.classes)
        self.folders = self.class_folders()
        present = sorted({wnid for folder in self.folders for wnid in find_classes(folder)[0]})
        unknown = sorted(set(present) - set(self.classes))
        if unknown:
            raise ValueError(
                f"ImageNetVariantDataModule: {len(unknown)} class folder(s) of {self.root} are not among the model's "
                f"{self.num_classes} classes (e.g. {unknown[:3]}); is --data.root an ImageNet-{variant} folder, and "
                "--data.class_order_root right?"
            )
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        # ImageNet-A and -R are scored over the 200 classes they cover: predictions are restricted to these.
        self.class_subset = [index[wnid] for wnid in present] if variant in ("a", "r") else None

    def class_folders(self) -> list[Path]:
        """The folders that hold `<wnid>/` class folders."""
        if self.variant != "c":
            folders = [self.root]
        else:
            unknown = sorted(set(self.corruptions) - set(IMAGENET_C_CORRUPTIONS) - {
                "speckle_noise", "gaussian_blur", "spatter", "saturate"})  # fmt: skip
            if unknown:
                raise ValueError(f"Unknown ImageNet-C corruption(s) {unknown}; the benchmark's: {IMAGENET_C_CORRUPTIONS}.")
            folders = [self.root / c / str(s) for c in self.corruptions for s in self.severities]
        missing = [f for f in folders if not f.is_dir() or not any(p.is_dir() for p in f.iterdir())]
        if missing:
            raise DatasetNotFoundError(
                f"ImageNetVariantDataModule: no class folders in {', '.join(map(str, missing[:3]))}"
                f"{' and others' if len(missing) > 3 else ''}. Get ImageNet-{self.variant} from {DOWNLOADS[self.variant]}."
            )
        return folders

    def load_split(self, split: str) -> Split:
        if split == "train":
            raise DatasetError(
                f"ImageNet-{self.variant} is an evaluation set: use it with `frozenlm validate|test|predict "
                "--ckpt_path ...`, not `fit`."
            )
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        paths, labels = [], []
        for folder in self.folders:
            present = {wnid: index[wnid] for wnid in find_classes(folder)[0]}
            for path, label in make_dataset(folder, present, extensions=IMG_EXTENSIONS):
                paths.append(path)
                labels.append(label)
        ids = [Path(p).relative_to(self.root).as_posix() for p in paths]
        return Split(paths, labels, ids)

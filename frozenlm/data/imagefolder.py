"""Any dataset in the ImageNet folder layout (ImageNet-1k itself, its subsets, custom data)."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from frozenlm.data.base import DatasetNotFoundError, ImageDataModule, Split


class ImageFolderDataModule(ImageDataModule):
    """One folder of images per class, in a train and a val tree (torchvision's ImageFolder convention).

    On disk:

        root/train/<class>/*.JPEG
        root/val/<class>/*.JPEG     the same class folders as train/

    Classes are the sorted folder names of train/; `num_classes` is their count. No download: ImageNet
    needs a manual download from image-net.org, and its val images must first be sorted into class
    folders (e.g. with the widely used valprep.sh). Ids are paths relative to root.

    Args:
        root: the directory that holds train/ and val/.
        Others: as `ImageDataModule`.

    Examples:
        >>> from frozenlm.data import ImageFolderDataModule
        >>> datamodule = ImageFolderDataModule(root="data/imagenet", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/imagenet_deit_small.yaml`); `--data.root` points it at your copy.
    """

    def __init__(self, root: str | Path, **kwargs):
        super().__init__(root, **kwargs)
        self.classes = self.class_folders("train")
        val_classes = self.class_folders("val")
        if val_classes != self.classes:
            only_train = sorted(set(self.classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(self.classes))
            raise ValueError(
                f"ImageFolderDataModule: the class folders of {self.root / 'train'} and {self.root / 'val'} "
                f"differ (only in train: {only_train[:5]}, only in val: {only_val[:5]}; first 5 of each shown). "
                "Both must hold one folder per class with the same names."
            )
        self.num_classes = len(self.classes)

    def class_folders(self, split: str) -> list[str]:
        """The sorted class folder names of `split`."""
        folder = self.root / split
        try:
            return find_classes(folder)[0]
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"ImageFolderDataModule: no class folders in {folder}. Expected root/train/<class>/*.JPEG and "
                "root/val/<class>/*.JPEG; pass --data.root DIR pointing at the directory that holds train/ and val/."
            ) from None

    def load_split(self, split: str) -> Split:
        folder = self.root / split
        samples = make_dataset(folder, {name: i for i, name in enumerate(self.classes)}, extensions=IMG_EXTENSIONS)
        paths = [path for path, _ in samples]
        ids = [Path(path).relative_to(self.root).as_posix() for path in paths]
        return Split(paths, [label for _, label in samples], ids)

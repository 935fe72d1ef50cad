"""ScanObjectNN (Uy et al., ICCV 2019): 15 classes of objects scanned in real indoor scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.pointcloud import PointCloudDataModule

CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed", "pillow", "sink",
    "sofa", "toilet",
)  # fmt: skip
# variant -> (train file, test file) under root, as the official h5_files download extracts.
VARIANTS = {
    "obj_bg": ("main_split/training_objectdataset.h5", "main_split/test_objectdataset.h5"),
    "obj_only": ("main_split_nobg/training_objectdataset.h5", "main_split_nobg/test_objectdataset.h5"),
    "hardest": (
        "main_split/training_objectdataset_augmentedrot_scale75.h5",
        "main_split/test_objectdataset_augmentedrot_scale75.h5",
    ),
}
DOWNLOAD_HINT = (
    "ScanObjectNN is published at https://hkust-vgd.github.io/scanobjectnn/ (its terms of use form gives the "
    "h5_files.zip link); extract it and pass --data.root <...>/h5_files."
)


class ScanObjectNNDataModule(PointCloudDataModule):
    """ScanObjectNN's official h5 files: objects with background (`obj_bg`, 2,309 / 581), without
    (`obj_only`, same objects) and the perturbed `hardest` set (PB_T50_RS, 11,416 / 2,882).

    On disk (the official `h5_files` download):

        root/main_split/training_objectdataset.h5                      obj_bg (and `hardest`:
        root/main_split/test_objectdataset.h5                          ..._augmentedrot_scale75.h5)
        root/main_split_nobg/{training,test}_objectdataset.h5          obj_only

    Each file holds `data` float32 `[N, 2048, 3]`, `label` `[N]` (0-14, in `CLASSES`
    order) and `mask` (the background points; not used, as in Point-BERT). The clouds are used as
    stored (no re-centring). Ids are `<variant>/<split>/<index>`. Needs `h5py` (extra `pointcloud`).

    Args:
        root: the folder holding `main_split/` and `main_split_nobg/`.
        variant: `obj_bg`, `obj_only` or `hardest`.
        Others: see [`PointCloudDataModule`][frozenlm.data.pointcloud.PointCloudDataModule].

    Examples:
        >>> from frozenlm.data import ScanObjectNNDataModule
        >>> datamodule = ScanObjectNNDataModule(root="data/scanobjectnn/h5_files", variant="hardest", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/scanobjectnn_hardest_pointbert.yaml`); `--data.root` points it at your copy.
    """

    classes = list(CLASSES)
    num_classes = len(CLASSES)

    def __init__(self, root: str | Path, variant: str = "obj_bg", **kwargs) -> None:
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"Unknown ScanObjectNN variant {variant!r}; choose one of {sorted(VARIANTS)}.")
        self.root, self.variant = Path(root), variant
        missing = [name for name in VARIANTS[variant] if not (self.root / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"ScanObjectNNDataModule ({variant}): missing {', '.join(missing)} under {self.root}. {DOWNLOAD_HINT}"
            )

    def load_split(self, split: str) -> tuple[Tensor, list[int], list[str]]:
        try:
            import h5py
        except ImportError as error:
            raise ImportError("Reading ScanObjectNN needs h5py: pip install 'frozenlm[pointcloud]'.") from error
        path = self.root / VARIANTS[self.variant][split != "train"]
        try:
            with h5py.File(path, "r") as file:
                if "data" not in file or "label" not in file:
                    raise ValueError(f"has the datasets {sorted(file)}, not `data` and `label`")
                points, labels = np.asarray(file["data"], dtype=np.float32), np.asarray(file["label"]).reshape(-1)
        except (OSError, ValueError) as error:
            raise DatasetFileError(f"{path} is not a ScanObjectNN h5 file: {error}. {DOWNLOAD_HINT}") from error
        if points.ndim != 3 or points.shape[2] != 3 or len(points) != len(labels):
            raise DatasetFileError(
                f"{path}: `data` must be [N, points, 3] with one `label` per cloud, got data {points.shape} "
                f"and label {labels.shape}."
            )
        if len(labels) == 0:
            raise DatasetFileError(f"{path} holds no clouds (`data` is empty). {DOWNLOAD_HINT}")
        if not (0 <= labels.min() and labels.max() < self.num_classes):
            raise DatasetFileError(f"{path}: labels span {labels.min()}..{labels.max()}, ScanObjectNN has 0..14.")
        finite = np.isfinite(points).all(axis=(1, 2))
        if not finite.all():
            raise DatasetFileError(
                f"{path}: `data` holds NaN or infinite coordinates in {(~finite).sum()} clouds (first: index "
                f"{np.flatnonzero(~finite)[0]}). {DOWNLOAD_HINT}"
            )
        ids = [f"{self.variant}/{split}/{i}" for i in range(len(labels))]
        return torch.from_numpy(points), labels.astype(np.int64).tolist(), ids

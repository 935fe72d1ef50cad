"""ModelNet40 (Wu et al., CVPR 2015), as Point-BERT reads it: ``modelnet40_normal_resampled``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import DatasetNotFoundError
from frozenlm.data.pointcloud import PointCloudDataModule
from frozenlm.models.point_ops import farthest_point_sample

DOWNLOAD_HINT = (
    "Download modelnet40_normal_resampled.zip (the resampled ModelNet40 of PointNet++, "
    "https://shapenet.cs.stanford.edu/media/modelnet40_normal_resampled.zip), extract it and pass "
    "--data.root <...>/modelnet40_normal_resampled."
)


def read_shape(path: Path) -> np.ndarray:
    """One shape's ``x,y,z,nx,ny,nz`` rows -> float32 ``[N, 3]`` coordinates."""
    values = np.array(path.read_text().replace(",", " ").split(), dtype=np.float32)
    if values.size == 0 or values.size % 6:
        raise ValueError(f"{path} is not a ModelNet40 shape: expected rows of 6 comma-separated values.")
    return values.reshape(-1, 6)[:, :3]


def normalize(points: np.ndarray) -> np.ndarray:
    """Centred on the mean and scaled into the unit sphere (Point-BERT's ``pc_normalize``)."""
    points = points - points.mean(axis=0)
    return points / np.sqrt((points**2).sum(axis=1)).max()


class _ShapeFiles(Dataset):
    """Shapes read, FPS-resampled and normalised in loader workers, to build the cache."""

    def __init__(self, paths: list[Path], count: int) -> None:
        self.paths, self.count = paths, count

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        torch.set_num_threads(1)  # several workers on few cores: one thread each
        points = torch.from_numpy(read_shape(self.paths[index]))
        if len(points) < self.count:
            raise ValueError(f"{self.paths[index]} has {len(points)} points, fewer than the {self.count} to sample.")
        chosen = points[farthest_point_sample(points[None], self.count)[0]]
        return torch.from_numpy(normalize(chosen.numpy()))


class ModelNet40DataModule(PointCloudDataModule):
    """ModelNet40 in the ``modelnet40_normal_resampled`` layout: 9,843 training and 2,468 test CAD
    shapes of 40 classes, 10,000 points each.

    On disk::

        root/modelnet40_shape_names.txt        40 class names, one a line (the class order)
        root/modelnet40_{train,test}.txt       shape ids, e.g. night_stand_0001 (class: all but the last `_` part)
        root/<class>/<id>.txt                  10,000 rows `x,y,z,nx,ny,nz` (normals unused)

    As Point-BERT, each shape is farthest-point-sampled once to ``cache_points`` (8,192) points and
    normalised into the unit sphere; the result is cached as ``modelnet40_<split>_<cache_points>pts_fps
    .safetensors`` in ``cache_dir`` (default: root), built with a progress bar on first use. Point-BERT's
    widely shared ``*_fps.dat`` caches are pickles, which can run code when loaded: they are refused
    unless ``trust_pickled_cache`` is set. Ids are the shape ids.

    Args:
        root: the ``modelnet40_normal_resampled`` folder.
        cache_points: points per shape in the cache (at least ``num_points``).
        cache_dir: where the cache is written; default root.
        trust_pickled_cache: read Point-BERT's pickled ``modelnet40_<split>_8192pts_fps.dat`` when no
            shape files are there (only for files you trust).
        Others: see :class:`frozenlm.data.pointcloud.PointCloudDataModule` (``num_points`` 1,024,
            4,096 or 8,192 in the paper).
    """

    def __init__(
        self,
        root: str | Path,
        cache_points: int = 8192,
        cache_dir: str | Path | None = None,
        trust_pickled_cache: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.cache_points, self.trust_pickled_cache = cache_points, trust_pickled_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root
        if cache_points < self.num_points:
            raise ValueError(f"cache_points {cache_points} is below num_points {self.num_points}.")
        names = self.root / "modelnet40_shape_names.txt"
        if not names.is_file():
            raise DatasetNotFoundError(f"ModelNet40DataModule: no {names}. {DOWNLOAD_HINT}")
        self.classes = names.read_text().split()
        self.num_classes = len(self.classes)

    def cache_path(self, split: str) -> Path:
        return self.cache_dir / f"modelnet40_{split}_{self.cache_points}pts_fps.safetensors"

    def load_split(self, split: str) -> tuple[Tensor, list[int], list[str]]:
        cache = self.cache_path(split)
        if not cache.is_file():
            self.build_cache(split)
        tensors = load_file(cache)
        with safe_open(cache, "pt") as file:  # ids travel in the header's metadata
            ids = json.loads(file.metadata()["ids"])
        return tensors["points"], tensors["labels"].tolist(), ids

    def shape_ids(self, split: str) -> list[str]:
        listing = self.root / f"modelnet40_{split}.txt"
        if not listing.is_file():
            raise DatasetNotFoundError(f"ModelNet40DataModule: no {listing}. {DOWNLOAD_HINT}")
        return listing.read_text().split()

    def build_cache(self, split: str) -> None:
        """FPS-resample every shape of ``split`` and write the cache atomically."""
        ids = self.shape_ids(split)
        index = {name: i for i, name in enumerate(self.classes)}
        paths, labels = [], []
        for shape in ids:
            name = shape.rsplit("_", 1)[0]
            if name not in index:
                raise ValueError(
                    f"Shape {shape} of modelnet40_{split}.txt has class {name!r}, not in modelnet40_shape_names.txt."
                )
            paths.append(self.root / name / f"{shape}.txt")
            labels.append(index[name])
        missing = [p for p in paths if not p.is_file()]
        if missing:
            pickled = self.root / f"modelnet40_{split}_8192pts_fps.dat"
            if pickled.is_file():
                return self._convert_pickled(pickled, split, ids, labels)
            raise DatasetNotFoundError(
                f"ModelNet40DataModule: {len(missing)} shape file(s) listed in modelnet40_{split}.txt are missing, "
                f"e.g. {missing[0].relative_to(self.root)}. {DOWNLOAD_HINT}"
            )
        loader = DataLoader(_ShapeFiles(paths, self.cache_points), batch_size=None, num_workers=self.num_workers)
        progress = track(loader, total=len(paths), description=f"ModelNet40 {split}: FPS to {self.cache_points} points")
        clouds = list(progress)
        self._write(split, torch.stack(clouds), labels, ids)

    def _convert_pickled(self, pickled: Path, split: str, ids: list[str], labels: list[int]) -> None:
        if not self.trust_pickled_cache:
            raise DatasetNotFoundError(
                f"ModelNet40DataModule: the shape files are missing and only {pickled.name} is there, a pickle "
                "(unpickling runs any code it holds), which frozenlm does not read by default. Rebuild the cache "
                f"from the shape files: {DOWNLOAD_HINT} Or, if you trust that file, --data.trust_pickled_cache true."
            )
        import pickle

        with open(pickled, "rb") as file:
            points, _ = pickle.load(file)  # Point-BERT's ([N, 8192, 6] arrays, labels)
        clouds = np.stack([normalize(np.asarray(p, dtype=np.float32)[: self.cache_points, :3]) for p in points])
        self._write(split, torch.from_numpy(clouds), labels, ids)

    def _write(self, split: str, points: Tensor, labels: list[int], ids: list[str]) -> None:
        path = self.cache_path(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(descriptor)
        try:
            save_file(
                {"points": points.float().contiguous(), "labels": torch.tensor(labels, dtype=torch.int64)},
                partial, metadata={"ids": json.dumps(ids), "cache_points": str(self.cache_points)},
            )  # fmt: skip
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise

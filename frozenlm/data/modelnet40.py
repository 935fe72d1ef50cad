"""ModelNet40 (Wu et al., CVPR 2015), as Point-BERT reads it: `modelnet40_normal_resampled`."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.distributed import share_work
from frozenlm.data.pointcloud import PointCloudDataModule
from frozenlm.files import atomic_path, source_stamp
from frozenlm.models.point_ops import farthest_point_sample

REPAIR_HINT = "Re-extract it from modelnet40_normal_resampled.zip (or remove its id from the split's listing)."
DOWNLOAD_HINT = (
    "Download modelnet40_normal_resampled.zip (the resampled ModelNet40 of PointNet++, "
    "https://shapenet.cs.stanford.edu/media/modelnet40_normal_resampled.zip), extract it and pass "
    "--data.root <...>/modelnet40_normal_resampled."
)


def read_shape(path: Path) -> np.ndarray:
    """One shape's `x,y,z,nx,ny,nz` rows -> float32 `[N, 3]` coordinates; a malformed file (a token
    that is not a number, rows not of 6 values, NaN or infinite coordinates) raises
    `DatasetFileError` naming the file and line."""
    text = path.read_text()
    try:
        values = np.array(text.replace(",", " ").split(), dtype=np.float32)
    except ValueError:
        for number, line in enumerate(text.splitlines(), start=1):
            for token in line.replace(",", " ").split():
                try:
                    float(token)
                except ValueError:
                    raise DatasetFileError(f"{path}, line {number}: {token!r} is not a number. {REPAIR_HINT}") from None
        raise
    if values.size == 0 or values.size % 6:
        raise DatasetFileError(f"{path} is not a ModelNet40 shape: expected rows of 6 comma-separated values. {REPAIR_HINT}")
    points = values.reshape(-1, 6)[:, :3]
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        raise DatasetFileError(
            f"{path}, line {np.flatnonzero(~finite)[0] + 1}: NaN or infinite coordinates ({(~finite).sum()} rows). "
            f"{REPAIR_HINT}"
        )
    return points


def normalize(points: np.ndarray) -> np.ndarray:
    """Centred on the mean and scaled into the unit sphere (Point-BERT's `pc_normalize`)."""
    points = points - points.mean(axis=0)
    return points / np.sqrt((points**2).sum(axis=1)).max()


class _ShapeFiles(Dataset):
    """Shapes read, FPS-resampled and normalised in loader workers, to build the cache; a damaged file's
    `DatasetFileError` is returned, not raised, so the main process raises it as it is."""

    def __init__(self, paths: list[Path], count: int) -> None:
        self.paths, self.count = paths, count

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor | DatasetFileError:
        # (one thread per loader worker is PyTorch's own setting; with num_workers=0 this is the training process)
        try:
            points = torch.from_numpy(read_shape(self.paths[index]))
            if len(points) < self.count:
                raise DatasetFileError(
                    f"{self.paths[index]} has {len(points)} points, fewer than the {self.count} to sample "
                    "(--data.cache_points)."
                )
        except DatasetFileError as error:
            return error
        chosen = points[farthest_point_sample(points[None], self.count)[0]]
        return torch.from_numpy(normalize(chosen.numpy()))


class CachedSplit(NamedTuple):
    """A split as its cache holds it; `sources` stamps each shape's file (`source_stamp`)."""

    points: Tensor
    labels: list[int]
    ids: list[str]
    sources: list[str]


class ModelNet40DataModule(PointCloudDataModule):
    """ModelNet40 in the `modelnet40_normal_resampled` layout: 9,843 training and 2,468 test CAD
    shapes of 40 classes, 10,000 points each.

    On disk:

        root/modelnet40_shape_names.txt        40 class names, one a line (the class order)
        root/modelnet40_{train,test}.txt       shape ids, e.g. night_stand_0001 (class: all but the last `_` part)
        root/<class>/<id>.txt                  10,000 rows `x,y,z,nx,ny,nz` (normals unused)

    As Point-BERT, each shape is farthest-point-sampled once to `cache_points` (8,192) points and
    normalised into the unit sphere; the result is cached as `modelnet40_<split>_<cache_points>pts_kernelfps
    .safetensors` in `cache_dir` (default: root), built with a progress bar on first use. The cache
    stamps each shape with its file's size and modification time: a shape file replaced or repaired
    since is resampled, a damaged cache rebuilt (both said in one line). A malformed shape file (a
    token that is not a number, NaN or infinite coordinates), an empty listing or a class not in
    `modelnet40_shape_names.txt` stops with `DatasetFileError` naming the
    file and line. Point-BERT's
    widely shared `*_fps.dat` caches are pickles, which can run code when loaded: they are refused
    unless `trust_pickled_cache` is set. Ids are the shape ids.

    Args:
        root: the `modelnet40_normal_resampled` folder.
        cache_points: points per shape in the cache (at least `num_points`).
        cache_dir: where the cache is written; default root.
        trust_pickled_cache: read Point-BERT's pickled `modelnet40_<split>_8192pts_fps.dat` when no
            shape files are there (only for files you trust).
        Others: see [`PointCloudDataModule`][frozenlm.data.pointcloud.PointCloudDataModule] (`num_points` 1,024,
            4,096 or 8,192 in the paper).

    Examples:
        >>> from frozenlm.data import ModelNet40DataModule
        >>> datamodule = ModelNet40DataModule(root="data/modelnet40_normal_resampled", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/modelnet40_1k_pointbert.yaml`); `--data.root` points it at your copy.
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
        """Where the sampled clouds of `split` are cached. `kernelfps`: sampled by the pointnet2 kernel's
        rule (`farthest_point_sample`); the `*pts_fps.safetensors`
        caches of frozenlm before it followed that rule (it could select points with |p|^2 <= 1e-3, and
        broke ties differently) are not read."""
        return self.cache_dir / f"modelnet40_{split}_{self.cache_points}pts_kernelfps.safetensors"

    def load_split(self, split: str) -> tuple[Tensor, list[int], list[str]]:
        """The split's clouds from its cache, (re)built first for the shapes whose files changed since."""
        cache = self.cache_path(split)
        cached = self.read_cache(cache)
        listing = self.root / f"modelnet40_{split}.txt"
        if cached is not None and not listing.is_file():  # nothing left to check the cache against
            return cached.points, cached.labels, cached.ids
        ids, paths, labels = self.shapes(split)
        missing = [p for p in paths if not p.is_file()]
        pickled = self.root / f"modelnet40_{split}_8192pts_fps.dat"
        if missing and not pickled.is_file():
            raise DatasetNotFoundError(
                f"ModelNet40DataModule: {len(missing)} shape file(s) listed in modelnet40_{split}.txt are "
                f"missing, e.g. {missing[0].relative_to(self.root)}. {DOWNLOAD_HINT}"
            )
        sources = [f"pickle:{source_stamp(pickled)}"] * len(ids) if missing else [source_stamp(p) for p in paths]
        if cached is None or cached.ids != ids or cached.sources != sources:

            def build(rank: int, world: int) -> None:  # one process (of all nodes) builds; the others wait
                if rank > 0:
                    return
                if missing:
                    self._convert_pickled(pickled, split, ids, labels, sources)
                else:
                    self.build_cache(split, paths, labels, ids, sources, cached)

            share_work(self.trainer, build)
        stored = self.read_cache(cache)
        return stored.points, stored.labels, stored.ids

    def read_cache(self, cache: Path) -> CachedSplit | None:
        """The cache's contents; None when there is none, or when it is damaged (then rebuilt, said once)."""
        if not cache.is_file():
            return None
        try:
            tensors = load_file(cache)
            with safe_open(cache, "pt") as file:  # ids and source stamps travel in the header's metadata
                metadata = file.metadata() or {}
            ids = json.loads(metadata["ids"])
        except Exception as error:  # truncated, not safetensors, no ids: whatever the reader says
            print(f"ModelNet40DataModule: the cache {cache} is damaged ({type(error).__name__}: {error}); rebuilding it.")
            return None
        sources = json.loads(metadata.get("sources", "[]"))  # caches of frozenlm < 0.2 have none: rebuilt
        return CachedSplit(tensors["points"], tensors["labels"].tolist(), ids, sources)

    def shapes(self, split: str) -> tuple[list[str], list[Path], list[int]]:
        """`(ids, shape files, labels)` of `modelnet40_<split>.txt`."""
        listing = self.root / f"modelnet40_{split}.txt"
        if not listing.is_file():
            raise DatasetNotFoundError(f"ModelNet40DataModule: no {listing}. {DOWNLOAD_HINT}")
        ids = listing.read_text().split()
        if not ids:
            raise DatasetFileError(f"{listing} lists no shape ids: the listing is empty or damaged. {DOWNLOAD_HINT}")
        index = {name: i for i, name in enumerate(self.classes)}
        paths, labels = [], []
        for number, shape in enumerate(ids, start=1):
            name = shape.rsplit("_", 1)[0]
            if name not in index:
                raise DatasetFileError(
                    f"{listing}, entry {number}: shape {shape!r} has class {name!r}, not in modelnet40_shape_names.txt."
                )
            paths.append(self.root / name / f"{shape}.txt")
            labels.append(index[name])
        return ids, paths, labels

    def build_cache(
        self, split: str, paths: list[Path], labels: list[int], ids: list[str], sources: list[str],
        cached: CachedSplit | None = None,
    ) -> None:  # fmt: skip
        """FPS-resample the shapes of `split` whose files changed since `cached` (all without one) and
        write the cache atomically."""
        previous = {key: row for row, key in enumerate(zip(cached.ids, cached.sources))} if cached else {}
        rows = [previous.get(key) for key in zip(ids, sources)]  # the cached row of each unchanged shape
        todo = [i for i, row in enumerate(rows) if row is None]
        if cached is not None:
            print(f"ModelNet40DataModule: {len(todo)} of {len(ids)} {split} shapes changed since {self.cache_path(split)} "
                  "was written; resampling them.")  # fmt: skip
        clouds = [None if row is None else cached.points[row] for row in rows]
        loader = DataLoader(_ShapeFiles([paths[i] for i in todo], self.cache_points), batch_size=None,
                            num_workers=self.num_workers)  # fmt: skip
        progress = track(loader, total=len(todo), description=f"ModelNet40 {split}: FPS to {self.cache_points} points")
        with closing(progress):  # an error leaves no live progress display behind
            for i, cloud in zip(todo, progress):
                if isinstance(cloud, DatasetFileError):
                    raise cloud
                clouds[i] = cloud
        self._write(split, torch.stack(clouds), labels, ids, sources)

    def _convert_pickled(self, pickled: Path, split: str, ids: list[str], labels: list[int], sources: list[str]) -> None:
        if not self.trust_pickled_cache:
            raise DatasetNotFoundError(
                f"ModelNet40DataModule: the shape files are missing and only {pickled.name} is there, a pickle "
                "(unpickling runs any code it holds), which frozenlm does not read by default. Rebuild the cache "
                f"from the shape files: {DOWNLOAD_HINT} Or, if you trust that file, --data.trust_pickled_cache true."
            )
        import pickle

        with open(pickled, "rb") as file:
            points, _ = pickle.load(file)  # Point-BERT's ([N, 8192, 6] arrays, labels)
        clouds = np.stack([np.asarray(p, dtype=np.float32)[: self.cache_points, :3] for p in points])
        if not np.isfinite(clouds).all():
            raise DatasetFileError(f"{pickled} holds NaN or infinite coordinates. {DOWNLOAD_HINT}")
        clouds = np.stack([normalize(cloud) for cloud in clouds])
        self._write(split, torch.from_numpy(clouds), labels, ids, sources)

    def _write(self, split: str, points: Tensor, labels: list[int], ids: list[str], sources: list[str]) -> None:
        with atomic_path(self.cache_path(split)) as partial:
            save_file(
                {"points": points.float().contiguous(), "labels": torch.tensor(labels, dtype=torch.int64)},
                partial, metadata={"ids": json.dumps(ids), "sources": json.dumps(sources),
                                   "cache_points": str(self.cache_points)},
            )  # fmt: skip

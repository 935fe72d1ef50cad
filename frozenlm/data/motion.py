"""What the Argoverse datamodules share: agent-centric vectorisation, a resumable on-disk cache of the
preprocessed scenes, padding collation, and prediction files.

Each scene is read once (by the dataset's reader, in loader worker processes, with a progress bar),
turned into VectorNet's vectors in the focal agent's frame (origin at its last observed position, its
heading along +x) and written as one safetensors file in a cache folder named after the
preprocessing parameters, keyed to the files it was read from (their sizes and modification times):
`<scenario_id>.<key>.safetensors`. An entry whose files are unchanged is never
redone, so a killed preprocessing run resumes; a scene whose file was replaced or repaired is read
again. A scene that cannot be used (unreadable file, no focal track, NaN positions, too few observed
steps, incomplete future, non-finite map points) gets a `<scenario_id>.<key>.skipped` file with the
reason instead: counted, reported once, never trained on, and retried once its files change. More
than `max_skipped_fraction` of a split skipped stops the run (`TooManySkippedScenesError`); a
damaged file that every scene needs (a city's map) stops it at once, named.

Vectors are `[x_start, y_start, x_end, y_end, a1, a2, a3, a4, is_agent, is_centreline, is_boundary,
is_crosswalk]`: for agents, between consecutive observed positions, with `a = (timestep / history,
is_focal, is_vehicle, is_vulnerable)`; for map polylines, between consecutive points, with the dataset's
four lane attributes (a lane's boundaries carry its lane's; crosswalks none). A batch keeps agents and
map polylines apart, each padded to its own longest polyline (agents: `history - 1` vectors; map
polylines: 9), so that padding stays a small part of the vectors VectorNet's subgraph runs over.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import BaseDataModule, DatasetError, DatasetFileError, DatasetNotFoundError
from frozenlm.data.distributed import DATASET_INDEX, share_work
from frozenlm.files import atomic_path, source_stamp, write_atomically
from frozenlm.predictions import PredictionFile, merge_csv

VECTOR_DIM = 12
CACHE_VERSION = 2  # 2: entries keyed to their source files; 12-wide vectors, map polylines of three kinds
MAP_KINDS = ("centreline", "boundary", "crosswalk")  # the one-hot after is_agent, in this order
MAP_POINTS = 10  # map polylines are resampled to this many points (Argoverse 2 interpolates centrelines so)


class UnusableSceneError(ValueError):
    """A scene that cannot be trained or evaluated on; the message says why."""


class TooManySkippedScenesError(DatasetError):
    """More of a split's scenes were unusable than the datamodule's `max_skipped_fraction`."""


def no_map_attributes() -> np.ndarray:
    """An empty `[0, 4]` float32 array: a scene without map polylines."""
    return np.zeros((0, 4), np.float32)


@dataclass
class Scene:
    """One scenario as read from disk, in world coordinates.

    `agent_positions [A, history, 2]` (NaN where unobserved) has the focal agent first;
    `agent_kinds [A]` is 0 vehicle, 1 vulnerable road user, 2 other; `future [horizon, 2]` is the
    focal agent's (None in a test split); `map_polylines` are `[P, 2]` points with
    `map_attributes [M, 4]` and `map_kinds [M]` (indices into `MAP_KINDS`; None: all
    centrelines); `focal_heading` (radians) when the dataset records it, else it is taken from the
    focal agent's last motion.
    """

    scenario_id: str
    focal_track_id: str
    agent_positions: np.ndarray
    agent_kinds: np.ndarray
    future: np.ndarray | None
    map_polylines: list[np.ndarray] = field(default_factory=list)
    map_attributes: np.ndarray = field(default_factory=no_map_attributes)
    map_kinds: np.ndarray | None = None
    focal_heading: float | None = None


def resample(points: np.ndarray, count: int = MAP_POINTS) -> np.ndarray:
    """`count` points evenly spaced by arc length along a polyline `[P, 2]`."""
    lengths = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    targets = np.linspace(0.0, lengths[-1], count)
    return np.stack([np.interp(targets, lengths, points[:, i]) for i in range(2)], axis=1)


def vectorize(scene: Scene, history: int, horizon: int, radius: float, needs_future: bool) -> dict[str, Any]:
    """The scene's tensors in the focal agent's frame (see the module docstring)."""
    positions = np.asarray(scene.agent_positions, dtype=np.float64)
    focal = positions[0]
    observed = ~np.isnan(focal).any(axis=1)
    if not observed[-1] or observed.sum() < 2:
        raise UnusableSceneError(f"the focal agent is observed at {observed.sum()} of {history} steps, not at the last")
    if np.isinf(positions).any():
        raise UnusableSceneError("infinite agent positions")
    future = None if scene.future is None else np.asarray(scene.future, dtype=np.float64)
    if needs_future and (future is None or len(future) != horizon or not np.isfinite(future).all()):
        raise UnusableSceneError(f"the focal agent's future is not {horizon} finite positions")
    origin = focal[-1]
    heading = scene.focal_heading
    if heading is None or not math.isfinite(heading):
        heading = _motion_heading(focal[observed])
    cos, sin = math.cos(heading), math.sin(heading)
    rotation = np.array([[cos, sin], [-sin, cos]])  # world -> agent frame

    def local(points: np.ndarray) -> np.ndarray:
        return (points - origin) @ rotation.T

    agents = []
    for index, (history_xy, kind) in enumerate(zip(positions, scene.agent_kinds)):
        valid = ~np.isnan(history_xy).any(axis=1)
        near = valid.any() and np.linalg.norm(history_xy[valid] - origin, axis=1).min() <= radius
        if index > 0 and not near:
            continue
        steps = np.flatnonzero(valid[:-1] & valid[1:])
        if len(steps) == 0:
            continue
        points = local(history_xy)
        attributes = np.stack([steps / history, np.full(len(steps), index == 0), np.full(len(steps), kind == 0),
                               np.full(len(steps), kind == 1)], axis=1)  # fmt: skip
        flags = np.tile(np.eye(1 + len(MAP_KINDS))[0], (len(steps), 1))
        agents.append(np.concatenate([points[steps], points[steps + 1], attributes, flags], axis=1))
    kinds = np.zeros(len(scene.map_polylines), int) if scene.map_kinds is None else scene.map_kinds
    polylines = []
    for index, (polyline, attributes, kind) in enumerate(zip(scene.map_polylines, scene.map_attributes, kinds)):
        polyline = np.asarray(polyline, dtype=np.float64)[:, :2]
        if not np.isfinite(polyline).all():
            raise UnusableSceneError(f"map polyline {index} ({MAP_KINDS[kind]}) has NaN or infinite points")
        if len(polyline) < 2 or np.linalg.norm(polyline - origin, axis=1).min() > radius:
            continue
        points = local(polyline)
        count = len(points) - 1
        polylines.append(np.concatenate([points[:-1], points[1:], np.tile(attributes, (count, 1)),
                                         np.tile(np.eye(1 + len(MAP_KINDS))[1 + kind], (count, 1))], axis=1))  # fmt: skip
    tensors = {
        "agent_vectors": _pad(agents, history - 1),
        "map_vectors": _pad(polylines, max([len(polyline) for polyline in polylines], default=1)),
        "target": torch.from_numpy(local(future) if future is not None else np.zeros((horizon, 2))).float(),
        "origin": torch.tensor(origin, dtype=torch.float64),
        "heading": torch.tensor(heading, dtype=torch.float64),
    }
    metadata = {"scenario_id": scene.scenario_id, "track_id": scene.focal_track_id, "has_target": str(future is not None)}
    return {"tensors": tensors, "metadata": metadata}


def _motion_heading(observed: np.ndarray) -> float:
    """Direction of the last motion of at least 0.1 m (0 for an agent that did not move)."""
    for start in range(len(observed) - 2, -1, -1):
        delta = observed[-1] - observed[start]
        if np.hypot(*delta) >= 0.1:
            return math.atan2(delta[1], delta[0])
    return 0.0


def _pad(polylines: list[np.ndarray], length: int) -> Tensor:
    """Polylines of vectors `[V_i, 10]` -> `[N, length, 11]`, the last channel 1 for real vectors."""
    out = np.zeros((len(polylines), length, VECTOR_DIM + 1), dtype=np.float32)
    for i, vectors in enumerate(polylines):
        out[i, : len(vectors), :VECTOR_DIM] = vectors[:length]
        out[i, : len(vectors), VECTOR_DIM] = 1.0
    return torch.from_numpy(out)


def collate_scenes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Scenes of different agent, map-polyline and vector counts padded into one batch, agents and map
    polylines apart, each to its own longest polyline: `agent_vectors [B, A, Va, 12]` (the focal agent
    first) with `agent_mask [B, A, Va]`, `map_vectors [B, M, Vm, 12]` with `map_mask [B, M, Vm]`,
    and `polyline_mask [B, A + M]` (True for a real polyline: the tokens' order, agents first)."""
    batch: dict[str, Any] = {}
    for group in ("agent", "map"):
        tensors = [s[f"{group}_vectors"] for s in samples]
        padded = torch.zeros(len(samples), max(len(t) for t in tensors), max(t.shape[1] for t in tensors), VECTOR_DIM + 1)
        for i, t in enumerate(tensors):
            padded[i, : len(t), : t.shape[1]] = t
        batch[f"{group}_vectors"], batch[f"{group}_mask"] = padded[..., :VECTOR_DIM], padded[..., VECTOR_DIM] > 0
    batch["polyline_mask"] = torch.cat([batch["agent_mask"].any(dim=2), batch["map_mask"].any(dim=2)], dim=1)
    batch.update(
        target=torch.stack([s["target"] for s in samples]),
        origin=torch.stack([s["origin"] for s in samples]).float(),
        heading=torch.stack([s["heading"] for s in samples]).float(),
        scenario_id=[s["scenario_id"] for s in samples],
        track_id=[s["track_id"] for s in samples],
        has_target=[s["has_target"] for s in samples],
        padding=torch.tensor([s.get("padding", False) for s in samples]),
        unreadable=[],
    )
    if DATASET_INDEX in samples[0]:  # evaluation under DDP: each scene's position in its split
        batch[DATASET_INDEX] = torch.tensor([s[DATASET_INDEX] for s in samples])
    return batch


class CachedScenes(Dataset):
    """The preprocessed scenes of a split, one safetensors file each."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with safe_open(self.files[index], "pt") as file:
            sample: dict[str, Any] = {key: file.get_tensor(key) for key in file.keys()}
            sample.update(file.metadata())
        return sample


class _Preprocess(Dataset):
    """Reads, vectorises and caches one scene per item, in loader workers; returns its status, or the
    `DatasetFileError` of a damaged file every scene needs (raised by the main process)."""

    def __init__(self, module: MotionDataModule, split: str, sources: list[tuple[Path, str]], folder: Path) -> None:
        self.module, self.split, self.sources, self.folder = module, split, sources, folder

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> str | DatasetFileError:
        # One thread per loader worker is PyTorch's own setting; with num_workers=0 this runs in the
        # training process, whose thread count it must leave alone.
        source, key = self.sources[index]
        entry = self.folder / f"{self.module.scene_id(source)}.{key}"
        try:
            scene = self.module.read_scene(source)
            result = vectorize(scene, self.module.history, self.module.horizon, self.module.radius,
                               needs_future=self.split != self.module.test_split)  # fmt: skip
        except DatasetFileError as error:
            return error
        except (UnusableSceneError, OSError, ValueError, KeyError, IndexError) as error:
            write_atomically(entry.with_name(entry.name + ".skipped"), f"{source}: {type(error).__name__}: {error}\n")
            return "skipped"
        with atomic_path(entry.with_name(entry.name + ".safetensors")) as partial:
            save_file({k: v.contiguous() for k, v in result["tensors"].items()}, partial, metadata=result["metadata"])
        return "cached"


class MotionDataModule(BaseDataModule):
    """Base of the Argoverse datamodules: subclasses set `history`, `horizon`, `splits` (train, val,
    test folder names) and `test_split`, and implement `scene_sources(split)` (the scene files, sorted),
    `scene_id(source)` and `read_scene(source) -> Scene`.

    Args:
        root: the dataset folder.
        cache_dir: where preprocessed scenes go (default `root/frozenlm_cache`).
        radius: agents and map polylines within this many metres of the focal agent's last position are kept.
        batch_size, num_workers, pin_memory: see `BaseDataModule`
            (workers also preprocess).
        predict_split: the split `predict` runs on (`val` or `test`).
        max_skipped_fraction: the largest fraction of a split's scenes that may be unusable (skipped,
            named in `*.skipped` files) before the run stops; 0 stops at the first.
    """

    history: int
    horizon: int
    splits: dict[str, str]
    test_split = "test"
    vector_dim = VECTOR_DIM

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | Path | None = None,
        radius: float = 50.0,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        predict_split: str = "test",
        max_skipped_fraction: float = 0.01,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        if not 0 <= max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}.")
        self.max_skipped_fraction = max_skipped_fraction
        self.root, self.radius = Path(root), radius
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"{type(self).__name__}: no dataset folder {self.root}; pass --data.root DIR.")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "frozenlm_cache"
        if predict_split not in ("val", "test"):
            raise ValueError(f"predict_split must be 'val' or 'test', got {predict_split!r}.")
        self.predict_split = predict_split
        self.datasets: dict[str, CachedScenes] = {}
        self.skipped: dict[str, list[str]] = {}

    def scene_sources(self, split: str) -> list[Path]:
        """The files of `split`, one per scene, in the dataset's own layout."""
        raise NotImplementedError

    def scene_id(self, source: Path) -> str:
        """The id of the scene `source` holds."""
        raise NotImplementedError

    def read_scene(self, source: Path) -> Scene:
        """The scene in `source`, read and vectorised; raises `UnusableSceneError` for one that cannot be used."""
        raise NotImplementedError

    def scene_files(self, source: Path) -> list[Path]:
        """Every file `read_scene(source)` reads for this scene alone (shared files, such as a city's
        map, are not keyed: a damaged one stops the run)."""
        return [source]

    def entry_key(self, source: Path) -> str:
        """The cache key of a scene: a hash of its files' sizes and modification times."""
        stamps = "|".join(f"{path.name}:{source_stamp(path)}" for path in self.scene_files(source))
        return hashlib.sha1(stamps.encode()).hexdigest()[:12]

    def cache_parameters(self) -> list:
        """What, beyond the base class's, shapes a cached scene (subclasses' reading options)."""
        return []

    def cache_folder(self, split: str) -> Path:
        """Named after everything that shapes a cached scene, so other settings never reuse it."""
        key = json.dumps([CACHE_VERSION, type(self).__name__, self.history, self.horizon, self.radius,
                          *self.cache_parameters()])  # fmt: skip
        return self.cache_dir / f"{self.splits[split]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def dataset(self, split: str) -> CachedScenes:
        """The cached scenes of `split` (preprocessed first where the cache lacks them)."""
        if split not in self.datasets:
            folder = self.cache_folder(split)
            folder.mkdir(parents=True, exist_ok=True)
            entries = {f"{self.scene_id(s)}.{self.entry_key(s)}": s for s in self.scene_sources(split)}
            done = {p.name.rsplit(".", 1)[0] for pattern in ("*.safetensors", "*.skipped") for p in folder.glob(pattern)}
            todo = [(source, name.rsplit(".", 1)[1]) for name, source in entries.items() if name not in done]
            # Each process preprocesses every world_size-th missing scene (on any number of nodes sharing the
            # cache folder), and all wait for the others before reading.
            share_work(self.trainer, lambda rank, world: self._preprocess(split, todo[rank::world], folder, len(entries), rank, world))
            self._remove_stale_entries(folder, set(entries))
            skipped = sorted(folder / f"{name}.skipped" for name in entries if (folder / f"{name}.skipped").is_file())
            self.skipped[split] = [p.read_text().strip() for p in skipped]
            if skipped:
                print(f"{type(self).__name__} {split}: {len(skipped)} of {len(entries)} scenes skipped as unusable "
                      f"(reasons in {folder}/*.skipped), e.g. {self.skipped[split][0]}")  # fmt: skip
            if len(skipped) > self.max_skipped_fraction * len(entries):
                raise TooManySkippedScenesError(
                    f"{len(skipped)} of {len(entries)} {split} scenes are unusable, more than --data.max_skipped_fraction "
                    f"{self.max_skipped_fraction}: the dataset looks damaged (first: {self.skipped[split][0]}; all reasons "
                    f"in {folder}/*.skipped). Repair those files (a changed file is read again on the next run), or "
                    "raise --data.max_skipped_fraction."
                )
            files = sorted(folder / f"{name}.safetensors" for name in entries if (folder / f"{name}.safetensors").is_file())
            if not files:
                raise DatasetFileError(f"{type(self).__name__}: no usable scene in the {split} split ({len(entries)} read).")
            self.datasets[split] = CachedScenes(files)
        return self.datasets[split]

    def _preprocess(self, split: str, todo: list[tuple[Path, str]], folder: Path, total: int, rank: int, world: int) -> None:
        """Read, vectorise and cache the scenes `todo` (with their entry keys), in loader workers."""
        if not todo:
            return
        where = f" (process {rank} of {world})" if world > 1 else ""
        print(f"{type(self).__name__} {split}: preprocessing {len(todo)} of {total} scenes{where}", flush=True)
        loader = DataLoader(_Preprocess(self, split, todo, folder), batch_size=None, num_workers=self.num_workers)
        description = f"{type(self).__name__} {split}: preprocessing{where}"
        with closing(track(loader, total=len(todo), description=description)) as progress:
            for status in progress:  # closed on an error, so no live progress display is left behind
                if isinstance(status, DatasetFileError):
                    raise status

    @staticmethod
    def _remove_stale_entries(folder: Path, current: set[str]) -> None:
        """Entries of scenes whose files changed since (another key) or that left the split."""
        for pattern in ("*.safetensors", "*.skipped"):
            for path in folder.glob(pattern):
                if path.name.rsplit(".", 1)[0] not in current:
                    path.unlink(missing_ok=True)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))  # the test split has no futures to score

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset(self.predict_split))

    collate_fn = staticmethod(collate_scenes)

    def prediction_file(self, path: Path) -> PredictionFile:
        """Where `predict` writes: `MotionPredictionsCSV` (`.csv`)."""
        return MotionPredictionsCSV(path)


class MotionPredictionsCSV(PredictionFile):
    """One CSV row per scene and mode: scenario_id, track_id, mode, probability, x and y (JSON lists of the
    world-frame positions); written as batches finish. `count` is in scenes."""

    suffixes = (".csv",)

    def start(self) -> None:
        self.writer = csv.writer(self.file)
        self.writer.writerow(["scenario_id", "track_id", "mode", "probability", "x", "y"])

    def write(self, prediction: dict[str, Any]) -> None:
        for scenario, track_id, modes, probabilities in scene_predictions(prediction):
            for mode, (trajectory, probability) in enumerate(zip(modes, probabilities)):
                self.writer.writerow([scenario, track_id, mode, f"{probability:.6f}",
                                      json.dumps(np.round(trajectory[:, 0], 3).tolist()),
                                      json.dumps(np.round(trajectory[:, 1], 3).tolist())])  # fmt: skip
            self.count += 1
        self.file.flush()

    @classmethod
    def merge(cls, parts: list[Path], path: Path) -> int:
        return merge_csv(parts, path, "scenario_id")


def scene_predictions(batch: dict[str, Any]):
    """`(scenario_id, track_id, trajectories [K, T, 2], probabilities [K])` per scene of a predict batch."""
    trajectories = batch["trajectories"].double().cpu().numpy()
    probabilities = batch["probabilities"].double().cpu().numpy()
    yield from zip(batch["scenario_id"], batch["track_id"], trajectories, probabilities)

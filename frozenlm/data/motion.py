"""What the Argoverse datamodules share: agent-centric vectorisation, a resumable on-disk cache of the
preprocessed scenes, padding collation, and prediction files.

Each scene is read once (by the dataset's reader, in loader worker processes, with a progress bar),
turned into VectorNet's vectors in the focal agent's frame (origin at its last observed position, its
heading along +x) and written as ``<scenario_id>.safetensors`` in a cache folder named after the
preprocessing parameters. A scene already there is never redone, so a killed preprocessing run
resumes. A scene that cannot be used (unreadable file, no focal track, NaN positions, too few observed
steps, incomplete future) gets a ``<scenario_id>.skipped`` file with the reason instead: counted,
reported once, never trained on.

Vectors are ``[x_start, y_start, x_end, y_end, a1, a2, a3, a4, is_agent, is_lane]``: for agents, between
consecutive observed positions, with ``a = (timestep / history, is_focal, is_vehicle, is_vulnerable)``;
for lanes, between consecutive centreline points, with the dataset's four lane attributes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import tempfile
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

from frozenlm.data.base import ClassificationDataModule, DatasetNotFoundError

VECTOR_DIM = 10
CACHE_VERSION = 1


class UnusableSceneError(ValueError):
    """A scene that cannot be trained or evaluated on; the message says why."""


@dataclass
class Scene:
    """One scenario as read from disk, in world coordinates.

    ``agent_positions [A, history, 2]`` (NaN where unobserved) has the focal agent first;
    ``agent_kinds [A]`` is 0 vehicle, 1 vulnerable road user, 2 other; ``future [horizon, 2]`` is the
    focal agent's (None in a test split); ``lanes`` are centrelines ``[P, 2]`` with
    ``lane_attributes [L, 4]``; ``focal_heading`` (radians) when the dataset records it, else it is
    taken from the focal agent's last motion.
    """

    scenario_id: str
    focal_track_id: str
    agent_positions: np.ndarray
    agent_kinds: np.ndarray
    future: np.ndarray | None
    lanes: list[np.ndarray] = field(default_factory=list)
    lane_attributes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    focal_heading: float | None = None


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
        flags = np.tile([1.0, 0.0], (len(steps), 1))
        agents.append(np.concatenate([points[steps], points[steps + 1], attributes, flags], axis=1))
    lanes = []
    for centreline, attributes in zip(scene.lanes, scene.lane_attributes):
        centreline = np.asarray(centreline, dtype=np.float64)[:, :2]
        if len(centreline) < 2 or np.linalg.norm(centreline - origin, axis=1).min() > radius:
            continue
        points = local(centreline)
        count = len(points) - 1
        lanes.append(np.concatenate([points[:-1], points[1:], np.tile(attributes, (count, 1)),
                                     np.tile([0.0, 1.0], (count, 1))], axis=1))  # fmt: skip
    tensors = {
        "agent_vectors": _pad(agents, history - 1),
        "lane_vectors": _pad(lanes, max([len(lane) for lane in lanes], default=1)),
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
    """Polylines of vectors ``[V_i, 10]`` -> ``[N, length, 11]``, the last channel 1 for real vectors."""
    out = np.zeros((len(polylines), length, VECTOR_DIM + 1), dtype=np.float32)
    for i, vectors in enumerate(polylines):
        out[i, : len(vectors), :VECTOR_DIM] = vectors[:length]
        out[i, : len(vectors), VECTOR_DIM] = 1.0
    return torch.from_numpy(out)


def collate_scenes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Scenes of different agent, lane and vector counts padded into one batch: ``polylines [B, N, V,
    10]`` (agents, the focal one first, then lanes), ``vector_mask [B, N, V]``, ``polyline_mask [B, N]``."""
    agents = max(len(s["agent_vectors"]) for s in samples)
    lanes = max(len(s["lane_vectors"]) for s in samples)
    length = max(max(s["agent_vectors"].shape[1], s["lane_vectors"].shape[1]) for s in samples)
    padded = torch.zeros(len(samples), agents + lanes, length, VECTOR_DIM + 1)
    for i, sample in enumerate(samples):
        a, l = sample["agent_vectors"], sample["lane_vectors"]
        padded[i, : len(a), : a.shape[1]] = a
        padded[i, agents : agents + len(l), : l.shape[1]] = l
    vector_mask = padded[..., VECTOR_DIM] > 0
    batch = {
        "polylines": padded[..., :VECTOR_DIM],
        "vector_mask": vector_mask,
        "polyline_mask": vector_mask.any(dim=2),
        "target": torch.stack([s["target"] for s in samples]),
        "origin": torch.stack([s["origin"] for s in samples]).float(),
        "heading": torch.stack([s["heading"] for s in samples]).float(),
        "scenario_id": [s["scenario_id"] for s in samples],
        "track_id": [s["track_id"] for s in samples],
        "has_target": [s["has_target"] for s in samples],
        "unreadable": [],
    }
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
    """Reads, vectorises and caches one scene per item, in loader workers; returns its status."""

    def __init__(self, module: MotionDataModule, split: str, sources: list[Path], folder: Path) -> None:
        self.module, self.split, self.sources, self.folder = module, split, sources, folder

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> str:
        torch.set_num_threads(1)
        source = self.sources[index]
        scene_id = self.module.scene_id(source)
        try:
            scene = self.module.read_scene(source)
            result = vectorize(scene, self.module.history, self.module.horizon, self.module.radius,
                               needs_future=self.split != self.module.test_split)  # fmt: skip
        except (UnusableSceneError, OSError, ValueError, KeyError, IndexError) as error:
            _write_atomically(self.folder / f"{scene_id}.skipped", f"{source}: {type(error).__name__}: {error}\n".encode())
            return "skipped"
        path = self.folder / f"{scene_id}.safetensors"
        descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        os.close(descriptor)
        save_file({k: v.contiguous() for k, v in result["tensors"].items()}, partial, metadata=result["metadata"])
        os.replace(partial, path)
        return "cached"


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(partial, path)


class MotionDataModule(ClassificationDataModule):
    """Base of the Argoverse datamodules: subclasses set ``history``, ``horizon``, ``splits`` (train, val,
    test folder names) and ``test_split``, and implement ``scene_sources(split)`` (the scene files, sorted),
    ``scene_id(source)`` and ``read_scene(source) -> Scene``.

    Args:
        root: the dataset folder.
        cache_dir: where preprocessed scenes go (default ``root/frozenlm_cache``).
        radius: agents and lanes within this many metres of the focal agent's last position are kept.
        batch_size, num_workers, pin_memory: see :class:`frozenlm.data.base.ClassificationDataModule`
            (workers also preprocess).
        predict_split: the split ``predict`` runs on (``val`` or ``test``).
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
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
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
        raise NotImplementedError

    def scene_id(self, source: Path) -> str:
        raise NotImplementedError

    def read_scene(self, source: Path) -> Scene:
        raise NotImplementedError

    def cache_folder(self, split: str) -> Path:
        """Named after everything that shapes a cached scene, so other settings never reuse it."""
        key = json.dumps([CACHE_VERSION, type(self).__name__, self.history, self.horizon, self.radius])
        return self.cache_dir / f"{self.splits[split]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def dataset(self, split: str) -> CachedScenes:
        if split not in self.datasets:
            folder = self.cache_folder(split)
            folder.mkdir(parents=True, exist_ok=True)
            sources = self.scene_sources(split)
            done = {p.stem for p in folder.glob("*.safetensors")} | {p.stem for p in folder.glob("*.skipped")}
            todo = [s for s in sources if self.scene_id(s) not in done]
            if todo:
                loader = DataLoader(_Preprocess(self, split, todo, folder), batch_size=None, num_workers=self.num_workers)
                description = f"{type(self).__name__} {split}: preprocessing {len(todo)} of {len(sources)} scenes"
                for _ in track(loader, total=len(todo), description=description):
                    pass
            ids = {self.scene_id(s) for s in sources}
            skipped = sorted(p for p in folder.glob("*.skipped") if p.stem in ids)
            self.skipped[split] = [p.read_text().strip() for p in skipped]
            if skipped:
                print(f"{type(self).__name__} {split}: {len(skipped)} of {len(sources)} scenes skipped as unusable "
                      f"(reasons in {folder}/*.skipped), e.g. {self.skipped[split][0]}")  # fmt: skip
            files = sorted(p for p in folder.glob("*.safetensors") if p.stem in ids)
            if not files:
                raise ValueError(f"{type(self).__name__}: no usable scene in the {split} split ({len(sources)} read).")
            self.datasets[split] = CachedScenes(files)
        return self.datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"))  # the test split has no futures to score

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.predict_split))

    collate_fn = staticmethod(collate_scenes)

    def write_predictions(self, predictions: list[dict[str, Any]], path: Path) -> int:
        """One CSV row per scene and mode: scenario_id, track_id, mode, probability, x and y (JSON lists)."""
        if path.suffix != ".csv":
            raise ValueError(f"{type(self).__name__} writes predictions as .csv, got {path}")
        rows = 0
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["scenario_id", "track_id", "mode", "probability", "x", "y"])
            for batch in predictions:
                for scenario, track_id, modes, probabilities in scene_predictions(batch):
                    for mode, (trajectory, probability) in enumerate(zip(modes, probabilities)):
                        writer.writerow([scenario, track_id, mode, f"{probability:.6f}",
                                         json.dumps(np.round(trajectory[:, 0], 3).tolist()),
                                         json.dumps(np.round(trajectory[:, 1], 3).tolist())])  # fmt: skip
                    rows += 1
        return rows


def scene_predictions(batch: dict[str, Any]):
    """``(scenario_id, track_id, trajectories [K, T, 2], probabilities [K])`` per scene of a predict batch."""
    trajectories = batch["trajectories"].double().cpu().numpy()
    probabilities = batch["probabilities"].double().cpu().numpy()
    yield from zip(batch["scenario_id"], batch["track_id"], trajectories, probabilities)

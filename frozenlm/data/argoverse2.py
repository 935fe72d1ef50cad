"""Argoverse 2 motion forecasting (Wilson et al., NeurIPS 2021 Datasets), read with the `av2` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from frozenlm.data.base import DatasetNotFoundError
from frozenlm.data.motion import MAP_KINDS, MotionDataModule, Scene, resample, scene_predictions
from frozenlm.files import atomic_path
from frozenlm.predictions import PredictionFile, dataset_order

DOWNLOAD_HINT = (
    "Download the Argoverse 2 motion forecasting dataset (https://www.argoverse.org/av2.html#download-link) "
    "and pass --data.root <folder holding train/, val/, test/>."
)
VEHICLES = {"vehicle", "bus"}
VULNERABLE = {"pedestrian", "cyclist", "motorcyclist"}
LANE_TYPES = ("VEHICLE", "BIKE", "BUS")
CENTRELINE, BOUNDARY, CROSSWALK = (MAP_KINDS.index(k) for k in ("centreline", "boundary", "crosswalk"))


def _av2():
    try:
        from av2.datasets.motion_forecasting import scenario_serialization
        from av2.map.map_api import ArgoverseStaticMap
    except ImportError as error:
        raise ImportError("Argoverse 2 needs the av2 package: pip install 'frozenlm[motion]'.") from error
    return scenario_serialization, ArgoverseStaticMap


class Argoverse2DataModule(MotionDataModule):
    """Argoverse 2: 10 Hz scenarios of 50 observed + 60 future steps; the focal track is the target.

    On disk (the official layout):

        root/{train,val,test}/<scenario_id>/scenario_<scenario_id>.parquet
        root/{train,val,test}/<scenario_id>/log_map_archive_<...>.json

    Map polylines: the lane segments of the scenario's map within `radius` (av2's
    `get_nearby_lane_segments`), as 10-point centrelines (`get_lane_segment_centerline`) with
    attributes `(is_intersection, is_vehicle_lane, is_bike_lane, is_bus_lane)`; with `lane_boundaries`
    also each lane's left and right boundary (resampled to 10 points, its lane's attributes), and with
    `crosswalks` both edges of every pedestrian crossing within `radius`: the map elements that
    Argoverse 2 models (e.g. QCNet) read beside centrelines. `predict` writes the challenge's submission parquet
    (`av2`'s `ChallengeSubmission`). Needs `av2` (extra `motion`). See
    [`MotionDataModule`][frozenlm.data.motion.MotionDataModule] for the arguments and the cache.

    Examples:
        >>> from frozenlm.data import Argoverse2DataModule
        >>> datamodule = Argoverse2DataModule(root="data/argoverse2", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/argoverse2_vectornet.yaml`); `--data.root` points it at your copy.
    """

    history, horizon = 50, 60
    splits = {"train": "train", "val": "val", "test": "test"}

    def __init__(self, root: str | Path, lane_boundaries: bool = False, crosswalks: bool = False, **kwargs) -> None:
        """Args: `lane_boundaries`, `crosswalks`: add those map polylines (above); others: see
        [`MotionDataModule`][frozenlm.data.motion.MotionDataModule]."""
        super().__init__(root, **kwargs)
        self.lane_boundaries, self.crosswalks = lane_boundaries, crosswalks

    def cache_parameters(self) -> list:
        return [self.lane_boundaries, self.crosswalks]

    def scene_sources(self, split: str) -> list[Path]:
        folder = self.root / self.splits[split]
        if not folder.is_dir():
            raise DatasetNotFoundError(f"Argoverse2DataModule: no {folder}. {DOWNLOAD_HINT}")
        sources = sorted(folder.glob("*/scenario_*.parquet"))
        if not sources:
            raise DatasetNotFoundError(
                f"Argoverse2DataModule: no {self.splits[split]}/<id>/scenario_<id>.parquet under {self.root}. {DOWNLOAD_HINT}"
            )
        return sources

    def scene_id(self, source: Path) -> str:
        return source.parent.name

    def scene_files(self, source: Path) -> list[Path]:
        return [source, *sorted(source.parent.glob("log_map_archive_*.json"))]

    def read_scene(self, source: Path) -> Scene:
        serialization, static_map_class = _av2()
        scenario = serialization.load_argoverse_scenario_parquet(source)
        maps = self.scene_files(source)[1:]
        if not maps:
            raise FileNotFoundError(f"no log_map_archive_*.json beside {source}")
        tracks = {track.track_id: track for track in scenario.tracks}
        if scenario.focal_track_id not in tracks:
            raise KeyError(f"the focal track {scenario.focal_track_id} is not among the scenario's tracks")
        order = [scenario.focal_track_id] + [t for t in tracks if t != scenario.focal_track_id]
        positions = np.full((len(order), self.history, 2), np.nan)
        kinds_of_agents = np.full(len(order), 2)
        future = np.full((self.horizon, 2), np.nan)
        heading = None
        for row, track_id in enumerate(order):
            track = tracks[track_id]
            kind = track.object_type.value
            kinds_of_agents[row] = 0 if kind in VEHICLES else 1 if kind in VULNERABLE else 2
            for state in track.object_states:
                if state.timestep < self.history:
                    positions[row, state.timestep] = state.position
                    if row == 0 and state.timestep == self.history - 1:
                        heading = float(state.heading)
                elif row == 0 and state.timestep < self.history + self.horizon:
                    future[state.timestep - self.history] = state.position
        static_map = static_map_class.from_json(maps[0])
        focal = positions[0][~np.isnan(positions[0]).any(axis=1)]
        centre = focal[-1] if len(focal) else np.zeros(2)
        elements = []  # (points [P, 2], attributes, kind)
        for lane in static_map.get_nearby_lane_segments(centre, self.radius):
            lane_type = lane.lane_type.value
            lane_attributes = [float(lane.is_intersection), *(float(lane_type == t) for t in LANE_TYPES)]
            elements.append((static_map.get_lane_segment_centerline(lane.id)[:, :2], lane_attributes, CENTRELINE))
            if self.lane_boundaries:
                boundaries = (lane.left_lane_boundary, lane.right_lane_boundary)
                elements += [(resample(b.xyz[:, :2]), lane_attributes, BOUNDARY) for b in boundaries]
        if self.crosswalks:
            edges = [edge for crossing in static_map.vector_pedestrian_crossings.values() for edge in crossing.get_edges_2d()]
            elements += [(resample(e), [0.0] * 4, CROSSWALK) for e in edges if np.linalg.norm(e - centre, axis=1).min() <= self.radius]
        polylines, attributes, kinds = (list(column) for column in zip(*elements)) if elements else ([], [], [])
        return Scene(
            scenario_id=scenario.scenario_id, focal_track_id=scenario.focal_track_id, agent_positions=positions,
            agent_kinds=kinds_of_agents, future=None if np.isnan(future).all() else future, map_polylines=polylines,
            map_attributes=np.asarray(attributes, dtype=np.float32).reshape(-1, 4), map_kinds=np.asarray(kinds, int),
            focal_heading=heading,
        )  # fmt: skip

    def prediction_file(self, path: Path) -> PredictionFile:
        """`.parquet`: the Argoverse 2 challenge submission (`AV2Submission`); `.csv`: the CSV
        of [`MotionDataModule`][frozenlm.data.MotionDataModule]."""
        return super().prediction_file(path) if path.suffix == ".csv" else AV2Submission(path)


class AV2Submission(PredictionFile):
    """The Argoverse 2 challenge's submission parquet, written by `av2`'s `ChallengeSubmission` (one
    table, so it is written whole at the end, atomically; the directory is checked before the first batch).
    Mode probabilities are renormalised to sum to 1, as the challenge requires."""

    suffixes = (".parquet",)
    streamed = False

    def start(self) -> None:
        self.scenes: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def write(self, prediction: dict[str, Any]) -> None:
        for scenario, track_id, modes, probs in scene_predictions(prediction):
            self.scenes[scenario] = (probs / probs.sum(), {track_id: modes})
        self.count = len(self.scenes)

    def close(self) -> int:
        from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

        with atomic_path(self.path) as partial:
            ChallengeSubmission(self.scenes).to_parquet(partial)
        return self.count

    @classmethod
    def merge(cls, parts: list[Path], path: Path) -> int:
        from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

        shares = [list(ChallengeSubmission.from_parquet(part).predictions.items()) for part in parts]
        scenes = dict(dataset_order(shares, parts))
        with atomic_path(path) as partial:
            ChallengeSubmission(scenes).to_parquet(partial)
        return len(scenes)

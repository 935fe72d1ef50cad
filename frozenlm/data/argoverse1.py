"""Argoverse 1 motion forecasting (Chang et al., CVPR 2019), read directly from its two documented formats.

The official argoverse-api is not published as an installable package and pins ancient dependencies,
so the trajectory CSVs and the vector-map XML are parsed here with the standard library.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ElementTree
from functools import lru_cache
from pathlib import Path

import numpy as np

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.motion import MAP_POINTS, MotionDataModule, Scene, resample

DOWNLOAD_HINT = (
    "Download the Argoverse 1.1 motion forecasting data and HD maps (https://www.argoverse.org/av1.html) and pass "
    "--data.root <folder holding train/data, val/data, test_obs/data and map_files>."
)
@lru_cache(maxsize=4)
def read_vector_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A city's lanes from `pruned_argoverse_<CITY>_<id>_vector_map.xml`: centrelines `[L, 10, 2]`
    (resampled by arc length) and attributes `[L, 4]` = (is_intersection, turns left, turns right,
    has_traffic_control)."""
    try:
        root = ElementTree.parse(path).getroot()
        nodes = {node.get("id"): (float(node.get("x")), float(node.get("y"))) for node in root.iter("node")}
        ways = [(way, [nodes[nd.get("ref")] for nd in way.iter("nd")]) for way in root.iter("way")]
    except (ElementTree.ParseError, OSError, KeyError, TypeError, ValueError) as error:
        raise DatasetFileError(
            f"{path} is not a readable Argoverse vector map ({type(error).__name__}: {error}); every scene of its "
            f"city needs it. Re-extract it from the HD map download. {DOWNLOAD_HINT}"
        ) from None
    centrelines, attributes = [], []
    for way, points in ways:
        tags = {tag.get("k"): tag.get("v") for tag in way.iter("tag")}
        points = np.array(points)
        if len(points) < 2:
            continue
        centrelines.append(resample(points))
        turn = tags.get("turn_direction", "NONE")
        attributes.append([tags.get("is_intersection") == "True", turn == "LEFT", turn == "RIGHT",
                           tags.get("has_traffic_control") == "True"])  # fmt: skip
    return np.asarray(centrelines).reshape(-1, MAP_POINTS, 2), np.asarray(attributes, np.float32).reshape(-1, 4)


class Argoverse1DataModule(MotionDataModule):
    """Argoverse 1.1: 5 s sequences at 10 Hz, 20 observed + 30 future steps; the AGENT track is the target.

    On disk (the official layout):

        root/{train,val,test_obs}/data/<sequence>.csv       TIMESTAMP,TRACK_ID,OBJECT_TYPE,X,Y,CITY_NAME
        root/map_files/pruned_argoverse_{PIT_10314,MIA_10316}_vector_map.xml

    OBJECT_TYPE is AGENT (one per sequence), AV or OTHERS; test_obs has the 20 observed steps only.
    Lanes are the map's centrelines (`<way>` of `<nd ref>` nodes) within `radius`, resampled to
    10 points, with attributes `(is_intersection, turn LEFT, turn RIGHT, has_traffic_control)`. See
    [`MotionDataModule`][frozenlm.data.motion.MotionDataModule] for the arguments and the cache.

    Args:
        map_dir: the folder of the vector maps (default `root/map_files`).

    Examples:
        >>> from frozenlm.data import Argoverse1DataModule
        >>> datamodule = Argoverse1DataModule(root="data/argoverse1", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/argoverse1_vectornet.yaml`); `--data.root` points it at your copy.
    """

    history, horizon = 20, 30
    splits = {"train": "train", "val": "val", "test": "test_obs"}

    def __init__(self, root: str | Path, map_dir: str | Path | None = None, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.map_dir = Path(map_dir) if map_dir is not None else self.root / "map_files"
        if not list(self.map_dir.glob("pruned_argoverse_*_vector_map.xml")):
            raise DatasetNotFoundError(
                f"Argoverse1DataModule: no pruned_argoverse_<CITY>_<id>_vector_map.xml in {self.map_dir} "
                f"(--data.map_dir for another folder). {DOWNLOAD_HINT}"
            )

    def scene_sources(self, split: str) -> list[Path]:
        folder = self.root / self.splits[split] / "data"
        sources = sorted(folder.glob("*.csv"))
        if not sources:
            raise DatasetNotFoundError(f"Argoverse1DataModule: no {self.splits[split]}/data/*.csv under {self.root}. {DOWNLOAD_HINT}")
        return sources

    def scene_id(self, source: Path) -> str:
        return source.stem

    def map_path(self, city: str) -> Path:
        """The vector map file of `city`."""
        found = sorted(self.map_dir.glob(f"pruned_argoverse_{city}_*_vector_map.xml"))
        if not found:
            raise FileNotFoundError(f"no vector map of city {city!r} in {self.map_dir}")
        return found[0]

    def read_scene(self, source: Path) -> Scene:
        with source.open(newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            raise ValueError("no rows")
        timestamps = sorted({float(row["TIMESTAMP"]) for row in rows})
        step = {t: i for i, t in enumerate(timestamps)}
        agents = [row["TRACK_ID"] for row in rows if row["OBJECT_TYPE"] == "AGENT"]
        if not agents:
            raise KeyError("no AGENT track")
        focal = agents[0]
        order = [focal] + sorted({row["TRACK_ID"] for row in rows} - {focal})
        index = {track: i for i, track in enumerate(order)}
        total = self.history + self.horizon
        positions = np.full((len(order), total, 2), np.nan)
        kinds = np.full(len(order), 2)
        for row in rows:
            t = step[float(row["TIMESTAMP"])]
            if t < total:
                positions[index[row["TRACK_ID"]], t] = (float(row["X"]), float(row["Y"]))
            if row["OBJECT_TYPE"] in ("AGENT", "AV"):
                kinds[index[row["TRACK_ID"]]] = 0  # the AGENT and the AV are vehicles
        future = positions[0, self.history :]
        centrelines, attributes = read_vector_map(self.map_path(rows[0]["CITY_NAME"]))
        observed = positions[0, : self.history][~np.isnan(positions[0, : self.history]).any(axis=1)]
        if len(observed):  # a city has tens of thousands of lanes: keep those near the agent at once
            near = np.linalg.norm(centrelines - observed[-1], axis=-1).min(axis=1) <= self.radius
            centrelines, attributes = centrelines[near], attributes[near]
        return Scene(
            scenario_id=source.stem, focal_track_id=focal, agent_positions=positions[:, : self.history],
            agent_kinds=kinds, future=future if len(timestamps) > self.history else None,
            map_polylines=list(centrelines), map_attributes=attributes,
        )  # fmt: skip

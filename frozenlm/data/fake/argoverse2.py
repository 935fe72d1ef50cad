"""Writes tiny fake Argoverse 2 motion-forecasting scenarios in the official layout, with the av2 package's
own serializer: root/{train,val,test}/<id>/scenario_<id>.parquet and log_map_archive_<id>.json (a few
lane segments along the road). A focal vehicle drives a curve (its future continues it), an AV and a
pedestrian move nearby; the test split has the 50 observed steps only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from av2.datasets.motion_forecasting.data_schema import (
    ArgoverseScenario,
    ObjectState,
    ObjectType,
    Track,
    TrackCategory,
)
from av2.datasets.motion_forecasting.scenario_serialization import serialize_argoverse_scenario_parquet

OBSERVED, TOTAL = 50, 110


def path_of(origin: np.ndarray, heading: float, speed: float, turn: float, steps: int) -> np.ndarray:
    """`[steps, 2]` positions at 10 Hz of a vehicle turning at `turn` rad/s."""
    headings = heading + turn * np.arange(steps) * 0.1
    # Rounded to 1e-6: numpy's SIMD cos/sin differ in the last bit between CPUs (AVX-512 or not), and the
    # files are to be the same bytes on any machine.
    step = np.round(np.stack([np.cos(headings), np.sin(headings)], 1), 6)
    return origin + np.cumsum(speed * 0.1 * step, axis=0)


def track(track_id: str, positions: np.ndarray, kind: ObjectType, category: TrackCategory, steps: int) -> Track:
    velocity = np.gradient(positions, axis=0) * 10
    states = [
        ObjectState(observed=t < OBSERVED, timestep=t, position=(float(p[0]), float(p[1])),
                    heading=round(float(np.arctan2(v[1], v[0])), 6), velocity=(float(v[0]), float(v[1])))
        for t, (p, v) in enumerate(zip(positions[:steps], velocity[:steps]))
    ]  # fmt: skip
    return Track(track_id=track_id, object_states=states, object_type=kind, category=category)


def lane_map(points: np.ndarray) -> dict:
    """The map JSON: lane segments of 10 m along `points`, boundaries 1.8 m either side, and a crosswalk
    (two 12 m edges, 3 m apart) across them every 30 m."""
    lanes = {}
    for i in range(0, len(points) - 10, 10):
        centre = points[i : i + 11]
        direction = np.gradient(centre, axis=0)
        normal = np.stack([-direction[:, 1], direction[:, 0]], 1) / np.linalg.norm(direction, axis=1, keepdims=True)

        def boundary(side: float) -> list[dict]:
            return [{"x": float(x), "y": float(y), "z": 0.0} for x, y in centre + side * 1.8 * normal]

        lanes[str(i)] = {
            "id": i, "lane_type": "VEHICLE" if i % 30 else "BUS", "is_intersection": i % 20 == 0,
            "left_lane_boundary": boundary(1.0), "right_lane_boundary": boundary(-1.0),
            "left_lane_mark_type": "NONE", "right_lane_mark_type": "NONE",
            "left_neighbor_id": None, "right_neighbor_id": None, "predecessors": [], "successors": [],
        }  # fmt: skip
    crossings = {}
    for i in range(5, len(points) - 1, 30):  # a crosswalk across the road every 30 m, 3 m wide
        direction = (points[i + 1] - points[i]) / np.linalg.norm(points[i + 1] - points[i])
        normal = np.array([-direction[1], direction[0]])

        def edge(offset: float) -> list[dict]:
            return [{"x": float(x), "y": float(y), "z": 0.0} for x, y in (points[i] + offset * direction + s * 6 * normal for s in (-1, 1))]

        crossings[str(1000 + i)] = {"id": 1000 + i, "edge1": edge(-1.5), "edge2": edge(1.5)}
    return {"drivable_areas": {}, "lane_segments": lanes, "pedestrian_crossings": crossings}


def scenario(scenario_id: str, rng: np.random.Generator, steps: int) -> tuple[ArgoverseScenario, dict]:
    origin = np.array([2500.0, -1300.0]) + rng.normal(size=2) * 50  # city coordinates, far from 0
    heading, turn, speed = rng.uniform(-np.pi, np.pi), rng.uniform(-0.15, 0.15), rng.uniform(6, 12)
    focal = path_of(origin, heading, speed, turn, TOTAL)
    av = path_of(origin + rng.normal(size=2) * 8, heading, 8.0, 0.0, TOTAL)
    walker = origin + rng.normal(size=2) * 10 + np.cumsum(rng.normal(size=(TOTAL, 2)) * 0.1, axis=0)
    tracks = [
        track("focal", focal, ObjectType.VEHICLE, TrackCategory.FOCAL_TRACK, steps),
        track("AV", av, ObjectType.VEHICLE, TrackCategory.UNSCORED_TRACK, steps),
        track("walker", walker, ObjectType.PEDESTRIAN, TrackCategory.TRACK_FRAGMENT, min(steps, 40)),
    ]
    road = path_of(origin, heading, speed, turn, 2 * TOTAL)  # the lane the focal vehicle follows
    data = ArgoverseScenario(
        scenario_id=scenario_id, timestamps_ns=np.arange(steps, dtype=np.int64) * 100_000_000, tracks=tracks,
        focal_track_id="focal", city_name="austin", map_id=None, slice_id=None,
    )  # fmt: skip
    return data, lane_map(road)


def write(root: Path, scenes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write `scenes` (split -> count; default train 8, val 4, test 2) under `root`; returns root."""
    rng = np.random.default_rng(seed)
    for split, count in (scenes or {"train": 8, "val": 4, "test": 2}).items():
        for i in range(count):
            scenario_id = f"{split}-{i:04d}"
            data, map_json = scenario(scenario_id, rng, OBSERVED if split == "test" else TOTAL)
            folder = Path(root) / split / scenario_id
            folder.mkdir(parents=True, exist_ok=True)
            serialize_argoverse_scenario_parquet(folder / f"scenario_{scenario_id}.parquet", data)
            (folder / f"log_map_archive_{scenario_id}.json").write_text(json.dumps(map_json))
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write train/, val/ and test/ into")
    print(write(parser.parse_args().root))

"""Writes a tiny fake Argoverse 1.1 motion-forecasting set in the official layout:
root/{train,val,test_obs}/data/<sequence>.csv (TIMESTAMP,TRACK_ID,OBJECT_TYPE,X,Y,CITY_NAME; 50 steps at
10 Hz, 20 in test_obs) and root/map_files/pruned_argoverse_{PIT_10314,MIA_10316}_vector_map.xml with
<node id x y> and <way lane_id> elements (tags and <nd ref>), lanes along the agents' roads."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

CITIES = {"PIT": "PIT_10314", "MIA": "MIA_10316"}


def drive(origin: np.ndarray, heading: float, speed: float, turn: float, steps: int) -> np.ndarray:
    headings = heading + turn * np.arange(steps) * 0.1
    return origin + np.cumsum(speed * 0.1 * np.stack([np.cos(headings), np.sin(headings)], 1), axis=0)


def write_map(path: Path, roads: list[np.ndarray]) -> None:
    """One way per 8 m of each road, 5 nodes each (real lanes have ~10), with the real tags."""
    lines, node = ["<?xml version='1.0' encoding='UTF-8'?>", "<ArgoverseVectorMap>"], 0
    ways = []
    for r, road in enumerate(roads):
        for start in range(0, len(road) - 8, 8):
            refs = []
            for x, y in road[start : start + 9 : 2]:
                lines.append(f'<node id="{node}" x="{x:.3f}" y="{y:.3f}" />')
                refs.append(node)
                node += 1
            turn = ("LEFT", "RIGHT", "NONE")[(start // 8) % 3]
            tags = [("has_traffic_control", str(start % 16 == 0)), ("turn_direction", turn),
                    ("is_intersection", str(start % 24 == 0)), ("l_neighbor_id", "None"), ("r_neighbor_id", "None")]  # fmt: skip
            body = "".join(f'<tag k="{k}" v="{v}" />' for k, v in tags) + "".join(f'<nd ref="{i}" />' for i in refs)
            ways.append(f'<way lane_id="{r * 1000 + start}">{body}</way>')
    path.write_text("\n".join(lines + ways + ["</ArgoverseVectorMap>"]) + "\n")


def write(root: Path, sequences: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write `sequences` (split -> count; default train 8, val 4, test_obs 2) and both cities' maps."""
    rng = np.random.default_rng(seed)
    roads = {city: [] for city in CITIES}
    number = 1
    for split, count in (sequences or {"train": 8, "val": 4, "test_obs": 2}).items():
        folder = Path(root) / split / "data"
        folder.mkdir(parents=True, exist_ok=True)
        steps = 20 if split == "test_obs" else 50
        for _ in range(count):
            city = list(CITIES)[number % 2]
            origin = np.array([2000.0, 1500.0] if city == "PIT" else [-500.0, 3000.0]) + rng.normal(size=2) * 100
            heading, turn, speed = rng.uniform(-np.pi, np.pi), rng.uniform(-0.1, 0.1), rng.uniform(5, 12)
            agent = drive(origin, heading, speed, turn, 50)
            roads[city].append(drive(origin, heading, speed, turn, 120))  # the lane the agent follows
            tracks = {
                "00000000-0000-0000-0000-00000000agent": ("AGENT", agent),
                "00000000-0000-0000-0000-0000000000av": ("AV", drive(origin + rng.normal(size=2) * 6, heading, 9.0, 0.0, 50)),
                "00000000-0000-0000-0000-000000others": ("OTHERS", origin + rng.normal(size=2) * 15 + np.zeros((50, 2))),
            }  # fmt: skip
            timestamps = 315969600.0 + np.arange(steps) * 0.1
            with (folder / f"{number}.csv").open("w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["TIMESTAMP", "TRACK_ID", "OBJECT_TYPE", "X", "Y", "CITY_NAME"])
                for t, timestamp in enumerate(timestamps):
                    for track_id, (kind, positions) in tracks.items():
                        if kind == "OTHERS" and t % 7 == 3:
                            continue  # other tracks have gaps, as real ones
                        writer.writerow([f"{timestamp:.6f}", track_id, kind, f"{positions[t, 0]:.4f}",
                                         f"{positions[t, 1]:.4f}", city])  # fmt: skip
            number += 1
    (Path(root) / "map_files").mkdir(parents=True, exist_ok=True)
    for city, map_id in CITIES.items():
        write_map(Path(root) / "map_files" / f"pruned_argoverse_{map_id}_vector_map.xml", roads[city])
    return Path(root)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write train/, val/, test_obs/ and map_files/ into")
    print(write(parser.parse_args().root))

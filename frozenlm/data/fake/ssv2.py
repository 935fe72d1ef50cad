"""Writes a tiny fake Something-Something-v2 in the official layout: VP9 .webm videos of a square moving
in one of four directions (the class), labels/labels.json, labels/train.json and labels/validation.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import av
import numpy as np

# Class name (a labels.json key) -> the template the annotations use, and the square's step per frame.
CLASSES = {
    "Pushing something from left to right": ("Pushing [something] from left to right", (0, 1)),
    "Pushing something from right to left": ("Pushing [something] from right to left", (0, -1)),
    "Moving something up": ("Moving [something] up", (-1, 0)),
    "Moving something down": ("Moving [something] down", (1, 0)),
}
HEIGHT, WIDTH, SQUARE, STEP = 32, 48, 10, 3


def moving_square(
    direction: tuple[int, int], frames: int, rng: np.random.Generator, size: tuple[int, int] = (HEIGHT, WIDTH)
) -> np.ndarray:
    """`[frames, H, W, 3]` uint8: a coloured square crossing a dark background in `direction`."""
    height, width = size
    video = np.full((frames, height, width, 3), 20, dtype=np.uint8)
    colour = rng.integers(120, 256, 3)
    travel = STEP * (frames - 1)
    y0 = height // 2 - SQUARE // 2 - direction[0] * travel // 2
    x0 = width // 2 - SQUARE // 2 - direction[1] * travel // 2
    for t in range(frames):
        y, x = y0 + direction[0] * STEP * t, x0 + direction[1] * STEP * t
        video[t, max(y, 0) : max(y + SQUARE, 0), max(x, 0) : max(x + SQUARE, 0)] = colour
    return video


def write_webm(path: Path, video: np.ndarray, fps: int = 12) -> Path:
    """Encode `[T, H, W, 3]` uint8 frames as VP9 in a WebM container, as SSv2 ships them."""
    with av.open(str(path), "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write(
    root: Path, per_class: dict[str, int] | None = None, frames: int = 8, seed: int = 0, size: tuple[int, int] = (HEIGHT, WIDTH)
) -> Path:
    """Write the dataset under `root` (`per_class`: videos per class of each split; `size`: frame
    height and width, SSv2's own are 240 px high); returns root."""
    per_class = per_class or {"train": 4, "validation": 2}
    rng = np.random.default_rng(seed)
    root = Path(root)
    videos, labels = root / "20bn-something-something-v2", root / "labels"
    videos.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "labels.json").write_text(json.dumps({name: str(i) for i, name in enumerate(CLASSES)}, indent=1))
    next_id = 1
    for split, count in per_class.items():
        entries = []
        for _ in range(count):
            for template, direction in CLASSES.values():
                write_webm(videos / f"{next_id}.webm", moving_square(direction, frames, rng, size))
                placeholder = "a box"
                entries.append({
                    "id": str(next_id),
                    "label": template.replace("[something]", placeholder).lower(),
                    "template": template,
                    "placeholders": [placeholder],
                })  # fmt: skip
                next_id += 1
        (labels / f"{split}.json").write_text(json.dumps(entries, indent=1))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the dataset into")
    print(write(parser.parse_args().root))

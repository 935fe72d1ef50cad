"""Writes a tiny fake Flickr30k in its usual layout: flickr30k-images/<id>.jpg (one coloured shape on a
dark background) and Karpathy's dataset_flickr30k.json with five captions per image and train/val/test
splits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from frozenlm.data.fake.vqav2 import COLOURS, SHAPES, draw

TEMPLATES = (
    "A {colour} {shape} on a dark background.",
    "There is a {colour} {shape}.",
    "One {colour} {shape} in the picture",
    "a small {colour} {shape}",
    "The image shows a {shape} that is {colour}.",
)


def write(root: Path, images: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the dataset under `root` (`images`: images per split); returns root."""
    images = images or {"train": 8, "val": 4, "test": 5}
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    entries, sentence_id = [], 0
    for split, count in images.items():
        for _ in range(count):
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            filename = f"{1000 + len(entries)}.jpg"
            draw(colour, shape, 1, rng).save(root / "flickr30k-images" / filename, quality=90)
            sentences = []
            for template in TEMPLATES:
                raw = template.format(colour=colour, shape=shape)
                tokens = raw.lower().strip(".").split()
                sentences.append({"tokens": tokens, "raw": raw, "imgid": len(entries), "sentid": sentence_id})
                sentence_id += 1
            entries.append({
                "sentids": [s["sentid"] for s in sentences], "imgid": len(entries), "sentences": sentences,
                "split": split, "filename": filename,
            })  # fmt: skip
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the dataset into")
    print(write(parser.parse_args().root))

"""Writes a tiny fake VQAv2 in the official layout: COCO-named JPEGs of one coloured shape on a dark
background, questions about its colour (other), its kind (yes/no) and how many there are (number), ten
human answers each, in the official question and annotation files of train2014, val2014, test-dev2015
and test2015 (test2015 and test-dev2015 share the test2015 image folder, as COCO ships them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")
SIZE = 48


def draw(colour: str, shape: str, count: int, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 20, 20))
    pen = ImageDraw.Draw(image)
    for k in range(count):
        x, y = 4 + 14 * k, int(rng.integers(4, SIZE - 16))
        box = (x, y, x + 11, y + 11)
        (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
    return image


def human_answers(answer: str, rng: np.random.Generator, noise: list[str]) -> list[str]:
    """Ten annotators: mostly the answer (written in a few ways), sometimes another."""
    spellings = {"2": ["2", "two", "2"], "yes": ["yes", "Yes", "yes"]}.get(answer, [answer])
    return [str(rng.choice(spellings)) if rng.random() < 0.8 else str(rng.choice(noise)) for _ in range(10)]


def write(root: Path, images: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the dataset under `root` (`images`: images per split); returns root."""
    images = images or {"train2014": 12, "val2014": 6, "test-dev2015": 3, "test2015": 4}
    rng = np.random.default_rng(seed)
    root = Path(root)
    question_id, image_id = 1, 1
    for split, count in images.items():
        folder = "test2015" if split.startswith("test") else split
        (root / folder).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for _ in range(count):
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            number = int(rng.integers(1, 4))
            draw(colour, shape, number, rng).save(root / folder / f"COCO_{folder}_{image_id:012d}.jpg", quality=90)
            asks = [
                (f"What color is the {shape}?", colour, "other", list(COLOURS)),
                (f"Is there a {shape}?", "yes", "yes/no", ["no"]),
                (f"How many {shape}s are there?", str(number), "number", ["1", "2", "3"]),
            ]
            for text, answer, kind, noise in asks:
                questions.append({"image_id": image_id, "question": text, "question_id": question_id})
                answers = human_answers(answer, rng, noise)
                annotations.append({
                    "question_id": question_id, "image_id": image_id, "question_type": text.split()[0].lower(),
                    "answer_type": kind, "multiple_choice_answer": answer,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
                })  # fmt: skip
                question_id += 1
            image_id += 1
        info = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "license": {}}
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({**info, "questions": questions}))
        if split in ("train2014", "val2014"):
            (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({**info, "annotations": annotations}))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write the dataset into")
    print(write(parser.parse_args().root))

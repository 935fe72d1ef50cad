"""Writes a tiny SQA3D in the official layouts: three raw ScanNet scans (`scans/<scene>/<scene>_vh_clean_2.ply`
as binary PLY, `.aggregation.json`, `_vh_clean_2.0.010000.segs.json`, `<scene>.txt` with axisAlignment)
and `scannetv2-labels.combined.tsv`; SQA3D's `balanced/` questions and annotations for train / val / test
and `answer_dict.json`; GloVe vectors as ScanRefer's pickled `glove.p` and as GloVe's text format; and
the prepared layout `frozenlm.data.sqa3d.SQA3DDataModule` reads, computed here directly (not with
`frozenlm prepare`, which the tests check against it).

Each scene is a floor (NYU40 2, no box) and a few box-shaped objects whose points come in pairs mirrored
through the box centre (so the centre of any object's extent is its box centre, however the points are
rotated), plus a few unannotated points. Scene `scene0002_00` has no axisAlignment line (identity)."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

# raw category -> (nyu40 id, nyu40 class)
CATEGORIES = {"floor": (2, "floor"), "chair": (5, "chair"), "table": (7, "table"), "fridge": (24, "refrigerator"),
              "lamp": (35, "lamp"), "cabinet": (3, "cabinet")}  # fmt: skip
# scene -> (yaw of its axis alignment (None: no axisAlignment line), translation, [(category, centre, size)])
SCENES = {
    "scene0000_00": (0.3, (1.0, -2.0, 0.0), [("chair", (0.5, 0.5, 0.4), (0.6, 0.6, 0.8)),
                                            ("table", (2.0, 1.0, 0.35), (1.2, 0.8, 0.7)),
                                            ("lamp", (-1.0, 2.0, 0.8), (0.3, 0.3, 1.6))]),
    "scene0001_00": (-0.5, (0.0, 0.5, 0.1), [("fridge", (1.5, -1.0, 0.9), (0.8, 0.7, 1.8)),
                                            ("cabinet", (-1.5, -1.0, 0.5), (1.0, 0.5, 1.0))]),
    "scene0002_00": (None, (0.0, 0.0, 0.0), [("chair", (0.0, 1.0, 0.4), (0.5, 0.5, 0.8)),
                                            ("table", (1.0, -1.0, 0.4), (1.0, 1.0, 0.8))]),
}  # fmt: skip
SCENE_OF_SPLIT = {"train": ("scene0000_00", "scene0001_00"), "val": ("scene0001_00",), "test": ("scene0002_00",)}
POINTS_PER_OBJECT, FLOOR_POINTS, UNANNOTATED_POINTS = 60, 80, 10

# (split, scene, situation, question, answer): val has one question whose answer is not among train's, test two
QUESTIONS = [
    ("train", "scene0000_00", "I am sitting on the chair.", "What is in front of me?", "table"),
    ("train", "scene0000_00", "I am standing by the lamp facing the table.", "Is the chair on my left?", "yes"),
    ("train", "scene0000_00", "I just sat down on the chair.", "Are there two tables?", "no"),
    ("train", "scene0000_00", "I am facing the lamp.", "How many chairs are there?", "one"),
    ("train", "scene0000_00", "I am walking to the table.", "Which direction is the lamp?", "left"),
    ("train", "scene0000_00", "I stand  by the table .", "Can I sit on the table?", "no"),
    ("train", "scene0001_00", "I am opening the fridge.", "What is on my left?", "cabinet"),
    ("train", "scene0001_00", "I am standing in front of the cabinet.", "Am I facing the fridge?", "no"),
    ("train", "scene0001_00", "I am leaning on the cabinet.", "Where is the fridge?", "right"),
    ("train", "scene0001_00", "I am by the fridge.", "What color is the cabinet?", "white"),
    ("train", "scene0001_00", "I am looking at the cabinet.", "Is the fridge open?", "no"),
    ("train", "scene0001_00", "I put a cup on the cabinet.", "What is behind me?", "fridge"),
    ("val", "scene0001_00", "I am sitting on the floor.", "What is on my right?", "fridge"),
    ("val", "scene0001_00", "I am facing the fridge.", "Is the cabinet behind me?", "yes"),
    ("val", "scene0001_00", "I stand by the cabinet.", "What shape is the cabinet?", "rectangular"),
    ("val", "scene0001_00", "I am cleaning the fridge.", "How many doors does it have?", "one"),
    ("test", "scene0002_00", "I am sitting on the chair.", "What is in front of me?", "table"),
    ("test", "scene0002_00", "I am standing by the table.", "Are the chairs blue?", "blue"),
    ("test", "scene0002_00", "I am facing the chair.", "Which way is the table?", "left"),
    ("test", "scene0002_00", "I am pushing the table.", "Can I sit here?", "yes"),
    ("test", "scene0002_00", "I turn around.", "If I turn left what is there?", "wall"),
]  # fmt: skip
ANSWERS = sorted({q[4] for q in QUESTIONS})  # answer_dict.json holds every answer (SQA3D's holds all of its)
TSV_HEADER = ["id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
              "eigen13class", "ModelNet40", "ModelNet10", "ShapeNetCore55", "synsetoffset", "wnsynsetid",
              "wnsynsetkey", "mpcat40", "mpcat40index"]  # fmt: skip


class Paths(NamedTuple):
    scannet: Path  # raw ScanNet: scans/<scene>/..., scannetv2-labels.combined.tsv
    sqa_task: Path  # SQA3D's download: balanced/..., answer_dict.json
    prepared: Path  # the datamodule's root (written directly here), with glove.p
    glove_text: Path  # the same vectors in GloVe's text format


class Scene(NamedTuple):
    xyz: np.ndarray  # [N, 3] float32, unaligned
    rgb: np.ndarray  # [N, 3] uint8
    faces: np.ndarray  # [F, 3]
    segments: np.ndarray  # [N] segment id per vertex
    groups: list[dict]  # aggregation segGroups
    alignment: np.ndarray | None


def make_scene(name: str, seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    yaw, shift, objects = SCENES[name]
    parts, colours, segments, groups = [], [], [], []
    floor = np.concatenate([rng.uniform(-3, 3, (FLOOR_POINTS, 2)), np.zeros((FLOOR_POINTS, 1))], 1)
    parts.append(floor)
    segments.append(np.zeros(FLOOR_POINTS, int))
    groups.append({"id": 0, "objectId": 0, "segments": [0], "label": "floor"})
    for k, (category, centre, size) in enumerate(objects, start=1):
        half = rng.uniform(-0.5, 0.5, (POINTS_PER_OBJECT // 2, 3)) * size
        half[0] = np.array(size) / 2  # a corner, so the extent is the box
        points = np.asarray(centre) + np.concatenate([half, -half])  # mirrored pairs through the centre
        parts.append(points)
        segments.append(np.where(np.arange(POINTS_PER_OBJECT) % 2 == 0, 2 * k - 1, 2 * k))  # two segments each
        groups.append({"id": k, "objectId": k, "segments": [2 * k - 1, 2 * k], "label": category})
    parts.append(rng.uniform(-3, 3, (UNANNOTATED_POINTS, 3)))
    segments.append(np.full(UNANNOTATED_POINTS, 99))
    xyz = np.concatenate(parts).astype(np.float32)
    rgb = rng.integers(0, 256, (len(xyz), 3)).astype(np.uint8)
    faces = np.arange(len(xyz) - len(xyz) % 3).reshape(-1, 3)
    if yaw is None:
        alignment = None
    else:
        c, s = np.cos(yaw), np.sin(yaw)
        alignment = np.array([[c, -s, 0, shift[0]], [s, c, 0, shift[1]], [0, 0, 1, shift[2]], [0, 0, 0, 1]])
    return Scene(xyz, rgb, faces, np.concatenate(segments), groups, alignment)


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray) -> None:
    """ScanNet's _vh_clean_2.ply layout: binary little endian, float xyz, uchar rgba, uchar-int face lists."""
    header = ("ply\nformat binary_little_endian 1.0\ncomment VCGLIB generated\n"
              f"element vertex {len(xyz)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n")  # fmt: skip
    vertex = np.zeros(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                                       ("blue", "u1"), ("alpha", "u1")])  # fmt: skip
    for i, key in enumerate("xyz"):
        vertex[key] = xyz[:, i]
    for i, key in enumerate(("red", "green", "blue")):
        vertex[key] = rgb[:, i]
    vertex["alpha"] = 255
    face = np.zeros(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"], face["v"] = 3, faces
    path.write_bytes(header.encode() + vertex.tobytes() + face.tobytes())


def prepared_arrays(scene: Scene) -> dict[str, np.ndarray]:
    """The per-scene arrays of the prepared layout, computed directly: labels from the groups, boxes as the
    extent of each object's points (NYU40 object classes only), normals left zero (nothing reads them)."""
    nyu = {group["objectId"] + 1: CATEGORIES[group["label"]][0] for group in scene.groups}
    instance = np.zeros(len(scene.xyz), np.uint32)
    for group in scene.groups:
        instance[np.isin(scene.segments, group["segments"])] = group["objectId"] + 1
    semantic = np.array([nyu.get(int(i), 0) for i in instance], np.uint32)
    xyz = scene.xyz.astype(np.float64)
    aligned = xyz if scene.alignment is None else xyz @ scene.alignment[:3, :3].T + scene.alignment[:3, 3]
    out = {}
    for name, coords in (("", xyz), ("aligned_", aligned)):
        points = np.concatenate([coords, scene.rgb, np.zeros_like(coords)], 1).astype(np.float32)
        boxes = []
        for object_id, label in sorted(nyu.items()):
            if label == 2:  # floor: not an object class
                continue
            part = coords[instance == object_id]
            low, high = part.min(0), part.max(0)
            boxes.append([*((low + high) / 2), *(high - low), label, object_id - 1])
        out[f"{name}vert"], out[f"{name}bbox"] = points, np.array(boxes)
    out["sem_label"], out["ins_label"] = semantic, instance
    return out


def question_entries(split: str) -> tuple[list[dict], list[dict]]:
    questions, annotations = [], []
    rng = np.random.default_rng(len(split))
    for number, (which, scene, situation, question, answer) in enumerate(QUESTIONS):
        if which != split:
            continue
        qid = 220602000000 + number
        questions.append({"scene_id": scene, "situation": situation, "alternative_situation": [situation],
                          "question": question, "question_id": qid})  # fmt: skip
        yaw = rng.uniform(-np.pi, np.pi)
        annotations.append({
            "scene_id": scene, "question_type": "N/A", "answer_type": "other", "question_id": qid,
            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": 1}],
            "rotation": {"_x": 0, "_y": 0, "_z": float(np.sin(yaw / 2)), "_w": float(np.cos(yaw / 2))},
            "position": {"x": float(rng.uniform(-1, 1)), "y": float(rng.uniform(-1, 1)), "z": 0},
        })  # fmt: skip
    return questions, annotations


def glove_words() -> list[str]:
    """Most tokens of the questions (a few left out, to map to 'unk'), and 'unk'."""
    from frozenlm.data.sqa3d import tokenize

    words = sorted({t for q in QUESTIONS for text in q[2:4] for t in tokenize(text)})
    return ["unk"] + [w for w in words if w not in ("fridge", "cabinet")]


def write(root: str | Path, seed: int = 0) -> Paths:
    root = Path(root)
    paths = Paths(root / "scannet", root / "sqa_task", root / "sqa3d", root / "glove.840B.tiny.txt")
    tsv = ["\t".join(TSV_HEADER)]
    for number, (raw, (nyu40, nyu_class)) in enumerate(CATEGORIES.items(), start=1):
        tsv.append("\t".join([str(number), raw, raw, "1", str(nyu40), "0", nyu_class, nyu_class] + [""] * 9))
    paths.scannet.mkdir(parents=True, exist_ok=True)
    (paths.scannet / "scannetv2-labels.combined.tsv").write_text("\n".join(tsv) + "\n")
    for number, name in enumerate(SCENES):
        scene = make_scene(name, seed + number)
        folder = paths.scannet / "scans" / name
        folder.mkdir(parents=True, exist_ok=True)
        write_ply(folder / f"{name}_vh_clean_2.ply", scene.xyz, scene.rgb, scene.faces)
        (folder / f"{name}_vh_clean_2.0.010000.segs.json").write_text(
            json.dumps({"params": {}, "sceneId": name, "segIndices": scene.segments.tolist()}))
        (folder / f"{name}.aggregation.json").write_text(
            json.dumps({"sceneId": f"scannet.{name}", "appId": "test", "segGroups": scene.groups,
                        "segmentsFile": f"scannet.{name}_vh_clean_2.0.010000.segs.json"}))  # fmt: skip
        meta = "colorHeight = 968\ncolorWidth = 1296\n"
        if scene.alignment is not None:
            meta += "axisAlignment = " + " ".join(f"{v:.17g}" for v in scene.alignment.flatten()) + "\n"
        (folder / f"{name}.txt").write_text(meta + "numColorFrames = 10\n")
        (paths.prepared / "scans" / name).mkdir(parents=True, exist_ok=True)
        (paths.prepared / "scans" / name / f"{name}.txt").write_text(meta)
        (paths.prepared / "scannet_data").mkdir(parents=True, exist_ok=True)
        for key, array in prepared_arrays(scene).items():
            np.save(paths.prepared / "scannet_data" / f"{name}_{key}.npy", array)
    for folder in (paths.sqa_task, paths.prepared):
        (folder / "balanced").mkdir(parents=True, exist_ok=True)
        (folder / "answer_dict.json").write_text(
            json.dumps([{a: i for i, a in enumerate(ANSWERS)}, {str(i): a for i, a in enumerate(ANSWERS)}]))
        for split in ("train", "val", "test"):
            questions, annotations = question_entries(split)
            header = {"info": {"description": "tiny SQA3D for tests"}, "data_type": "scannet", "data_subtype": "v2"}
            (folder / "balanced" / f"v1_balanced_questions_{split}_scannetv2.json").write_text(
                json.dumps({**header, "task_type": "Situated question answering", "questions": questions}))
            (folder / "balanced" / f"v1_balanced_sqa_annotations_{split}_scannetv2.json").write_text(
                json.dumps({**header, "annotations": annotations}))
    rng = np.random.default_rng(seed)
    words = glove_words()
    vectors = rng.normal(size=(len(words), 300)).astype(np.float32)
    with open(paths.prepared / "glove.p", "wb") as file:
        pickle.dump({w: v for w, v in zip(words, vectors)}, file)  # written here, by this process
    paths.glove_text.write_text("".join(f"{w} " + " ".join(f"{x:.6f}" for x in v) + "\n" for w, v in zip(words, vectors)))
    return paths



def write_prepared(root: str | Path, train_questions: int = 8, seed: int = 0) -> Path:
    """The prepared layout alone (what `SQA3DDataModule` reads) with at least `train_questions` training
    questions: the tiny set's own, repeated under new question ids (for `frozenlm bench --config`)."""
    prepared = write(root, seed).prepared
    balanced = prepared / "balanced"
    questions_file = balanced / "v1_balanced_questions_train_scannetv2.json"
    annotations_file = balanced / "v1_balanced_sqa_annotations_train_scannetv2.json"
    questions, annotations = json.loads(questions_file.read_text()), json.loads(annotations_file.read_text())
    base_q, base_a = questions["questions"], annotations["annotations"]
    copies = -(-max(train_questions, len(base_q)) // len(base_q))
    questions["questions"] = [{**q, "question_id": q["question_id"] + 1000 * k} for k in range(copies) for q in base_q]
    annotations["annotations"] = [{**a, "question_id": a["question_id"] + 1000 * k} for k in range(copies) for a in base_a]
    questions_file.write_text(json.dumps(questions))
    annotations_file.write_text(json.dumps(annotations))
    return prepared

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path, help="directory to write scannet/, sqa_task/ and sqa3d/ into")
    print(write(parser.parse_args().root))

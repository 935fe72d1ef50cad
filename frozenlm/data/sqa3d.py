"""SQA3D (Ma et al., ICLR 2023): situated question answering in ScanNet scenes, read as its ScanQA baseline
(SilongYong/SQA3D ``ScanQA/lib/sepdataset.py``, ``utils/sqa_data_2_ScanQA.py``, ``scripts/train.py``) reads it.

On disk (``frozenlm prepare sqa3d`` writes it from the ScanNet and SQA3D downloads)::

    root/answer_dict.json                                            [answer -> class, class -> answer]
    root/balanced/v1_balanced_questions_<split>_scannetv2.json       {"questions": [{scene_id, situation, question, question_id, ...}]}
    root/balanced/v1_balanced_sqa_annotations_<split>_scannetv2.json {"annotations": [{question_id, answers, position, rotation, ...}]}
    root/scannet_data/<scene>_{vert,aligned_vert,sem_label,ins_label,bbox,aligned_bbox}.npy
    root/scans/<scene>/<scene>.txt                                   ScanNet's meta file (axisAlignment)
    root/glove.p (or any GloVe file given as --data.glove)

Each sample is one question (see :class:`SQA3DDataModule` for the batch).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import BaseDataModule, DatasetFileError, DatasetNotFoundError, Unreadable
from frozenlm.data.glove import UNKNOWN, WordVectors, load_word_vectors
from frozenlm.data.scannet import (
    MEAN_COLOR_RGB,
    MEAN_SIZE,
    NYU40_IDS,
    ROTATIONS,
    box_targets,
    padded_boxes,
    read_axis_alignment,
    rotate_boxes,
    vote_targets,
)

SPLITS = ("train", "val", "test")
# EM@1 is reported per question type, by the question's first (whitespace-separated) word: "Is" includes "Are"
# and "Am"; every other first word is "Others" (SQA3D's test split: 1144 / 843 / 465 / 338 / 351 / 378).
QUESTION_TYPES = ("What", "Is", "How", "Can", "Which", "Others")
_TYPE_OF_WORD = {"What": 0, "Is": 1, "Are": 1, "Am": 1, "How": 2, "Can": 3, "Which": 4}
UNKNOWN_ANSWER = "unknown"  # what sqa_data_2_ScanQA.py writes for an answer not in answer_dict.json
IGNORE_CLASS = -100  # answer_class of a question whose answer is not in the vocabulary (test only)
MAX_TEXT_LENGTH = 100  # tokens kept of a situation or a question (CONF.TRAIN.MAX_TEXT_LEN)
PREPARE_HINT = ("Run `frozenlm prepare sqa3d --root <root> --source <ScanNet folder> --questions <SQA3D sqa_task folder>` "
                "(see docs/troubleshooting.md).")  # fmt: skip


def question_type(question: str) -> int:
    """The index in :data:`QUESTION_TYPES` of ``question``'s type, by its first word."""
    words = question.split()
    return _TYPE_OF_WORD.get(words[0] if words else "", len(QUESTION_TYPES) - 1)


def tokenize(text: str) -> list[str]:
    """The reference's tokens: ``?`` and ``.`` get a space before them, then spaCy's blank tokenizer (no
    rules) splits on whitespace: a run of non-space characters is a token, a single space after a token is
    dropped, and any other whitespace run is a token of its own (``"me  ?"`` -> ``me``, `` ``, ``?``).
    Case is kept."""
    text = text.replace("?", " ?").replace(".", " .")
    tokens: list[str] = []
    start, in_space = 0, bool(text) and text[0].isspace()
    for i, char in enumerate(text):
        if char.isspace() != in_space:
            if start < i:
                tokens.append(text[start:i])
            start = i + 1 if char == " " else i
            in_space = not in_space
    if start < len(text):
        tokens.append(text[start:])
    return tokens


def answer_score(count: int) -> float:
    """The soft target of an answer seen ``count`` times among the training answers: 0.3 / 0.6 / 0.9 for 1 /
    2 / 3, 1 from 4 on (the reference's ``get_answer_score``)."""
    return {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(count, 1.0) if count >= 0 else 0.0


class Question(NamedTuple):
    """One SQA3D question joined with its annotation; ``situation_pose``: position x, y, z and rotation
    quaternion ``_x, _y, _z, _w`` as the annotation gives them (scene coordinates before alignment)."""

    scene_id: str
    question_id: int
    situation: str
    question: str
    answer: str
    situation_pose: tuple[float, ...]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetNotFoundError(f"SQA3DDataModule: no {path}. Download SQA3D (https://github.com/SilongYong/SQA3D, "
                                   f"sqa_task.zip) and {PREPARE_HINT}")  # fmt: skip
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetFileError(f"{path} is not readable JSON ({error}); restore it from SQA3D's sqa_task.zip.") from None


def question_files(root: Path, split: str) -> tuple[Path, Path]:
    """The questions and annotations files of ``split``."""
    folder = Path(root) / "balanced"
    return (folder / f"v1_balanced_questions_{split}_scannetv2.json",
            folder / f"v1_balanced_sqa_annotations_{split}_scannetv2.json")  # fmt: skip


def read_questions(root: str | Path, split: str, answers: set[str]) -> list[Question]:
    """``split``'s questions with their annotations, in the questions file's order. The answer is the
    annotation's first, :data:`UNKNOWN_ANSWER` when not in ``answers`` (answer_dict.json's), as the
    reference's conversion. A file without its keys, or a question without annotation, raises
    :class:`DatasetFileError` naming the file and question."""
    questions_path, annotations_path = question_files(Path(root), split)
    questions, annotations = _read_json(questions_path), _read_json(annotations_path)
    try:
        by_id = {entry["question_id"]: entry for entry in annotations["annotations"]}
        listed = questions["questions"]
    except (KeyError, TypeError) as error:
        raise DatasetFileError(f"{questions_path} or {annotations_path} lacks {error}: not SQA3D's format.") from None
    records = []
    for entry in listed:
        try:
            annotation = by_id[entry["question_id"]]
            answer = annotation["answers"][0]["answer"]
            position, rotation = annotation["position"], annotation["rotation"]
            pose = tuple(float(position[k]) for k in ("x", "y", "z")) + tuple(
                float(rotation[k]) for k in ("_x", "_y", "_z", "_w"))  # fmt: skip
            records.append(Question(str(entry["scene_id"]), _question_id(entry["question_id"]), str(entry["situation"]),
                                    str(entry["question"]), answer if answer in answers else UNKNOWN_ANSWER, pose))  # fmt: skip
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise DatasetFileError(
                f"{annotations_path}: question {entry.get('question_id') if isinstance(entry, dict) else entry!r} of "
                f"{questions_path.name} has no usable annotation ({type(error).__name__}: {error}); use the files of "
                "the same split from SQA3D's download."
            ) from None
    if not records:
        raise DatasetFileError(f"{questions_path} lists no question; restore it from SQA3D's sqa_task.zip.")
    return records


def _question_id(value: Any) -> int:
    return int(str(value).split("-")[-1])


def read_answer_dict(root: str | Path) -> set[str]:
    """The answers of ``answer_dict.json`` (``[answer -> class, class -> answer]``)."""
    path = Path(root) / "answer_dict.json"
    table = _read_json(path)
    if not (isinstance(table, list) and table and isinstance(table[0], dict)):
        raise DatasetFileError(f"{path} is not SQA3D's [answer -> class, class -> answer]; restore it from sqa_task.zip.")
    return set(table[0])


class SceneFiles(NamedTuple):
    """Where one scene's prepared arrays are, and what the situation needs from them: ``centre``, the
    centre of the unaligned points' extent (SQA3D's positions are relative to it), and ``alignment``, the
    scan's 4x4 axisAlignment (identity without one, as the reference)."""

    scene_id: str
    prefix: Path
    centre: np.ndarray
    alignment: np.ndarray

    def path(self, name: str) -> Path:
        return self.prefix.parent / f"{self.prefix.name}_{name}.npy"

    def load(self) -> dict[str, np.ndarray]:
        """The arrays a sample needs, checked (shapes agree, values finite); ``ValueError`` naming the file."""
        arrays = {}
        for name in ("aligned_vert", "ins_label", "sem_label", "aligned_bbox"):
            arrays[name] = np.load(self.path(name), allow_pickle=False)
        points, boxes = arrays["aligned_vert"], arrays["aligned_bbox"]
        if points.ndim != 2 or points.shape[1] < 6 or len(points) == 0:
            raise ValueError(f"{self.path('aligned_vert')} holds {points.shape}, not [N, 9] points")
        for name in ("ins_label", "sem_label"):
            if arrays[name].shape != (len(points),):
                raise ValueError(f"{self.path(name)} holds {arrays[name].shape}, not one label per point ({len(points)})")
        if boxes.ndim != 2 or (len(boxes) and boxes.shape[1] != 8):
            raise ValueError(f"{self.path('aligned_bbox')} holds {boxes.shape}, not [K, 8] boxes")
        for name in ("aligned_vert", "aligned_bbox"):
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"{self.path(name)} holds NaN or infinite values")
        # Boxes of object classes only: the reference's export skips this filter for a scene of one box (a lone
        # wall box, or the zero placeholder of an unannotated scan, which its dataset cannot map to a class).
        arrays["aligned_bbox"] = boxes[np.isin(boxes[:, 6], NYU40_IDS)] if len(boxes) else np.zeros((0, 8))
        return arrays


def scene_files(scene_id: str, scannet_data: Path, scans: Path) -> SceneFiles:
    """:class:`SceneFiles` of ``scene_id``, reading its ``_vert.npy`` extent and meta file; ``OSError`` or
    ``ValueError`` naming the file when one is missing or damaged."""
    prefix = scannet_data / scene_id
    vert = np.load(f"{prefix}_vert.npy", mmap_mode="r", allow_pickle=False)
    if vert.ndim != 2 or vert.shape[1] < 3 or len(vert) == 0:
        raise ValueError(f"{prefix}_vert.npy holds {vert.shape}, not [N, 9] points")
    xyz = np.asarray(vert[:, 0:3])
    centre = (xyz.max(0) + xyz.min(0)) / 2
    if not np.isfinite(centre).all():
        raise ValueError(f"{prefix}_vert.npy holds NaN or infinite coordinates")
    alignment = read_axis_alignment(scans / scene_id / f"{scene_id}.txt")
    return SceneFiles(scene_id, prefix, centre, np.eye(4) if alignment is None else alignment)


class SQA3DQuestions(Dataset):
    """A split's questions as samples of :class:`SQA3DDataModule`'s batch (a dict of tensors), or
    :class:`~frozenlm.data.base.Unreadable` for a scene whose arrays cannot be read (dropped from the batch,
    named and counted). ``random``: draw the points and the augmentation from the process's seeded stream
    (training); otherwise every draw is seeded by the question id, so evaluation is the same on any number
    of processes and in any order."""

    def __init__(
        self,
        questions: Sequence[Question],
        scenes: dict[str, SceneFiles],
        vectors: np.ndarray,
        token_ids: Sequence[tuple[np.ndarray, np.ndarray]],
        vocabulary: Sequence[str],
        counter: dict[str, int],
        num_points: int,
        use_color: bool = True,
        use_height: bool = True,
        augment: bool = False,
        random: bool = False,
        max_text_length: int = MAX_TEXT_LENGTH,
    ) -> None:
        self.questions, self.scenes, self.vectors, self.token_ids = list(questions), scenes, vectors, list(token_ids)
        self.index = {answer: i for i, answer in enumerate(vocabulary)}
        self.counter = counter
        self.num_points, self.use_color, self.use_height = num_points, use_color, use_height
        self.augment, self.random, self.max_text_length = augment, random, max_text_length

    def __len__(self) -> int:
        return len(self.questions)

    def generator(self, index: int) -> np.random.Generator:
        if self.random:  # the process's (and loader worker's) stream, seeded per (seed, epoch, rank) by the task
            return np.random.default_rng(int(torch.randint(2**62, ())))
        return np.random.default_rng(self.questions[index].question_id)

    def __getitem__(self, index: int) -> dict[str, Any] | Unreadable:
        record = self.questions[index]
        scene = self.scenes[record.scene_id]
        try:
            arrays = scene.load()
        except (OSError, ValueError, EOFError) as error:
            return Unreadable(f"{scene.prefix}_*.npy", f"{type(error).__name__}: {error}")
        sample = self.scene_sample(arrays, scene, record.situation_pose, self.generator(index))
        situation, question = self.token_ids[index]
        sample["situation_tokens"], sample["situation_lengths"] = self.embed(situation)
        sample["question_tokens"], sample["question_lengths"] = self.embed(question)
        targets = np.zeros(len(self.index), dtype=np.float32)
        answer_class = self.index.get(record.answer, IGNORE_CLASS)
        if answer_class != IGNORE_CLASS:
            targets[answer_class] = answer_score(self.counter.get(record.answer, 0))
        sample["answer_targets"] = torch.from_numpy(targets)
        sample["answer_class"] = torch.tensor(answer_class)
        sample["question_type"] = torch.tensor(question_type(record.question))
        sample["question_id"] = torch.tensor(record.question_id)
        sample["dataset_index"] = torch.tensor(index)
        sample["padding"] = torch.tensor(False)
        return sample

    def embed(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``[max_text_length, dim]`` vectors of the first tokens (zeros after), and their count (at least 1:
        an empty text is one zero vector, which the LSTM can read)."""
        ids = ids[: self.max_text_length]
        features = np.zeros((self.max_text_length, self.vectors.shape[1]), dtype=np.float32)
        features[: len(ids)] = self.vectors[ids]
        return torch.from_numpy(features), torch.tensor(max(1, len(ids)))

    def scene_sample(
        self, arrays: dict[str, np.ndarray], scene: SceneFiles, pose: Sequence[float], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        """The points, detection targets and situation of one sample, augmented as the reference (when
        ``augment``): flip x (p 0.5), flip y (p 0.5), rotate about x, y, z by U[-5, 5] degrees each, translate
        by U{-0.5, -0.499, ..., 0.5} m per axis; points, boxes and the situation alike; votes after."""
        mesh = arrays["aligned_vert"].astype(np.float64)
        columns = [mesh[:, 0:3]]
        if self.use_color:
            columns.append((mesh[:, 3:6] - MEAN_COLOR_RGB) / 256.0)
        if self.use_height:  # above the floor, the 0.99th percentile of the scene's z (before sampling)
            columns.append((mesh[:, 2] - np.percentile(mesh[:, 2], 0.99))[:, None])
        cloud = np.concatenate(columns, 1)
        choices = rng.choice(len(cloud), self.num_points, replace=len(cloud) < self.num_points)
        cloud = cloud[choices]
        instance_labels, semantic_labels = arrays["ins_label"][choices], arrays["sem_label"][choices]
        instance_boxes = arrays["aligned_bbox"]
        boxes, mask, count = padded_boxes(instance_boxes)
        # The situation in aligned scene coordinates: SQA3D's position is relative to the centre of the scan's extent.
        position = (scene.alignment @ np.append(np.asarray(pose[:3]) + scene.centre, 1.0))[:3]
        rotation = scene.alignment[:3, :3] @ Rotation.from_quat(pose[3:]).as_matrix()
        quaternion = Rotation.from_matrix(rotation).as_quat()
        if self.augment:
            cloud, boxes, position, quaternion = augment_scene(cloud, boxes, position, quaternion, rng)
        votes, vote_mask = vote_targets(cloud[:, 0:3], instance_labels, semantic_labels)
        targets = box_targets(boxes, instance_boxes, count)
        sample = {name: torch.from_numpy(value) for name, value in targets.items()}
        sample.update({
            "point_clouds": torch.from_numpy(cloud.astype(np.float32)),
            "box_label_mask": torch.from_numpy(mask.astype(np.float32)),
            "vote_label": torch.from_numpy(votes),
            "vote_label_mask": torch.from_numpy(vote_mask),
            "situation_target": torch.from_numpy(np.concatenate([position, quaternion]).astype(np.float32)),
        })  # fmt: skip
        return sample


def augment_scene(
    cloud: np.ndarray, boxes: np.ndarray, position: np.ndarray, quaternion: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The reference's training augmentation of one scene, in its order, on copies: the points' xyz (``cloud``'s
    first 3 columns; colour and height untouched), the boxes ``[K, 6]`` and the situation. The flips change the
    situation's rotation matrix as the reference does (x: negate its [0, 0] and [1, 1]; y: swap its first two
    rows and columns), which for a rotation about z (all of SQA3D's) is the mirrored heading; rotations
    compose on the left."""
    cloud, boxes, position = cloud.copy(), boxes.copy(), np.array(position, dtype=np.float64)
    if rng.random() > 0.5:  # flip x (mirror in the y-z plane)
        cloud[:, 0] *= -1
        boxes[:, 0] *= -1
        position[0] *= -1
        matrix = Rotation.from_quat(quaternion).as_matrix()
        matrix[0, 0] *= -1
        matrix[1, 1] *= -1
        quaternion = Rotation.from_matrix(matrix).as_quat()
    if rng.random() > 0.5:  # flip y (mirror in the x-z plane)
        cloud[:, 1] *= -1
        boxes[:, 1] *= -1
        position[1] *= -1
        matrix = Rotation.from_quat(quaternion).as_matrix()[[1, 0, 2]][:, [1, 0, 2]]
        quaternion = Rotation.from_matrix(matrix).as_quat()
    for axis in ("x", "y", "z"):
        rotation = ROTATIONS[axis](rng.random() * np.pi / 18 - np.pi / 36)  # U[-5, 5] degrees
        cloud[:, 0:3] = cloud[:, 0:3] @ rotation.T
        boxes = rotate_boxes(boxes, rotation, axis)
        position = rotation @ position
        quaternion = Rotation.from_matrix(rotation @ Rotation.from_quat(quaternion).as_matrix()).as_quat()
    steps = np.arange(-0.5, 0.501, 0.001)
    shift = np.array([rng.choice(steps) for _ in range(3)])
    cloud[:, 0:3] += shift
    boxes[:, 0:3] += shift
    return cloud, boxes, position + shift, quaternion


class SQA3DDataModule(BaseDataModule):
    """SQA3D's balanced questions (the release's test split: 3,519 questions on 67 scenes) on ScanNet scenes,
    with the inputs and targets of its ScanQA baseline.

    Each sample is one question: ``point_clouds [N, 3 + 3 + 1]`` (xyz; (rgb - [109.8, 97.2, 83.8]) / 256 with
    ``use_color``; height above the 0.99th percentile of the scene's z with ``use_height``), ``num_points``
    drawn from the scene's prepared points (with replacement only when it has fewer); the situation and the
    question as GloVe vectors ``[max_text_length, 300]`` (zero-padded) with their token counts (tokens as
    :func:`tokenize`, unknown words as ``unk``); ``answer_targets [num_answers]`` (the answer's soft score by
    its count among the training answers, :func:`answer_score`) and ``answer_class`` (its class; -100 on
    test when the vocabulary lacks it: always wrong); ``situation_target [7]`` (position, quaternion x, y, z,
    w, in aligned scene coordinates, augmented with the points); VoteNet's detection targets
    (``center_label``, ``heading_class_label``, ``heading_residual_label``, ``size_class_label``,
    ``size_residual_label``, ``sem_cls_label``, ``box_label_mask`` over 128 boxes; ``vote_label [N, 9]``,
    ``vote_label_mask [N]``; on every split, where the reference leaves test's zero); ``question_type``
    (index into :data:`QUESTION_TYPES`), ``question_id``, ``dataset_index`` and ``padding``.

    The answer vocabulary is every answer of the training split, sorted, and the soft scores count answers
    in train (the reference reads both from a released ``answer_counter.json``, described as the answers of
    all questions; here they are built from train, where nothing of val or test can leak); train and val keep the questions whose answer is in it (the others are counted and
    said once), test keeps all. Training draws points and augmentation from each process's seeded stream;
    evaluation draws the points from a generator seeded by the question id, so it is the same on any number
    of processes (each question scored once, :class:`~frozenlm.data.distributed.EvaluationSampler`).
    A scene a split needs whose files are missing or damaged stops setup with
    :class:`~frozenlm.data.base.DatasetNotFoundError` / :class:`~frozenlm.data.base.DatasetFileError` naming
    them; arrays that fail to read later drop their sample, named and counted (``max_unreadable_fraction``).
    Predict runs on test.

    Args:
        root: the prepared folder (``frozenlm prepare sqa3d``; layout in this module's docstring).
        glove: GloVe vectors: ScanRefer's ``glove.p`` (read without running pickled code) or GloVe's text
            format (``.txt``, ``.txt.gz``, ``.zip``); default ``root/glove.p``.
        scannet_data: the per-scene ``.npy`` folder; default ``root/scannet_data``.
        scans: the folder of ScanNet's ``<scene>/<scene>.txt`` meta files; default ``root/scans``.
        batch_size, num_workers, pin_memory, max_unreadable_fraction: see :class:`~frozenlm.data.base.BaseDataModule`
            (the reference: batch 16).
        num_points: points per scene (the reference: 40,000).
        use_color: the 3 colour channels (the reference's ``--use_color``, on in its recipes).
        use_height: the height channel (on in the reference).
        augment: the training augmentation (flips, rotations, translation).
        max_text_length: tokens kept of a situation or a question (100).
    """

    def __init__(
        self,
        root: str | Path,
        glove: str | Path | None = None,
        scannet_data: str | Path | None = None,
        scans: str | Path | None = None,
        batch_size: int = 16,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_points: int = 40000,
        use_color: bool = True,
        use_height: bool = True,
        augment: bool = True,
        max_text_length: int = MAX_TEXT_LENGTH,
        max_unreadable_fraction: float = 0.01,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, max_unreadable_fraction=max_unreadable_fraction)
        self.root = Path(root)
        self.glove = Path(glove) if glove is not None else self.root / "glove.p"
        self.scannet_data = Path(scannet_data) if scannet_data is not None else self.root / "scannet_data"
        self.scans = Path(scans) if scans is not None else self.root / "scans"
        self.num_points, self.use_color, self.use_height = num_points, use_color, use_height
        self.augment, self.max_text_length = augment, max_text_length
        self.input_feature_dim = 3 * use_color + 1 * use_height  # channels after xyz
        self.mean_size = MEAN_SIZE.copy()
        # The vocabulary is needed to build the model (num_answers), before any setup.
        self.known_answers = read_answer_dict(self.root)
        self.answer_counter = dict(sorted(Counter(q.answer for q in self.read_split("train")).items()))
        self.answer_vocabulary = sorted(self.answer_counter)
        self.num_answers = len(self.answer_vocabulary)
        self.datasets: dict[str, SQA3DQuestions] = {}
        self._word_vectors: WordVectors | None = None
        self.skipped: dict[str, int] = {}  # split -> questions left out (answer not in the vocabulary)

    def __str__(self) -> str:
        return f"SQA3DDataModule(root={self.root}, batch_size={self.batch_size}, num_points={self.num_points})"

    def read_split(self, split: str) -> list[Question]:
        """All of ``split``'s questions as on disk (before the answerable filter)."""
        return read_questions(self.root, split, self.known_answers)

    def dataset(self, split: str) -> SQA3DQuestions:
        """The ``train``, ``val`` or ``test`` questions (built once)."""
        if split not in self.datasets:
            questions = self.read_split(split)
            if split != "test":  # the reference trains and validates on answerable questions only
                kept = [q for q in questions if q.answer in self.answer_counter]
                self.skipped[split] = len(questions) - len(kept)
                if self.skipped[split]:
                    print(f"SQA3DDataModule: {split}: {len(kept)} of {len(questions)} questions have an answer in the "
                          f"training vocabulary; the other {self.skipped[split]} are left out, as the reference does.")  # fmt: skip
                questions = kept
                if not questions:
                    raise DatasetFileError(f"SQA3DDataModule: no {split} question has an answer of the training split's "
                                           f"vocabulary ({question_files(self.root, split)[1]}); use SQA3D's own files.")  # fmt: skip
            scenes = self.scene_index(sorted({q.scene_id for q in questions}), split)
            texts = [(tokenize(q.situation), tokenize(q.question)) for q in questions]
            vectors = self.word_vectors()
            index = {word: i for i, word in enumerate(vectors.words)}
            unknown = index[UNKNOWN]
            token_ids = [tuple(np.array([index.get(t, unknown) for t in tokens], dtype=np.int64) for tokens in pair)
                         for pair in texts]  # fmt: skip
            training = split == "train"
            self.datasets[split] = SQA3DQuestions(
                questions, scenes, vectors.vectors, token_ids, self.answer_vocabulary, self.answer_counter,
                self.num_points, self.use_color, self.use_height, augment=training and self.augment,
                random=training, max_text_length=self.max_text_length,
            )  # fmt: skip
        return self.datasets[split]

    def word_vectors(self) -> WordVectors:
        """The GloVe vectors of every token of the splits on disk (and ``unk``), read once."""
        if self._word_vectors is None:
            words = set()
            for split in SPLITS:
                if all(path.is_file() for path in question_files(self.root, split)):
                    for q in self.read_split(split):
                        words.update(tokenize(q.situation), tokenize(q.question))
            self._word_vectors = load_word_vectors(self.glove, keep=words)
        return self._word_vectors

    def scene_index(self, scene_ids: list[str], split: str) -> dict[str, SceneFiles]:
        """Each scene's :class:`SceneFiles`; stops naming the scenes whose files are missing or damaged."""
        scenes, missing, damaged = {}, [], []
        for scene_id in scene_ids:
            try:
                scenes[scene_id] = scene_files(scene_id, self.scannet_data, self.scans)
                for name in ("aligned_vert", "ins_label", "sem_label", "aligned_bbox"):
                    if not scenes[scene_id].path(name).is_file():
                        raise FileNotFoundError(scenes[scene_id].path(name))
            except FileNotFoundError as error:
                missing.append(f"{scene_id} ({Path(error.filename or str(error)).name})")
            except (OSError, ValueError, EOFError) as error:
                damaged.append(f"{scene_id} ({error})")
        if missing:
            raise DatasetNotFoundError(
                f"SQA3DDataModule: {len(missing)} of the {len(scene_ids)} scenes of the {split} split are missing in "
                f"{self.scannet_data} or {self.scans}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
                f"{PREPARE_HINT}"
            )
        if damaged:
            raise DatasetFileError(
                f"SQA3DDataModule: {len(damaged)} of the {len(scene_ids)} scenes of the {split} split are damaged: "
                f"{'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}. Delete their files and {PREPARE_HINT}"
            )
        return scenes

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            self.dataset(split)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("test"))


# -- frozenlm prepare sqa3d ---------------------------------------------------------------------------------
SCANNET_HINT = ("ScanNet is not redistributable: request it (http://www.scan-net.org/), download the scans SQA3D "
                "uses (the _vh_clean_2.ply, .aggregation.json, _vh_clean_2.0.010000.segs.json and .txt of each) and "
                "scannetv2-labels.combined.tsv, and pass that folder as --source.")  # fmt: skip
LABEL_MAP = "scannetv2-labels.combined.tsv"
PROBLEMS_FILE = "sqa3d_prepare_problems.txt"


def scene_done(root: Path, scene_id: str) -> bool:
    """Whether a previous run wrote every file of ``scene_id`` (each written atomically, the meta file last)."""
    from frozenlm.data.scannet import SCENE_ARRAYS

    if not (root / "scans" / scene_id / f"{scene_id}.txt").is_file():
        return False
    try:
        for name in SCENE_ARRAYS:
            np.load(root / "scannet_data" / f"{scene_id}_{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return True


def prepare_sqa3d(root: str | Path, source: str | Path | None, questions: str | Path | None = None) -> str:
    """Convert SQA3D's questions (copied from ``questions``, SQA3D's ``sqa_task`` folder, unless ``root`` holds
    them) and the ScanNet scans they ask about (``source``/scans/<scene>/) into ``root`` in the layout of
    :class:`SQA3DDataModule`, one scene at a time with a progress bar; scenes already written are kept
    (resume). A scan that is missing or cannot be converted is named and counted (and listed in
    ``root/sqa3d_prepare_problems.txt``): after converting the others, a one-line error says how many and
    which. Returns the summary line."""
    import shutil
    from contextlib import closing

    from rich.progress import track

    from frozenlm.data.scannet import SceneError, convert_scene, read_label_map
    from frozenlm.files import atomic_path

    root = Path(root)
    files = [Path("answer_dict.json")] + [path.relative_to(root) for split in SPLITS for path in question_files(root, split)]
    if questions is not None:
        for name in files:
            if not (Path(questions) / name).is_file():
                raise DatasetNotFoundError(f"frozenlm prepare sqa3d: no {Path(questions) / name}: --questions must be SQA3D's "
                                           "sqa_task folder (balanced/ and answer_dict.json, from sqa_task.zip).")  # fmt: skip
            with atomic_path(root / name) as partial:
                shutil.copyfile(Path(questions) / name, partial)
    scene_ids = sorted({str(entry["scene_id"]) for split in SPLITS
                        for entry in _read_json(question_files(root, split)[0]).get("questions", [])})  # fmt: skip
    if source is None:
        raise DatasetNotFoundError(f"frozenlm prepare sqa3d needs --source, the ScanNet folder. {SCANNET_HINT}")
    source = Path(source)
    label_path = source / LABEL_MAP
    if not label_path.is_file() or not (source / "scans").is_dir():
        raise DatasetNotFoundError(f"frozenlm prepare sqa3d: {source} has no {LABEL_MAP} or no scans/ folder. {SCANNET_HINT}")
    label_map = read_label_map(label_path)
    todo = [scene for scene in scene_ids if not scene_done(root, scene)]
    problems: list[str] = []
    progress = track(todo, description=f"SQA3D: converting {len(todo)} of {len(scene_ids)} ScanNet scenes")
    with closing(progress):
        for scene in progress:
            scan = source / "scans" / scene
            try:
                if not scan.is_dir():
                    raise SceneError(f"{scan} is missing")
                arrays = convert_scene(scan, label_map)
            except (SceneError, OSError, ValueError, KeyError, IndexError) as error:
                problems.append(f"{scene}: {error}")
                continue
            for name, array in arrays.items():
                with atomic_path(root / "scannet_data" / f"{scene}_{name}.npy") as partial, open(partial, "wb") as file:
                    np.save(file, array)
            with atomic_path(root / "scans" / scene / f"{scene}.txt") as partial:
                shutil.copyfile(scan / f"{scene}.txt", partial)
    listing = root / PROBLEMS_FILE
    if problems:
        listing.write_text("\n".join(problems) + "\n")
        missing = sum(problem.endswith("is missing") for problem in problems)
        error = DatasetNotFoundError if missing == len(problems) else DatasetFileError
        raise error(
            f"frozenlm prepare sqa3d: {len(problems)} of {len(scene_ids)} scenes could not be converted ({missing} missing, "
            f"{len(problems) - missing} damaged): {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''} (all in "
            f"{listing}). The other {len(scene_ids) - len(problems)} are written; restore these scans in {source}/scans "
            "and run the command again (it converts only what is not done)."
        )
    listing.unlink(missing_ok=True)
    return (f"Wrote {len(todo)} scenes ({len(scene_ids) - len(todo)} were already there) of SQA3D's {len(scene_ids)} "
            f"into {root}. Put GloVe there as glove.p or pass --data.glove; use --data.root {root}.")  # fmt: skip

"""VQAv2 (Goyal et al., CVPR 2017): open-ended questions on COCO images, ten human answers each."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.vision_language import (
    CLIP_MEAN,
    CLIP_STD,
    VisionLanguageDataModule,
    clip_transform,
    read_image,
    read_json,
)
from frozenlm.data.vqa_answers import answer_vocabulary
from frozenlm.files import source_stamp, write_atomically

SPLITS = ("train2014", "val2014", "test-dev2015", "test2015")
ANNOTATED = ("train2014", "val2014")
IMAGE_FOLDERS = {"train2014": "train2014", "val2014": "val2014", "test-dev2015": "test2015", "test2015": "test2015"}
DOWNLOAD_HINT = (
    "Download VQAv2 from https://visualqa.org/download.html (the questions and annotations zips) and COCO's "
    "train2014, val2014 and test2015 images from https://cocodataset.org, extract them all into one folder and "
    "pass it as --data.root."
)


def question_file(split: str) -> str:
    return f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotation_file(split: str) -> str:
    return f"v2_mscoco_{split}_annotations.json"


def image_path(root: Path, split: str, image_id: int) -> Path:
    folder = IMAGE_FOLDERS[split]
    return root / folder / f"COCO_{folder}_{image_id:012d}.jpg"


def soft_score(count: int) -> float:
    """METER's (and VQA's usual) target for an answer `count` of the ten annotators gave: 0.3 per
    annotator, 1 from four on (0.3 / 0.6 / 0.9 / 1.0)."""
    return min(1.0, 0.3 * count) if count < 4 else 1.0


class Question(NamedTuple):
    question_id: int
    question: str
    image: Path
    answers: list[str]  # the human answers as given (empty without annotations)
    answer_type: str  # "yes/no", "number", "other" ("" without annotations)


class VQASamples(Dataset):
    """`{"image", "question", "question_id", "targets" [num_answers], "answers", "answer_type"}` per
    question, or `Unreadable` for an image that cannot be decoded."""

    def __init__(self, questions: list[Question], answer_index: dict[str, int], transform) -> None:
        self.questions, self.answer_index, self.transform = questions, answer_index, transform

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question = self.questions[index]
        image = read_image(question.image, self.transform)
        if not torch.is_tensor(image):
            return image
        targets = torch.zeros(len(self.answer_index))
        # METER's targets (write_vqa.py make_arrow): the human answers counted as written, matched against the
        # normalised vocabulary; an annotator's "two" does not count for the vocabulary's "2".
        for answer, count in Counter(question.answers).items():
            if answer in self.answer_index:
                targets[self.answer_index[answer]] = soft_score(count)
        return {
            "image": image, "question": question.question, "question_id": question.question_id, "targets": targets,
            "answers": question.answers, "answer_type": question.answer_type,
        }  # fmt: skip


class VQAv2DataModule(VisionLanguageDataModule):
    """VQAv2 in its official layout, METER's fine-tuning data.

    On disk (the official zips and COCO's image folders, extracted into one folder):

        root/v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json
        root/v2_mscoco_{train2014,val2014}_annotations.json
        root/train2014/COCO_train2014_<12-digit image id>.jpg, root/val2014/..., root/test2015/...

    The answer vocabulary is built as METER builds it (`meter/utils/write_vqa.py`): every
    `multiple_choice_answer` of the `answer_splits` (METER: train2014 and val2014, whatever the training
    splits), through METER's `normalize_word`, given by at least `min_answer_count` questions (METER:
    9, giving 3,129); it is cached in `cache_dir` and rebuilt when an annotation file changes. A
    question's target is METER's soft score per vocabulary answer: the human answers counted as written
    (not normalised), 0.3 per annotator who gave it, 1 from four on. Training questions none of whose human
    answers is in the vocabulary are left out, as METER leaves them out (counted and said once);
    evaluation keeps every question. Only the splits a stage needs are read (fit reads the training
    annotations; predict on test-dev reads test-dev questions only), but the vocabulary always needs the
    training annotations: the answer head's size is linked to it (`num_classes`).

    Batches: `{"image" [B, 3, S, S], "question" [str], "question_id" [B], "targets" [B, num_classes],
    "answers" [[str] * 10], "answer_type" [str], "unreadable"}`. An image that cannot be decoded drops its
    question from the batch and is counted (see `BaseDataModule`).

    Args:
        root: dataset folder (see above).
        batch_size: questions per batch in each process.
        img_size: image side (METER's VQA recipe: 576).
        train_splits: annotated splits to train on (METER: train2014 and val2014, minus `holdout`).
        val_split: the annotated split validation and test score.
        holdout: when `val_split` is also a training split, this many of its images, with all their
            questions, are held out of training and are the validation split (METER holds out 1,000 val2014
            images, its `rest_val`, drawn at random; here the last by image id, so the split is fixed).
        predict_split: the split `predict` answers (`test-dev2015` for a test-dev submission).
        min_answer_count: answers given as the main answer of fewer questions are left out.
        answer_splits: the annotated splits whose main answers make the vocabulary (METER: both).
        cache_dir: where the answer vocabulary is cached (default `root/frozenlm_cache`).
        num_workers, pin_memory, max_unreadable_fraction: see
            `BaseDataModule`.
        mean, std: image normalisation (CLIP's).

    Examples:
        >>> from frozenlm.data import VQAv2DataModule
        >>> datamodule = VQAv2DataModule(root="data/vqav2", batch_size=32)  # doctest: +SKIP

        In a config it is the `data:` section (`configs/vqav2_meter.yaml`); `--data.root` points it at your copy.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        img_size: int = 576,
        train_splits: list[str] = ["train2014"],  # noqa: B006 (jsonargparse needs a plain default)
        val_split: str = "val2014",
        holdout: int = 0,
        predict_split: str = "test-dev2015",
        min_answer_count: int = 9,
        answer_splits: list[str] = ["train2014", "val2014"],  # noqa: B006
        cache_dir: str | Path | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        max_unreadable_fraction: float = 0.01,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, max_unreadable_fraction, DOWNLOAD_HINT)
        for split in [*train_splits, val_split, *answer_splits]:
            if split not in ANNOTATED:
                raise ValueError(f"VQAv2 split {split!r} has no public annotations; choose from {ANNOTATED}.")
        if predict_split not in SPLITS:
            raise ValueError(f"Unknown VQAv2 split {predict_split!r}; choose from {SPLITS}.")
        self.train_splits, self.val_split, self.holdout = list(train_splits), val_split, holdout
        self.predict_split = predict_split
        self.min_answer_count, self.answer_splits = min_answer_count, list(answer_splits)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "frozenlm_cache"
        self.mean, self.std = mean, std  # what a model undoing the normalisation reads
        self.transform = clip_transform(img_size, mean, std)
        self.answers = self.answer_vocabulary()
        self.answer_index = {answer: i for i, answer in enumerate(self.answers)}
        self.num_classes = len(self.answers)
        self._questions: dict[str, list[Question]] = {}
        self._said_unanswerable = False

    # -- files -------------------------------------------------------------------------------
    def annotations(self, split: str) -> list[dict[str, Any]]:
        """The annotation entries of an annotated split."""
        path = self.root / annotation_file(split)
        data = read_json(path, DOWNLOAD_HINT)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise DatasetFileError(f"{path} has no 'annotations' list: is it VQAv2's annotation file? {DOWNLOAD_HINT}")
        for entry in data["annotations"]:
            _check_annotation(entry, path)
        return data["annotations"]

    def answer_vocabulary(self) -> list[str]:
        """The answers the head predicts, most frequent first (ties alphabetical); cached."""
        paths = [self.root / annotation_file(s) for s in self.answer_splits]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"VQAv2DataModule: missing {', '.join(missing)}. {DOWNLOAD_HINT}")
        key = json.dumps([[p.name, source_stamp(p)] for p in paths] + [self.min_answer_count])
        cache = self.cache_dir / f"vqav2_answers_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if cache.is_file():
            try:
                return json.loads(cache.read_text())
            except json.JSONDecodeError:
                pass  # rebuilt below
        main_answers = (a["multiple_choice_answer"] for split in self.answer_splits for a in self.annotations(split))
        answers = answer_vocabulary(main_answers, self.min_answer_count)
        if not answers:
            raise DatasetFileError(
                f"No answer is the main answer of {self.min_answer_count} or more questions in "
                f"{', '.join(map(str, paths))}: lower --data.min_answer_count or check the files."
            )
        try:
            write_atomically(cache, json.dumps(answers))
        except OSError:
            pass  # a read-only dataset folder: rebuilt next time (or set --data.cache_dir)
        return answers

    def questions(self, split: str) -> list[Question]:
        """The questions of `split` in question-id order, with their human answers when annotated."""
        if split in self._questions:
            return self._questions[split]
        path = self.root / question_file(split)
        data = read_json(path, DOWNLOAD_HINT)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise DatasetFileError(f"{path} has no 'questions' list: is it a VQAv2 questions file? {DOWNLOAD_HINT}")
        annotations = {}
        if split in ANNOTATED:
            annotations = {a["question_id"]: a for a in self.annotations(split)}  # checked
        for entry in data["questions"]:
            question_id = _typed(entry, "question_id", int, path)
            _typed(entry, "image_id", int, path, question_id)
            _typed(entry, "question", str, path, question_id)
        questions = []
        for entry in sorted(data["questions"], key=lambda q: q["question_id"]):
            question_id = entry["question_id"]
            answers, answer_type = [], ""
            if split in ANNOTATED:
                annotation = annotations.get(question_id)
                if annotation is None:
                    raise DatasetFileError(
                        f"{self.root / annotation_file(split)} has no annotation of question {question_id} of {path}: "
                        f"the two files do not belong together. {DOWNLOAD_HINT}"
                    )
                answers = [a["answer"] for a in annotation["answers"]]
                answer_type = annotation.get("answer_type", "other")
            questions.append(Question(
                question_id, entry["question"], image_path(self.root, split, entry["image_id"]),
                answers, answer_type,
            ))  # fmt: skip
        self._questions[split] = questions
        return questions

    def split_questions(self, stage: str) -> list[Question]:
        """The questions `stage` ("train", "val", "predict") uses, with the holdout applied."""
        if stage == "predict":
            return self.questions(self.predict_split)
        held = self.holdout if self.val_split in self.train_splits else 0
        validation = self.questions(self.val_split)
        images = sorted({q.image for q in validation}, key=lambda path: path.name)  # COCO ids, zero-padded
        held_images = set(images[max(0, len(images) - held) :]) if held else set()
        if stage == "val":
            return [q for q in validation if q.image in held_images] if held else validation
        training = [q for s in self.train_splits for q in self.questions(s) if not (s == self.val_split and q.image in held_images)]
        answerable = [q for q in training if any(a in self.answer_index for a in q.answers)]
        if len(answerable) < len(training) and not self._said_unanswerable and rank_zero_only.rank == 0:
            self._said_unanswerable = True
            print(
                f"VQAv2DataModule: {len(training) - len(answerable)} of {len(training)} training questions have no human answer "
                f"in the {len(self.answers)}-answer vocabulary and are left out of training, as METER leaves them out."
            )
        return answerable

    # -- loaders -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Reads (and so checks) every file `stage` needs before its first batch, and refuses an empty split:
        a malformed annotation stops the run here, never in the middle of an epoch, and an empty validation
        split cannot train unvalidated (no best checkpoint would ever be written)."""
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("val",), "predict": ("predict",)}
        for role in roles.get(stage, ("train", "val", "predict")):
            if not self.split_questions(role):
                self._empty_split(role)

    def _empty_split(self, role: str) -> None:
        if role == "predict":
            raise DatasetFileError(
                f"{self.root / question_file(self.predict_split)} lists no question (--data.predict_split "
                f"{self.predict_split}): nothing to answer. Restore the file from the download or choose another "
                "--data.predict_split."
            )
        if role == "train":
            raise DatasetFileError(
                f"The training questions ({', '.join(str(self.root / question_file(s)) for s in self.train_splits)}, "
                f"--data.train_splits {self.train_splits}) are empty: restore the files from the download or choose "
                "other --data.train_splits."
            )
        raise DatasetFileError(
            f"The validation split is empty: {self.root / question_file(self.val_split)} lists no question "
            f"(--data.val_split {self.val_split}), so no epoch would be validated and no best checkpoint written. "
            "Restore the file from the download, choose another --data.val_split, or hold images of a training "
            "split out with --data.val_split train2014 --data.holdout N."
        )

    def dataset(self, stage: str) -> VQASamples:
        """The samples `stage` ("train", "val", "predict") uses."""
        return VQASamples(self.split_questions(stage), self.answer_index, self.transform)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.dataset("train"))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("val"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dataset("predict"))


def _check_annotation(entry: Any, path: Path) -> None:
    """An annotation entry whose answers are all text (the file names the question when one is not):
    checked as the file is read, so a bad entry never stops an epoch half-way."""
    question_id = _typed(entry, "question_id", int, path)
    _typed(entry, "multiple_choice_answer", str, path, question_id)
    answers = _typed(entry, "answers", list, path, question_id)
    for answer in answers:
        _typed(answer, "answer", str, path, question_id)
    if "answer_type" in entry:
        _typed(entry, "answer_type", str, path, question_id)


def _typed(entry: Any, key: str, kind: type, path: Path, question_id: Any = None) -> Any:
    """`entry[key]` when it is a `kind`; otherwise an error naming the file, the question and the fix."""
    value = _field(entry, key, path)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    where = f"question {question_id}" if question_id is not None else f"an entry ({str(entry)[:80]})"
    expected = {str: "text", int: "an integer", list: "a list"}[kind]
    quote = ' (VQAv2 writes every answer as a string: "2", not 2)' if kind is str and "answer" in key else ""
    raise DatasetFileError(
        f"{path}: {where} has {key} {value!r} ({type(value).__name__}), not {expected}{quote}. Fix the entry "
        "or restore the file from the download (https://visualqa.org/download.html)."
    )


def _field(entry: Any, key: str, path: Path) -> Any:
    """`entry[key]`; a malformed entry raises an error naming the file."""
    try:
        return entry[key]
    except (KeyError, TypeError, IndexError):
        raise DatasetFileError(f"{path}: an entry lacks {key!r} ({str(entry)[:120]}). {DOWNLOAD_HINT}") from None

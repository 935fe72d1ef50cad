"""Prediction files written while `predict` runs: opened (and so checked) before the first batch, and
written as each batch finishes, so an unwritable path costs no work and an interrupted pass keeps
every batch it finished.

A task (or its datamodule) chooses the format by the path's suffix through `prediction_file(path)`;
classifiers write `ClassPredictionsCSV` or `ClassPredictionsJSON`. Under DDP each process
writes its own file, and beside it the position in the split of every sample it wrote (the batches'
`dataset_index`, `MarkedPadding`); at the end process 0 joins them into
the requested one with the format's `merge`, samples back in dataset order: the file a single process
would have written, also when unreadable samples were dropped from some batches.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch

from frozenlm.errors import FrozenLMError
from frozenlm.files import atomic_path


class PredictionOutputError(FrozenLMError, ValueError):
    """The predictions cannot be written where `--predictions.output` says (checked before the first batch)."""


class PredictionFile:
    """One predictions file: `write(prediction)` per batch (the dict a `predict_step` returns),
    `close()` at the end, returning how many predictions were written.

    The constructor checks the suffix against `suffixes` and opens the file for writing, so a path
    whose parent is a file, a directory without write permission or a wrong suffix fails at once.
    `streamed` False keeps the file closed until `close` writes it whole (formats that cannot be
    appended to); the directory is still checked up front.
    """

    suffixes: tuple[str, ...]
    streamed: bool = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.count = Path(path), 0
        self.index_file = None  # the dataset positions of the samples written (under DDP), one line a batch
        if self.path.suffix not in self.suffixes:
            raise PredictionOutputError(
                f"--predictions.output {self.path}: {type(self).__name__} writes {' or '.join(self.suffixes)} files, "
                f"not {self.path.suffix or 'files without a suffix'} (the formats: frozenlm predict --help)."
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.streamed:
                self.file = self.path.open("w", newline="")
            elif not os.access(self.path.parent, os.W_OK) or self.path.is_dir():
                raise PermissionError(f"cannot create a file in {self.path.parent}")
        except OSError as error:
            raise PredictionOutputError(
                f"Cannot write predictions to {self.path} ({type(error).__name__}: {error}); choose another "
                "--predictions.output."
            ) from error
        self.start()

    def start(self) -> None:
        """Write what precedes the first prediction (a header)."""

    def write(self, prediction: dict[str, Any]) -> None:
        raise NotImplementedError

    def write_batch(self, prediction: dict[str, Any], batch: Any) -> None:
        """`write` the predictions of `batch` and, when the batch carries its samples' positions in
        the split (evaluation loaders under DDP), record those of the samples written (the padding that
        evens out the processes' shares is never written) in `index_path`, for `join`."""
        from frozenlm.data.distributed import DATASET_INDEX  # (both packages import this module)
        from frozenlm.tasks.base import BaseTask

        before = self.count
        self.write(prediction)
        if not isinstance(batch, dict) or DATASET_INDEX not in batch:  # one process, or every sample unreadable
            return

        (indices,) = BaseTask.scored(batch, batch[DATASET_INDEX])
        indices = torch.as_tensor(indices).tolist()
        if len(indices) != self.count - before:
            raise RuntimeError(f"{type(self).__name__} wrote {self.count - before} predictions for {len(indices)} samples.")
        if self.index_file is None:
            self.index_file = index_path(self.path).open("w")
        self.index_file.write(json.dumps(indices) + "\n")
        self.index_file.flush()

    def close(self) -> int:
        if self.streamed:
            self.file.close()
        if self.index_file is not None:
            self.index_file.close()
        return self.count

    @classmethod
    def merge(cls, parts: list[Path], path: Path) -> int:
        """Join the files `parts` (process `r` wrote `parts[r]`) into `path`, written atomically, with
        the samples in dataset order (`dataset_order`); returns how many samples it holds."""
        raise NotImplementedError

    @classmethod
    def join(cls, parts: list[Path], path: Path) -> int:
        """`merge`, then remove the processes' files; returns how many samples `path` holds."""
        count = cls.merge(parts, path)
        for part in parts:
            part.unlink()
            index_path(part).unlink(missing_ok=True)
        return count


def index_path(part: Path) -> Path:
    """Where a process's prediction file `part` has the dataset positions of its samples (JSON lists)."""
    return part.with_name(part.name + ".index")


def dataset_order(shares: list[list[Any]], parts: list[Path]) -> list[Any]:
    """The samples of an evaluation split in dataset order from each process's share (`shares[r]`, the
    samples process `r` wrote to `parts[r]`, in the order written), by the positions it recorded
    beside its file (`PredictionFile.write_batch`). (The sampler deals the split round-robin, but a
    share is not every `n`-th sample once unreadable samples were dropped from its batches.)"""
    ordered = []
    for share, part in zip(shares, parts):
        lines = index_path(part).read_text().splitlines() if index_path(part).is_file() else []
        indices = [i for line in lines for i in json.loads(line)]
        if len(indices) != len(share):
            raise PredictionOutputError(
                f"{part} holds {len(share)} samples but {index_path(part)} places {len(indices)}: the files are not "
                "from one predict run; run predict again."
            )
        ordered.extend(zip(indices, share))
    return [sample for _, sample in sorted(ordered, key=lambda pair: pair[0])]


def merge_csv(parts: list[Path], path: Path, key: str) -> int:
    """`PredictionFile.merge` of CSV files whose consecutive rows with the same `key` are one sample."""
    shares, header = [], None
    for part in parts:
        with part.open(newline="") as file:
            reader = csv.reader(file)
            header = next(reader)
            samples: list[list[list[str]]] = []
            for row in reader:
                if samples and samples[-1][0][header.index(key)] == row[header.index(key)]:
                    samples[-1].append(row)
                else:
                    samples.append([row])
        shares.append(samples)
    samples = dataset_order(shares, parts)
    with atomic_path(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(row for sample in samples for row in sample)
    return len(samples)


def class_rows(prediction: dict[str, Any], class_names: list[str] | None) -> list[dict[str, Any]]:
    """One row per sample of a classifier's predict batch: its id, top classes and probabilities."""
    classes = torch.as_tensor(prediction["classes"]).tolist()
    probs = torch.as_tensor(prediction["probs"]).float().tolist()
    rows = []
    for sample_id, top_classes, top_probs in zip(prediction["id"], classes, probs):
        row = {"id": sample_id, "classes": top_classes, "probs": [round(p, 6) for p in top_probs]}
        if class_names is not None:
            row["class_names"] = [class_names[c] for c in top_classes]
        rows.append(row)
    return rows


class ClassPredictionsCSV(PredictionFile):
    """`id, classes, probs[, class_names]` per sample; the lists as JSON. Valid CSV after every batch."""

    suffixes = (".csv",)

    def __init__(self, path: str | os.PathLike, class_names: list[str] | None = None) -> None:
        self.class_names = class_names
        super().__init__(path)

    def start(self) -> None:
        columns = ["id", "classes", "probs"] + (["class_names"] if self.class_names is not None else [])
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        self.writer.writeheader()

    def write(self, prediction: dict[str, Any]) -> None:
        rows = class_rows(prediction, self.class_names)
        self.writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
        self.file.flush()
        self.count += len(rows)

    @classmethod
    def merge(cls, parts: list[Path], path: Path) -> int:
        return merge_csv(parts, path, "id")


class JSONRows(PredictionFile):
    """A JSON array of objects, one sample a line; the closing bracket is rewritten after every batch, so
    the file is valid JSON whenever a batch has finished. A predict batch's rows are `prediction["rows"]`
    unless a subclass says otherwise (`rows`)."""

    suffixes = (".json",)

    def rows(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        return prediction["rows"]

    def start(self) -> None:
        self.file.write("[")
        self._end = self.file.tell()
        self.file.write("\n]\n")
        self.file.flush()

    def write(self, prediction: dict[str, Any]) -> None:
        rows = self.rows(prediction)
        if not rows:
            return
        self.file.seek(self._end)
        self.file.write(("," if self.count else "") + "\n" + ",\n".join(json.dumps(row) for row in rows))
        self._end = self.file.tell()
        self.file.write("\n]\n")
        self.file.truncate()
        self.file.flush()
        self.count += len(rows)

    @classmethod
    def merge(cls, parts: list[Path], path: Path) -> int:
        rows = dataset_order([json.loads(part.read_text()) for part in parts], parts)
        with atomic_path(path) as partial:
            partial.write_text("[" + "".join(("," if i else "") + "\n" + json.dumps(row) for i, row in enumerate(rows)) + "\n]\n")
        return len(rows)


class ClassPredictionsJSON(JSONRows):
    """`{"id", "classes", "probs"[, "class_names"]}` per sample, as `JSONRows`."""

    def __init__(self, path: str | os.PathLike, class_names: list[str] | None = None) -> None:
        self.class_names = class_names
        super().__init__(path)

    def rows(self, prediction: dict[str, Any]) -> list[dict[str, Any]]:
        return class_rows(prediction, self.class_names)

"""GloVe word vectors (Pennington et al., 2014) as SQA3D's ScanQA baseline embeds its texts: the official text
format (``glove.840B.300d.txt``: a word then its floats on each line; ``.txt``, ``.txt.gz`` or the ``.zip``
holding one ``.txt``) and ScanRefer's ``glove.p``, a pickled ``{word: numpy vector}`` dict, read with an
unpickler that builds plain dicts, strings and numpy arrays and refuses anything else before it runs
(:mod:`frozenlm.data.safe_pickle`)."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.safe_pickle import load_arrays

UNKNOWN = "unk"  # the word whose vector stands for every word GloVe does not have (ScanRefer, SQA3D)
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")
GLOVE_HINT = ("Download GloVe (https://nlp.stanford.edu/projects/glove/, glove.840B.300d.zip) or ScanRefer's "
              "glove.p (http://kaldir.vc.in.tum.de/glove.p) and pass its path.")  # fmt: skip


class WordVectors(NamedTuple):
    """A vocabulary and its vectors: ``vectors[i]`` (float32) is the vector of ``words[i]``."""

    words: list[str]
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def embed(self, tokens: Iterable[str], unknown: str = UNKNOWN) -> np.ndarray:
        """``[len(tokens), dim]`` float32: each token's vector, ``unknown``'s for a token not in the vocabulary."""
        index = {word: i for i, word in enumerate(self.words)}
        fallback = index[unknown]
        return self.vectors[[index.get(token, fallback) for token in tokens]].reshape(-1, self.dim)


def load_word_vectors(path: str | Path, keep: Collection[str] | None = None, unknown: str | None = UNKNOWN) -> WordVectors:
    """The word vectors of ``path``: a pickle (``.p``, ``.pkl``, ``.pickle``; read by :func:`read_glove_pickle`)
    or GloVe's text format (:func:`read_glove_text`). ``keep``: only these words (and ``unknown``), to hold a
    task's vocabulary instead of GloVe's 2.2 million words. A file without ``unknown`` (when not None) raises
    :class:`DatasetFileError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"No word-vector file {path}. {GLOVE_HINT}")
    wanted = None if keep is None else set(keep) | ({unknown} if unknown else set())
    reader = read_glove_pickle if path.name.endswith(PICKLE_SUFFIXES) else read_glove_text
    vectors = reader(path, wanted)
    if unknown is not None and unknown not in vectors.words:
        raise DatasetFileError(f"{path} has no vector for {unknown!r}, which words it lacks are given. {GLOVE_HINT}")
    return vectors


@contextmanager
def _text_lines(path: Path) -> Iterator[IO[str]]:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [name for name in archive.namelist() if name.endswith(".txt")]
            if len(members) != 1:
                raise DatasetFileError(f"{path} holds {len(members)} .txt files, not one GloVe file. {GLOVE_HINT}")
            with archive.open(members[0]) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    elif path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as file:
            yield file
    else:
        with open(path, encoding="utf-8") as file:
            yield file


def read_glove_text(path: str | Path, keep: Collection[str] | None = None) -> WordVectors:
    """GloVe's text format: one word a line followed by its floats, separated by single spaces (a word may
    itself hold spaces, as a few of glove.840B's do: the last ``dim`` fields are the vector, ``dim`` taken
    from the first line). ``keep``: only these words. The first occurrence of a word wins. A line with
    another number of floats, or a field that is not a number, raises :class:`DatasetFileError` naming
    the file and line."""
    path = Path(path)
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = None
    try:
        with _text_lines(path) as lines:
            for number, line in enumerate(lines, start=1):
                fields = line.rstrip("\n").rstrip("\r").split(" ")
                if dim is None:
                    dim = _first_dim(fields, path)
                if len(fields) < dim + 1:
                    raise DatasetFileError(f"{path}, line {number}: {len(fields) - 1} values, not {dim}. {GLOVE_HINT}")
                word = " ".join(fields[:-dim])
                if word in seen or (keep is not None and word not in keep):
                    continue
                try:
                    rows.append(np.array(fields[-dim:], dtype=np.float32))
                except ValueError:
                    raise DatasetFileError(f"{path}, line {number}: a value is not a number. {GLOVE_HINT}") from None
                words.append(word)
                seen.add(word)
    except (UnicodeDecodeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise DatasetFileError(f"{path} is not a readable GloVe text file ({type(error).__name__}: {error}). {GLOVE_HINT}") from None
    if dim is None:
        raise DatasetFileError(f"{path} is empty. {GLOVE_HINT}")
    vectors = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return WordVectors(words, vectors)


def _first_dim(fields: list[str], path: Path) -> int:
    """The vector size of GloVe's first line: its trailing fields that are numbers (its word is not one)."""
    count = 0
    for field in reversed(fields[1:]):
        try:
            float(field)
        except ValueError:
            break
        count += 1
    if count == 0:
        raise DatasetFileError(f"{path}, line 1: no vector after the word; not GloVe's text format. {GLOVE_HINT}")
    return count


def read_glove_pickle(path: str | Path, keep: Collection[str] | None = None) -> WordVectors:
    """ScanRefer's ``glove.p``: a pickled dict ``{word: 1-d numpy vector}``, read without running anything it
    asks for (:class:`~frozenlm.data.safe_pickle.ArraysOnlyUnpickler`: a pickle naming any callable but numpy's
    array reconstruction raises :class:`~frozenlm.data.safe_pickle.UnsafePickleError` naming the file). Any
    other content (not a dict of words to equal-length vectors) raises :class:`DatasetFileError`."""
    path = Path(path)
    fix = f"Take glove.p from ScanRefer's download again, or pass GloVe's text file instead. {GLOVE_HINT}"
    try:
        with open(path, "rb") as file:
            table = load_arrays(file, str(path), fix)
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, pickle.UnpicklingError) as error:
        if isinstance(error, DatasetFileError):  # refused by the unpickler: its own message names the file
            raise
        raise DatasetFileError(f"{path} is not a readable pickle ({type(error).__name__}: {error}). {fix}") from None
    if not isinstance(table, dict):
        raise DatasetFileError(f"{path} holds a {type(table).__name__}, not a dict of words to vectors. {fix}")
    words, rows = [], []
    for word, vector in table.items():
        if not isinstance(word, str) or not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise DatasetFileError(f"{path}: the entry {word!r} is not a word with a 1-d numpy vector. {fix}")
        if keep is None or word in keep:
            words.append(word)
            rows.append(vector.astype(np.float32))
    dims = {len(row) for row in rows} or {len(next(iter(table.values()), ()))}
    if len(dims) > 1:
        raise DatasetFileError(f"{path}: vectors of different sizes {sorted(dims)}. {fix}")
    vectors = np.stack(rows) if rows else np.zeros((0, dims.pop()), np.float32)
    return WordVectors(words, vectors)

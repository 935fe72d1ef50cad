"""Reading the datasets that are distributed as pickles (MNIST's `mnist.pkl.gz`, CIFAR-100's python version)
without executing them: an unpickler that resolves numpy's array reconstruction and nothing else, so a pickle
that would call anything (`os.system`, `open`...) is refused before it runs."""

from __future__ import annotations

import importlib
import pickle
from typing import IO, Any

from frozenlm.data.base import DatasetFileError


class UnsafePickleError(DatasetFileError):
    """A pickle that asks for something other than numpy's array reconstruction; it is not executed."""


# What dataset pickles name (protocol 2 from Python 2's numpy; protocols 3-5 from Python 3's), and what each
# resolves to. numpy 2 moved numpy.core to numpy._core; both spellings map to the same function.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS` (plain containers, strings and numbers need none); any other global,
    hence any other callable a REDUCE could call, raises `UnsafePickleError` naming `name` and `fix`
    before it is looked up."""

    def __init__(self, file: IO[bytes], name: str, fix: str):
        super().__init__(file, encoding="latin1")  # Python 2 str payloads are the arrays' raw bytes
        self.name, self.fix = name, fix

    def find_class(self, module: str, name: str):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafePickleError(f"{self.name} asks to call {module}.{name}, which is not numpy's array "
                                    f"reconstruction: refused without running it. {self.fix}")  # fmt: skip
        return getattr(importlib.import_module(target[0]), target[1])

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.name} holds a persistent reference: refused (only plain arrays are read).")


def load_arrays(file: IO[bytes], name: str, fix: str) -> Any:
    """The object a dataset pickle holds (containers of numbers, strings and numpy arrays), read with
    `ArraysOnlyUnpickler`."""
    return ArraysOnlyUnpickler(file, name, fix).load()

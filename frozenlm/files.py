"""Files that are either whole or absent: every cache, result and checkpoint frozenlm writes goes
through :func:`atomic_path`, so a kill, a full disk or two processes writing the same name never leave
a truncated file under a name that readers trust."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` (an atomic replace
    on POSIX and Windows) when the block succeeds, removed when it fails. ``fsync`` flushes the file to
    disk before the rename (checkpoints: the rename must never outlive the data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(partial)
        if fsync:
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as partial:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)


def source_stamp(path: str | os.PathLike) -> str:
    """``size:mtime_ns`` of a file: what a cache entry built from it records, to notice a changed file."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"

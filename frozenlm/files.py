"""Files that are either whole or absent: every cache, result and checkpoint frozenlm writes goes
through `atomic_path`, so a kill, a full disk or two processes writing the same name never leave
a truncated file under a name that readers trust. The files get the permissions `open()` and
`torch.save` would give them (0o666 less the umask, or the directory's default ACL), so a lab's shared
folder stays readable to the group."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` (an atomic replace
    on POSIX and Windows) when the block succeeds, removed when it fails. `fsync` flushes the file to
    disk before the rename (checkpoints: the rename must never outlive the data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = create_partial(path)
    try:
        yield Path(partial)
        if fsync:
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def create_partial(path: Path) -> str:
    """Create a new empty file with a random name beside `path`. Unlike `tempfile.mkstemp` (mode 0o600)
    it is created with mode 0o666, which the kernel reduces by the umask (or a default ACL) as for any
    `open(path, "w")`: renamed into place, the file has the permissions a plain write would give it."""
    for _ in range(100):
        partial = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial"
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return str(partial)
    raise FileExistsError(f"No free temporary name beside {path}")


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as partial:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)


def source_stamp(path: str | os.PathLike) -> str:
    """`size:mtime_ns` of a file: what a cache entry built from it records, to notice a changed file."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

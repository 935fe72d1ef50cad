"""Host memory: keep the memory a training step frees for the next step, instead of returning it to the kernel.

A CPU training step allocates and frees the same tensors every step. glibc's `malloc` returns large
freed blocks to the kernel (blocks above its mmap threshold, and free memory above its trim threshold at
the top of the heap), so the next step's tensors come back as fresh pages, each zeroed by the kernel on
first touch. For VectorNet at batch 32 in a fresh process (23,808 vector rows, many 6 MB activations)
that was about 10,000 page faults per step and a fifth to a quarter of the step's time on 2 CPU threads
(see docs/benchmarks.md); how often it happens depends on what the process freed before.

[`keep_freed_memory`][frozenlm.allocator.keep_freed_memory] tells glibc to take every block from its
heap (no mmap: `M_MMAP_MAX` 0) and never to trim the heap (`M_TRIM_THRESHOLD` -1), as the usual advice of
preloading jemalloc or tcmalloc does, without preloading anything. The previous setting raised the
thresholds instead (mmap at 64 MiB, trim at 1 GiB): larger tensors still came from fresh mappings, and
whenever a step freed more than 1 GiB at the heap's top it went back to the kernel; Point-BERT at 8,192 points and batch 16 (256 MiB-1 GiB activations) took 0.5-1 million
page faults per step that way, none now, and its step 5 % less time. The `frozenlm` command calls it
first (every command: `fit`, `bench`, ...), and so do `benchmarks/motion_step.py` and
`benchmarks/pointcloud_step.py`; call it yourself at the top of a script that trains in Python.
`FROZENLM_KEEP_FREED_MEMORY=0` turns it off. The cost: freed memory is not returned to the kernel while
the process runs, so its resident size stays at its peak (as PyTorch's caching allocator does on a GPU),
plus what the heap cannot reuse (8.2 against 7.3 GB peak in that run). Only glibc (Linux) has these
settings; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "FROZENLM_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory: every block from the heap (never a fresh mmap),
    and the heap never trimmed. True when applied; False where there is no glibc or
    `FROZENLM_KEEP_FREED_MEMORY=0`.

    Process-wide and harmless to repeat. Loader processes forked after the call inherit it.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not _glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # Either setting made by hand also turns off glibc's own adjustment of its thresholds.
    if not libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0)):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(-1)))  # -1: never trim (mallopt(3))


def _glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library itself, no file read)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False

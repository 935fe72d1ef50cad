"""Host memory: keep the memory a training step frees for the next step, instead of returning it to the kernel.

A CPU training step allocates and frees the same tensors every step. glibc's `malloc` returns large
freed blocks to the kernel (blocks above its mmap threshold, and free memory above its trim threshold at
the top of the heap), so the next step's tensors come back as fresh pages, each zeroed by the kernel on
first touch. For VectorNet at batch 32 in a fresh process (23,808 vector rows, many 6 MB activations)
that was about 10,000 page faults per step and a fifth to a quarter of the step's time on 2 CPU threads
(see docs/benchmarks.md); how often it happens depends on what the process freed before.

[`keep_freed_memory`][frozenlm.allocator.keep_freed_memory] raises both thresholds with `mallopt`, as
the usual advice of preloading jemalloc or tcmalloc does, without preloading anything. The `frozenlm`
command calls it first (every command: `fit`, `bench`, ...), and so do `benchmarks/motion_step.py` and
`benchmarks/pointcloud_step.py`; call it yourself at the top of a script that trains in Python.
`FROZENLM_KEEP_FREED_MEMORY=0` turns it off. The cost: a process holds up to `keep` bytes of freed memory beyond what it uses (its resident
size stays near its peak). Only glibc (Linux) has these settings; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "FROZENLM_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(block: int = 64 << 20, keep: int = 1 << 30) -> bool:
    """Make glibc's malloc reuse freed memory: blocks up to `block` bytes come from the heap (not a fresh
    mmap each), and up to `keep` bytes free at the heap's top stay there. True when applied; False where
    there is no glibc or `FROZENLM_KEEP_FREED_MEMORY=0`.

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
    # Setting either threshold by hand turns off glibc's own adjustment of both, so set both.
    if not libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(block)):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(keep)))


def _glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library itself, no file read)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (musl, macOS)
        return False

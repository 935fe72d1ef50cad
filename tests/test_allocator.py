"""frozenlm.allocator: freed host memory kept for the next step (glibc), what the `frozenlm` command applies first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import frozenlm.cli
from frozenlm import allocator

# A training step in miniature: two 160 MiB activations made and freed, twenty times (glibc's default maps
# blocks above 32 MiB afresh each time, and so did the previous setting's 64 MiB threshold). Printed: how many of the last eight rounds faulted in fresh pages
# for at least half of their tensors (the kernel handing out new, zeroed pages; the heap settles in the
# first few rounds).
ROUNDS = textwrap.dedent(
    """
    import resource, sys
    import torch
    from frozenlm.allocator import keep_freed_memory

    applied = keep_freed_memory()
    counts = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        tensors = [torch.ones(40 << 20) for _ in range(2)]  # 2 x 160 MiB, each page touched
        del tensors
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, sum(count > (160 << 20) // 4096 for count in counts[-8:]))
    """
)


def _faulting_rounds(keep: str) -> tuple[str, int]:
    env = {**os.environ, allocator.ENV: keep}
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True).stdout
    applied, rounds = out.split()
    return applied, int(rounds)


@pytest.mark.skipif(not allocator._glibc(), reason="mallopt's thresholds are glibc's")
def test_kept_memory_is_reused_without_fresh_pages_and_returned_memory_is_not():
    applied, kept = _faulting_rounds("1")
    assert applied == "True"
    off, returned = _faulting_rounds("0")
    assert off == "False"
    assert returned >= 6  # glibc's default gave the memory back and faulted it in again, round after round
    assert kept <= 2  # reused: no fresh pages once the heap has settled


def test_the_variable_turns_it_off_and_the_command_applies_it_first(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory() is False
    calls = []
    monkeypatch.setattr(frozenlm.cli, "keep_freed_memory", lambda: calls.append(True))
    with pytest.raises(SystemExit):
        frozenlm.cli.run(["bench", "--help"])
    assert calls == [True]

"""The start of a run on several processes: say what a process waits for while the others have not come,
and give up after a limit with one line.

Under DDP every process first meets the others at the main process's address (`MASTER_ADDR` and
`MASTER_PORT`, set by the cluster, torchrun or by hand; Lightning sets them for the processes it
starts on one node). PyTorch waits there silently, for 30 minutes by default, when a node never comes
(a wrong `NODE_RANK`, a node that failed to start, a blocked port). `Rendezvous` watches that
wait from a thread of each process: every `log_every` seconds it prints the address, this process's
rank, and which ranks have arrived (each process, once it reaches the main process, leaves its rank in
the main process's store); after `timeout` seconds it ends the process with
`ProcessesMissingError` in one line (exit status 2).
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed

from frozenlm.errors import FrozenLMError

# The key under which each process leaves its host in the main process's store.
PRESENT_KEY = "frozenlm/rendezvous/rank{}"


class ProcessesMissingError(FrozenLMError, TimeoutError):
    """Not every process of a multi-process run came within `--rendezvous.timeout` seconds."""


class Rendezvous:
    """How long a process of a multi-process run (DDP) waits for the others, and how often it says so.

    Args:
        timeout: seconds to wait for every process to arrive before the run stops with
            `ProcessesMissingError` (PyTorch's own limit is 1800).
        log_every: seconds between two lines saying what the process waits for (the address, this
            process's rank, the ranks present and missing).
    """

    def __init__(self, timeout: float = 1800.0, log_every: float = 30.0) -> None:
        if timeout <= 0 or log_every <= 0:
            raise ValueError(f"rendezvous timeout and log_every must be positive, got {timeout} and {log_every}.")
        self.timeout, self.log_every = timeout, log_every

    @contextmanager
    def watch(self, trainer: Any):
        """Watch this thread's wait for the other processes while the block runs (a trainer command), when the
        trainer has several processes."""
        if trainer.world_size == 1:
            yield
            return
        done = threading.Event()
        args = (threading.get_ident(), trainer.strategy, trainer.world_size, done)
        threading.Thread(target=self._watch, args=args, daemon=True, name="frozenlm-rendezvous").start()
        try:
            yield
        finally:
            done.set()

    def _watch(self, waiter: int, strategy: Any, world_size: int, done: threading.Event) -> None:
        start = store = None
        while not done.wait(0.5) and not torch.distributed.is_initialized():
            if start is None:  # the wait starts when the strategy calls init_process_group, its ranks set
                if not _calling(waiter, "init_process_group"):
                    continue
                start = last_log = time.monotonic()
            address, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), strategy.global_rank
            if store is None and address and port:
                store = _connect(address, int(port), rank)
            now = time.monotonic()
            if now - start < self.timeout and now - last_log < self.log_every:
                continue
            last_log = now
            present = _present(store, world_size)
            if present is None:
                state = f"the main process's address {address}:{port} is not reachable yet"
            else:
                state = f"at {address}:{port} ranks {present} are present, {[r for r in range(world_size) if r not in present]} missing"
            if torch.distributed.is_initialized():
                return
            if now - start >= self.timeout:
                error = ProcessesMissingError(
                    f"process {rank} of {world_size} waited {now - start:.0f} s for the others and gives up: {state}. Start "
                    "every node with the same MASTER_ADDR, MASTER_PORT and --trainer.num_nodes and its own NODE_RANK, and "
                    "open the port between the nodes; --rendezvous.timeout SECONDS waits longer."
                )
                print(f"frozenlm: error: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                os._exit(2)  # the main thread is blocked in PyTorch's wait, and nothing has run yet
            print(f"frozenlm: process {rank} of {world_size} has waited {now - start:.0f} s for the other processes: {state} "
                  f"(gives up after --rendezvous.timeout {self.timeout:g} s)", file=sys.stderr, flush=True)  # fmt: skip


def _calling(thread: int, function: str) -> bool:
    """Whether `thread` is inside a Python function named `function`."""
    frame = sys._current_frames().get(thread)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _connect(address: str, port: int, rank: int):
    """A client of the main process's store with this process's rank left in it, or None while it is not reachable."""
    try:
        socket.create_connection((address, port), timeout=1).close()  # quietly first: TCPStore logs each failure
        store = torch.distributed.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=5),
                                           wait_for_workers=False)  # fmt: skip
        store.set(PRESENT_KEY.format(rank), socket.gethostname())
    except Exception:  # noqa: BLE001 - not listening yet, refused, or timed out: try again later
        return None
    return store


def _present(store, world_size: int) -> list[int] | None:
    """The ranks that have reached the main process's store; None when it cannot be asked."""
    if store is None:
        return None
    try:
        return [r for r in range(world_size) if store.check([PRESENT_KEY.format(r)])]
    except Exception:  # noqa: BLE001 - the main process went away
        return None


def release_processes() -> None:
    """Leave the run's process group at the end of a trainer command, while Python is whole.

    Lightning leaves a gloo process group to the interpreter's exit (it destroys NCCL's only), so gloo's
    worker threads outlive the command into the interpreter's teardown. A C++ thread that then needs the
    GIL (one still releasing the tensors of the last collective) is ended by the finalising interpreter in
    a way C++ turns into `std::terminate`: "terminate called without an active exception", status 134
    (reported for about 1 run in 26 of 2 simulated nodes; PyTorch's own gloo tests met the same abort for
    the same reason, pytorch/pytorch#65231). Destroying the group joins those threads first (the DDP
    wrapper that also holds it is gone once Lightning's teardown unwrapped the model; a collection
    catches any cycle that still holds it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        gc.collect()

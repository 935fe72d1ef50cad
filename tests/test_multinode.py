"""Several nodes, simulated on this machine: 2 "nodes" of 1 process each, started as a cluster starts
them (MASTER_ADDR, MASTER_PORT and NODE_RANK in the environment, `--trainer.num_nodes 2`), gloo on the
CPU, one output folder shared by both as on a cluster's shared filesystem. The run must be the 2-process
single-node run, bit for bit, with its logs and checkpoints written once."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from tests.cli_helpers import (
    cli_command,
    finish,
    free_port,
    last_checkpoint,
    load_checkpoint,
    run_cli_subprocess,
    start_cli_subprocess,
)


def outputs(root: Path) -> list[str]:
    """Every file a run wrote under ``root``, relative (event files named by kind only)."""
    names = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(root))
            names.append(name.split("events.out.tfevents")[0] + "events" if "tfevents" in name else name)
    return names


def test_two_nodes_of_one_process_train_like_two_processes_on_one_node(tmp_path, tiny_llama_checkpoint):
    args = ["--model.llm.checkpoint", str(tiny_llama_checkpoint), "--trainer.strategy", "ddp", "--trainer.accelerator",
            "cpu", "--trainer.max_epochs", "1"]  # fmt: skip
    single = run_cli_subprocess("fit", "image_llama", tmp_path / "single", *args, "--trainer.devices", "2")
    assert single.returncode == 0, single.stderr[-3000:]

    command = cli_command("fit", "image_llama", tmp_path / "nodes", *args, "--trainer.devices", "1", "--trainer.num_nodes", "2")
    port = str(free_port())
    nodes = [start_cli_subprocess(command, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank)) for rank in (0, 1)]
    for node in [finish(node) for node in nodes]:
        assert node.returncode == 0, node.stderr[-3000:]

    expected, state = (load_checkpoint(last_checkpoint(tmp_path / run)) for run in ("single", "nodes"))
    assert state["global_step"] == expected["global_step"] == 3
    assert expected["state_dict"].keys() == state["state_dict"].keys()
    assert all((state["state_dict"][k] == v).all() for k, v in expected["state_dict"].items())
    # One version folder, one event file, one of each checkpoint: written by process 0 only.
    assert outputs(tmp_path / "nodes") == outputs(tmp_path / "single")
    assert len([name for name in outputs(tmp_path / "nodes") if name.endswith("events")]) == 1


def test_a_node_whose_peer_never_comes_says_what_it_waits_for_and_stops_after_the_limit(tmp_path):
    """1 of 2 nodes started, each alone in its own world: node 0 (the main process, whose store node 1 never
    reaches) and node 1 (whose main process never listens). Both say every second what they wait for and
    stop after 3 s with one line."""
    command = cli_command("validate", "image_baseline", tmp_path, "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                          "--trainer.devices", "1", "--trainer.num_nodes", "2", "--rendezvous.timeout", "3",
                          "--rendezvous.log_every", "1")  # fmt: skip
    ports = [str(free_port()), str(free_port())]
    nodes = [start_cli_subprocess(command, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(rank))
             for rank, port in enumerate(ports)]  # fmt: skip
    for rank, (port, node) in enumerate(zip(ports, [finish(node, timeout=300) for node in nodes])):
        assert node.returncode == 2, node.stderr[-3000:]
        lines = node.stderr.strip().splitlines()
        assert lines[-1].startswith(f"frozenlm: error: ProcessesMissingError: process {rank} of 2 waited "), lines[-5:]
        assert "--rendezvous.timeout SECONDS" in lines[-1] and "Traceback" not in node.stderr
        waiting = [line for line in lines if line.startswith(f"frozenlm: process {rank} of 2 has waited")]
        assert len(waiting) >= 2, lines[-10:]
        state = f"at 127.0.0.1:{port} ranks [0] are present, [1] missing" if rank == 0 else \
            f"the main process's address 127.0.0.1:{port} is not reachable yet"  # fmt: skip
        assert all(state in line for line in waiting + lines[-1:]), waiting


class CollectiveStillRunningAtTheEnd(Callback):
    """As validation ends, starts an all-reduce whose completion runs Python on gloo's worker thread for 3 s,
    so that the thread still needs the interpreter when the command returns (as one releasing the tensors
    of a run's last collective can, rarely: the status-134 abort at exit, 1 run in 26 of 2 simulated nodes)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        work = torch.distributed.all_reduce(torch.ones(1), async_op=True)
        work.get_future().then(lambda _: time.sleep(3))


def test_a_collective_still_running_when_the_command_ends_does_not_abort_the_exit(tmp_path):
    """The process group is left (gloo's threads joined) before the interpreter is torn down; without that,
    both processes end with "terminate called without an active exception" (status 134)."""
    result = run_cli_subprocess("validate", "image_baseline", tmp_path, "--trainer.strategy", "ddp", "--trainer.accelerator",
                                "cpu", "--trainer.devices", "2", "--trainer.callbacks+=tests.test_multinode.CollectiveStillRunningAtTheEnd")  # fmt: skip
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]

"""Several nodes, simulated on this machine: 2 "nodes" of 1 process each, started as a cluster starts
them (MASTER_ADDR, MASTER_PORT and NODE_RANK in the environment, `--trainer.num_nodes 2`), gloo on the
CPU, one output folder shared by both as on a cluster's shared filesystem. The run must be the 2-process
single-node run, bit for bit, with its logs and checkpoints written once."""

from __future__ import annotations

from pathlib import Path

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

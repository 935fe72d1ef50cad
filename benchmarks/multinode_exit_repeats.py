"""Exit statuses of the simulated 2-node Argoverse 1 run, repeated: 2 "nodes" of 1 process each on this
machine (MASTER_ADDR=127.0.0.1, MASTER_PORT, NODE_RANK, `--trainer.num_nodes 2`, gloo), both
preprocessing a fresh Argoverse 1 cache (24 scenes, 2 loader workers each), one epoch of VectorNet.
Counts each node's exit status over the repeats and keeps the output of every run that did not exit 0
(an abort at exit once ended about 1 run in 26 with status 134, "terminate called without an active
exception")::

    nice -n 19 python benchmarks/multinode_exit_repeats.py --repeats 120 [--keep FOLDER]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cli_helpers import cli_command, finish, free_port, start_cli_subprocess  # noqa: E402
from tests.data.argoverse1.data import write as write_argoverse1  # noqa: E402


def two_nodes(root: Path, run: Path, workers: int) -> list:
    """One simulated 2-node fit on a fresh cache; the two nodes' completed processes."""
    shutil.rmtree(root / "frozenlm_cache", ignore_errors=True)
    command = cli_command(
        "fit", "motion_llama", run, "--model.llm", "null", "--model.horizon", "30", "--data", "frozenlm.data.Argoverse1DataModule",
        "--data.root", str(root), "--data.batch_size", "2", "--data.num_workers", str(workers),
        "--trainer.max_epochs", "1", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.num_nodes", "2",
    )  # fmt: skip
    port = str(free_port())
    # faulthandler prints every thread's Python stack if a node aborts (SIGABRT), which names the culprit.
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONFAULTHANDLER": "1"}
    nodes = [start_cli_subprocess(command, **env, NODE_RANK=str(rank)) for rank in (0, 1)]
    return [finish(node, timeout=900) for node in nodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2, help="loader workers per node")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the output of runs that did not exit 0")
    parser.add_argument("--stop-at-first", action="store_true", help="stop at the first run that does not exit 0")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="multinode_exit_"))
    keep.mkdir(parents=True, exist_ok=True)
    statuses: collections.Counter = collections.Counter()
    bad = 0
    with tempfile.TemporaryDirectory() as folder:
        root = write_argoverse1(Path(folder) / "av1", {"train": 16, "val": 8, "test_obs": 2})
        for repeat in range(1, args.repeats + 1):
            start = time.monotonic()
            nodes = two_nodes(root, Path(folder) / f"run{repeat}", args.workers)
            shutil.rmtree(Path(folder) / f"run{repeat}", ignore_errors=True)
            codes = [node.returncode for node in nodes]
            for rank, code in enumerate(codes):
                statuses[(rank, code)] += 1
            if any(codes):
                bad += 1
                for rank, node in enumerate(nodes):
                    (keep / f"repeat{repeat}.node{rank}.status{node.returncode}.err").write_text(node.stderr)
                    (keep / f"repeat{repeat}.node{rank}.status{node.returncode}.out").write_text(node.stdout)
            print(f"repeat {repeat}: exit statuses {codes} ({time.monotonic() - start:.0f} s); "
                  f"{bad} of {repeat} runs not clean", flush=True)  # fmt: skip
            if bad and args.stop_at_first:
                break
    print(f"{repeat} runs, {repeat - bad} clean, {bad} not; exit statuses (node, status): "
          + ", ".join(f"node {r} status {c}: {n}" for (r, c), n in sorted(statuses.items())))  # fmt: skip
    print(f"output of the runs that did not exit 0: {keep}")


if __name__ == "__main__":
    main()

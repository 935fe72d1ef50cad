"""Motion forecasting: preprocessing throughput, data loading against the training step, and the step
against its FLOP ideal.

All in one run and one process:

* `preprocess`: scenes per second turned from Argoverse 2 files (parquet + map JSON, read with av2)
  into cached tensors, by `--workers` loader processes (the datamodule's own preprocessing);
* `load`: ms per batch of `--batch` cached scenes through the DataLoader and collation (what a
  training step waits for when the loader does not keep up), and the fraction of the batch's vector
  slots that hold real vectors (agents and map polylines are padded apart, each to its own longest);
* `step`: MotionForecaster's forward + backward on that batch (`--llm`: with a frozen
  LLaMA-7B-shaped layer over all tokens, random weights), and `ideal`: one `torch.matmul` of the
  step's FLOPs (PyTorch's `FlopCounterMode`), timed in turns with the step (step, matmul, step, ...;
  the medians of `--repeats` each after a warm-up), at each of `--threads` CPU thread counts.

Without `--root` it writes `--scenes` synthetic scenarios in the official layout (the test suite's
writer: 3 agents and ~15 lanes per scene, smaller than real Argoverse 2 scenes, which hold tens of
agents and lanes); point `--root` at real data for real figures, or `--scenario` at one real
scenario's folder (its `scenario_<id>.parquet` and `log_map_archive_*.json`, e.g. the one in the
av2-api repository's `tests/unit/test_data/forecasting_scenarios/`) to time a batch of `--batch`
copies of it under as many scenario ids::

    python benchmarks/motion_step.py [--root <argoverse2> | --scenario <folder>] [--threads 1,2] [--device cuda] [--llm]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from frozenlm.allocator import keep_freed_memory
from frozenlm.data import Argoverse2DataModule
from frozenlm.llm import FrozenLMBlock
from frozenlm.llm.families import SHAPES
from frozenlm.measure import flop_counter, median_seconds, step_and_ideal_seconds
from frozenlm.models import polyline_kernel
from frozenlm.tasks import MotionForecaster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an Argoverse 2 folder; default: synthetic scenes")
    parser.add_argument("--scenario", type=Path, help="one Argoverse 2 scenario's folder, copied --batch times")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm", action="store_true", help="a frozen LLaMA-7B-shaped layer inline")
    parser.add_argument("--full-map", action="store_true", help="lane boundaries and crosswalks too")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (and ideal matmuls), after a warm-up")
    parser.add_argument("--threads", default=None, help="CPU thread counts, e.g. 1,2 (default: torch's)")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the frozenlm command does (frozenlm.allocator)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp())
    try:
        root = args.root
        if args.scenario is not None:
            root = copy_scenario(args.scenario, work / "argoverse2", args.batch)
        elif root is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.data.argoverse2.data import write

            root = write(work / "argoverse2", {"train": args.scenes})
        data = Argoverse2DataModule(root, cache_dir=work / "cache", batch_size=args.batch, num_workers=args.workers,
                                    lane_boundaries=args.full_map, crosswalks=args.full_map)  # fmt: skip
        count = len(data.scene_sources("train"))
        start = time.perf_counter()
        dataset = data.dataset("train")
        preprocess = count / (time.perf_counter() - start)

        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=data.collate_fn)
        iterator = iter(loader)

        def load():
            nonlocal iterator
            try:
                return next(iterator)
            except StopIteration:
                iterator = iter(loader)
                return next(iterator)

        load_s = median_seconds(load, torch.device("cpu"), args.repeats)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in load().items()}
        model = MotionForecaster(horizon=data.horizon).to(device).train()
        if args.llm:  # inline over all tokens, with random weights of LLaMA-7B's layer shape
            dim = model.model.backbone.dim
            model.model.llm_block = FrozenLMBlock.from_config(SHAPES["llama-7b"].config(), in_dim=dim).to(device)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model.forecast_loss(*model(batch), batch["target"]).backward()

        with flop_counter() as counter:
            step()
        flops = counter.get_total_flops()
        tokens = batch["polyline_mask"].shape[1]
        masks = [batch["agent_mask"], batch["map_mask"]]  # each group padded to its own longest polyline
        real = float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks))
        source = f"copies of {args.scenario.name}" if args.scenario else "real" if args.root else "synthetic"
        print(f"device {device}, {count} scenes ({source}), batch {args.batch} ({tokens} polyline tokens), "
              f"LLM block {'yes' if args.llm else 'no'}, {args.repeats} timed steps each, freed memory {'kept' if kept else 'returned'}, "
              f"subgraph {'fused CPU kernel' if polyline_kernel.usable(batch['agent_vectors']) else 'PyTorch operations'}")  # fmt: skip
        print("threads | preprocess scenes/s | load ms/batch | real vector slots | GFLOP | step ms | ideal ms | step/ideal | load/step")
        for threads in [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            step_s, ideal_s = step_and_ideal_seconds(step, flops, device, args.repeats)
            print(f"{threads} | {preprocess:.1f} | {load_s * 1e3:.1f} | {real:.0%} | {flops / 1e9:.2f} | {step_s * 1e3:.1f} | "
                  f"{ideal_s * 1e3:.1f} | {step_s / ideal_s:.2f} | {load_s / step_s:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def copy_scenario(folder: Path, root: Path, copies: int) -> Path:
    """An Argoverse 2 root whose train split holds `copies` copies of the scenario in `folder`, each under
    its own id (`copy-0000`, ...): a batch of real scene sizes from the one scenario at hand."""
    parquet = next(folder.glob("scenario_*.parquet"), None)
    maps = sorted(folder.glob("log_map_archive_*.json"))
    if parquet is None or not maps:
        raise SystemExit(f"{folder} holds no scenario_<id>.parquet and log_map_archive_*.json: not an Argoverse 2 scenario.")
    for index in range(copies):
        scene = root / "train" / f"copy-{index:04d}"
        scene.mkdir(parents=True)
        shutil.copyfile(parquet, scene / f"scenario_copy-{index:04d}.parquet")
        shutil.copyfile(maps[0], scene / f"log_map_archive_copy-{index:04d}.json")
    return root


if __name__ == "__main__":
    main()

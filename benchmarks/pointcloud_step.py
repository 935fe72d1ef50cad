"""Point-cloud training step: grouping (FPS + kNN) and sampling as a fraction of the step, and the step
against its FLOP ideal.

For each setting (default: batch 32 at 1,024 points / 64 groups and at 8,192 points / 512 groups, as
Point-BERT's ModelNet40 configs), all in one run and one process, interleaved:

* `fps_loop` / `fps_fpsample`: FPS of the group centres with the plain-PyTorch loop and with the
  `fpsample` package (same indices), side by side;
* `grouping`: FPS + kNN + gathering, as the model runs it (`fpsample` on the CPU when installed);
* `sampling`: the datamodule's training sampling of the batch (FPS to `num_points x 75/64`, random
  subset, scale and translate), done on the device before the step;
* `step`: the full-size Point-BERT classifier's forward + backward (grouping included), and
  `ideal`: one `torch.matmul` of the step's matmul/conv FLOPs (counted by PyTorch's
  `FlopCounterMode`), timed in turns with the step (step, matmul, step, ...; the medians of
  `--repeats` each after a warm-up). `--llm` adds a frozen LLaMA-7B-shaped layer (random
  weights, fp32) inline, as LM4VE.

Ratios are the point: absolute times depend on the machine. `--threads` sets the CPU thread counts
(one row each; one thread gives the most stable numbers)::

    python benchmarks/pointcloud_step.py [--threads 1] [--settings 8192:512] [--device cpu|cuda] [--llm] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from frozenlm.allocator import keep_freed_memory
from frozenlm.data.pointcloud import PointCloudDataModule
from frozenlm.llm import FrozenLMBlock
from frozenlm.llm.families import SHAPES
from frozenlm.measure import flop_counter, median_seconds, step_and_ideal_seconds
from frozenlm.models import point_ops
from frozenlm.models.pointbert import PointBERTClassifier, PointBERTClassifierConfig


def measure(points: int, groups: int, batch: int, device: torch.device, llm: bool, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    cloud = torch.randn(batch, points, 3, generator=generator).to(device)
    raw = torch.randn(batch, max(points, 2048), 3, generator=generator).to(device)  # a dataset's stored clouds
    model = PointBERTClassifier(PointBERTClassifierConfig(num_classes=40, num_groups=groups, group_size=32))
    if llm:  # inline after the last block (llm_position -1), with random weights of LLaMA-7B's layer shape
        model.llm_block = FrozenLMBlock.from_config(SHAPES["llama-7b"].config(), in_dim=384)
    model = model.to(device).train()
    labels = torch.randint(0, 40, (batch,), generator=generator).to(device)
    datamodule = PointCloudDataModule(batch_size=batch, num_points=points, num_workers=0)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(cloud), labels).backward()

    with flop_counter() as counter:
        step()
    flops = counter.get_total_flops()
    step_s, ideal_s = step_and_ideal_seconds(step, flops, device, repeats)
    results = {
        "fps_loop": median_seconds(lambda: point_ops.farthest_point_sample(cloud, groups, use_fpsample=False), device, repeats),
        "grouping": median_seconds(lambda: point_ops.group_points(cloud, groups, 32), device, repeats),
        "sampling": median_seconds(lambda: datamodule.random_views(raw, 1), device, repeats),
        "step": step_s,
        "ideal": ideal_s,
        "gflop": flops / 1e9,
    }
    if point_ops.fpsample is not None and device.type == "cpu":
        results["fps_fpsample"] = median_seconds(lambda: point_ops.farthest_point_sample(cloud, groups, use_fpsample=True), device, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--settings", default="1024:64,8192:512", help="points:groups pairs")
    parser.add_argument("--llm", action="store_true", help="a frozen LLaMA-7B-shaped layer inline")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (and ideal matmuls), after a warm-up")
    parser.add_argument("--threads", default=None, help="CPU thread counts, e.g. 1,2 (default: torch's)")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the frozenlm command does (frozenlm.allocator)
    device = torch.device(args.device)
    print(f"device {device}, batch {args.batch}, {args.repeats} timed steps each, fpsample "
          f"{'installed' if point_ops.fpsample else 'not installed'}, LLM block {'yes' if args.llm else 'no'}, freed memory "
          f"{'kept' if kept else 'returned'}")
    header = ("threads", "points", "groups", "GFLOP", "step ms", "ideal ms", "step/ideal", "grouping ms", "grouping/step",
              "sampling ms", "sampling/step", "FPS loop ms", "FPS fpsample ms")  # fmt: skip
    print(" | ".join(header))
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for threads, setting in [(t, s) for t in thread_counts for s in args.settings.split(",")]:
        torch.set_num_threads(threads)
        points, groups = map(int, setting.split(":"))
        r = measure(points, groups, args.batch, device, args.llm, args.repeats)
        fpsample_ms = f"{r['fps_fpsample'] * 1e3:.0f}" if "fps_fpsample" in r else "-"
        print(" | ".join([
            str(threads), str(points), str(groups), f"{r['gflop']:.0f}", f"{r['step'] * 1e3:.0f}", f"{r['ideal'] * 1e3:.0f}",
            f"{r['step'] / r['ideal']:.2f}", f"{r['grouping'] * 1e3:.0f}", f"{r['grouping'] / r['step']:.3f}",
            f"{r['sampling'] * 1e3:.0f}", f"{r['sampling'] / r['step']:.3f}", f"{r['fps_loop'] * 1e3:.0f}", fpsample_ms,
        ]))  # fmt: skip


if __name__ == "__main__":
    main()

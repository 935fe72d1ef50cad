"""The point ops' share of a PointNet++ backbone step at SQA3D's input size (40,000 points per scene).

ScanQA's detector backbone (VoteNet's PointNet++, sizes from SQA3D's `ScanQA/`): four set-abstraction
layers (points / radius / nsample: 2048 / 0.2 / 64, 1024 / 0.4 / 32, 512 / 0.8 / 16, 256 / 1.2 / 16; MLPs
[c,64,64,128], [128,128,256] x 3, +3 xyz each, xyz / radius) and two feature-propagation layers
([512,256,256] each). The backbone is built here from those sizes (1x1 convs without bias, BN, ReLU,
max over each ball) around `frozenlm.models.point_ops`; its forward + backward is the step, and the
ops are timed inside it:

* `fps`: FPS of each SA layer (the loop; on the CPU also through `fpsample`, as the model would use);
* `ball_query`: the ball queries and grouping (gathers) of each SA layer;
* `three_nn`: three_nn + interpolation of the FP layers;
* `step`: the backbone's forward + backward (the ops included; FPS through the default path).

One JSON line per batch size. Ratios are the point: absolute times depend on the machine. One thread
for stable numbers::

    OMP_NUM_THREADS=1 python benchmarks/point_ops.py [--device cpu|cuda] [--batches 2,8] [--points 40000]

`--model scanqa` times the whole ScanQA model instead (`frozenlm.models.ScanQA` at the reference's
sizes, 706 answers, no frozen block; its answer, situation and box outputs summed as the loss): the step is
its forward + backward, the ops are timed by wrapping the point-op functions the model module calls (FPS of
the four SA layers and of the vote aggregation, ball query + grouping, three_nn + interpolation, gathers of
the centres); the ops' backward (scatters of the gathers) counts in the step, not in the ops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from frozenlm.measure import median_seconds
from frozenlm.models import point_ops

SA = ((2048, 0.2, 64, (64, 64, 128)), (1024, 0.4, 32, (128, 128, 256)), (512, 0.8, 16, (128, 128, 256)),
      (256, 1.2, 16, (128, 128, 256)))  # fmt: skip


def mlp(sizes: list[int], conv: type) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [conv(a, b, 1, bias=False), (nn.BatchNorm2d if conv is nn.Conv2d else nn.BatchNorm1d)(b), nn.ReLU()]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """PointNet++ as VoteNet / ScanQA size it, on point_ops; `timings` accumulates the ops' seconds."""

    def __init__(self, in_features: int = 4, scale: float = 1.0) -> None:
        super().__init__()
        self.sa = [(max(1, int(n * scale)), r, k) for n, r, k, _ in SA]
        widths = [in_features] + [m[-1] for *_, m in SA]
        self.sa_mlps = nn.ModuleList(mlp([widths[i] + 3, *SA[i][3]], nn.Conv2d) for i in range(4))
        self.fp_mlps = nn.ModuleList([mlp([256 + 256, 256, 256], nn.Conv1d), mlp([256 + 256, 256, 256], nn.Conv1d)])
        self.timings: dict[str, float] = {}

    def timed(self, name: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        xyz, features = points[..., :3].contiguous(), points[..., 3:].transpose(1, 2).contiguous()
        levels = [(xyz, features)]
        for (count, radius, nsample), layer in zip(self.sa, self.sa_mlps):
            indices = self.timed("fps", lambda: point_ops.farthest_point_sample(xyz, count).to(xyz.device))
            centres = point_ops.gather_points(xyz, indices)
            grouped, _ = self.timed("ball_query", lambda: point_ops.query_and_group(
                xyz, centres, features, radius, nsample, normalize_xyz=True))  # fmt: skip
            xyz, features = centres, layer(grouped).max(dim=-1).values
            levels.append((xyz, features))
        features = levels[4][1]
        for i, layer in enumerate(self.fp_mlps):  # sa4 -> sa3, then sa3 -> sa2
            known, (unknown, skip) = levels[4 - i][0], levels[3 - i]

            def interpolate():
                distances, idx = point_ops.three_nn(unknown, known)
                return point_ops.three_interpolate(features, idx, point_ops.interpolation_weights(distances))

            features = layer(torch.cat([self.timed("three_nn", interpolate), skip], dim=1))
        return features


def measure(batch: int, points: int, device: torch.device, repeats: int, scale: float) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    cloud = torch.cat([torch.rand(batch, points, 3, generator=generator) * torch.tensor([8.0, 8.0, 3.0]),
                       torch.randn(batch, points, 4, generator=generator)], dim=-1).to(device)  # a room, rgb + height
    model = Backbone(scale=scale).to(device).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(cloud).square().mean().backward()

    step()  # warm-up
    model.timings.clear()
    seconds = median_seconds(step, device, repeats)
    ops = {name: total / (repeats + 1) for name, total in model.timings.items()}  # per step (warm-up included)
    result = {"device": str(device), "threads": torch.get_num_threads(), "batch": batch, "points": points,
              "sa_points": [n for n, _, _ in model.sa], "step_s": round(seconds, 4),
              **{f"{k}_s": round(v, 4) for k, v in ops.items()},
              "ops_share": round(sum(ops.values()) / seconds, 3),
              **{f"{k}_share": round(v / seconds, 3) for k, v in ops.items()}}  # fmt: skip
    xyz = cloud[..., :3].contiguous()
    first = model.sa[0][0]
    result["fps_first_loop_s"] = round(median_seconds(lambda: point_ops.farthest_point_sample(xyz, first, use_fpsample=False), device, repeats), 4)
    if point_ops.fpsample is not None and device.type == "cpu":
        result["fps_first_fpsample_s"] = round(median_seconds(lambda: point_ops.farthest_point_sample(xyz, first, use_fpsample=True), device, repeats), 4)
    return result


def measure_scanqa(
    batch: int, points: int, device: torch.device, repeats: int, cpu_clock: bool = False, **config: object
) -> dict[str, float]:
    """The full ScanQA model's forward + backward, and the point ops' seconds inside it (see the module's notes).
    `cpu_clock`: the process's CPU seconds instead of wall seconds (on a CPU shared with other processes, with
    one thread), for the step and the ops alike. `config`: ScanQAConfig fields to change (a tiny run)."""
    from frozenlm.models import scanqa

    clock = time.process_time if cpu_clock else time.perf_counter

    timings: dict[str, float] = {}
    names = {"farthest_point_sample": "fps", "query_and_group": "ball_query", "three_nn": "three_nn",
             "interpolation_weights": "three_nn", "three_interpolate": "three_nn", "gather_points": "gather"}  # fmt: skip
    originals = {name: getattr(scanqa, name) for name in names}

    def timed(name, fn):
        def call(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            out = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings[names[name]] = timings.get(names[name], 0.0) + clock() - start
            return out

        return call

    generator = torch.Generator().manual_seed(0)
    cloud = torch.cat([torch.rand(batch, points, 3, generator=generator) * torch.tensor([8.0, 8.0, 3.0]),
                       torch.randn(batch, points, 4, generator=generator)], dim=-1)  # a room, rgb + height
    lengths = torch.tensor([12, 20] * batch)[:batch]
    inputs = {"point_clouds": cloud, "situation_tokens": torch.randn(batch, 20, 300, generator=generator),
              "situation_lengths": lengths, "question_tokens": torch.randn(batch, 20, 300, generator=generator),
              "question_lengths": lengths.flip(0)}  # fmt: skip
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(0)
    model = scanqa.ScanQA(scanqa.ScanQAConfig(**({"num_answers": 706, "mean_size": [[1.0, 1.0, 1.0]] * 18} | config))).to(device).train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        outputs, _ = model(inputs)
        (outputs["answer_scores"].sum() + outputs["situation_prediction"].sum() + outputs["center"].sum()).backward()

    try:
        for name in names:
            setattr(scanqa, name, timed(name, originals[name]))
        step()  # warm-up
        timings.clear()
        seconds = []
        for _ in range(repeats):
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(clock() - start)
    finally:
        for name, fn in originals.items():
            setattr(scanqa, name, fn)
    seconds = statistics.median(seconds)
    ops = {name: total / repeats for name, total in timings.items()}  # per step
    return {"model": "scanqa", "device": str(device), "clock": "cpu" if cpu_clock else "wall",
            "threads": torch.get_num_threads(), "batch": batch,
            "points": points, "parameters": sum(p.numel() for p in model.parameters()), "step_s": round(seconds, 4),
            **{f"{k}_s": round(v, 4) for k, v in ops.items()}, "ops_share": round(sum(ops.values()) / seconds, 3),
            **{f"{k}_share": round(v / seconds, 3) for k, v in ops.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="2,8", help="batch sizes, comma-separated")
    parser.add_argument("--points", type=int, default=40000, help="points per scene (SQA3D: 40,000)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the SA layers' point counts (a quick run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["backbone", "scanqa"], default="backbone",
                        help="the PointNet++ backbone alone, or the whole ScanQA model")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="--model scanqa: time in process CPU seconds (a shared CPU, one thread)")
    args = parser.parse_args()
    for batch in map(int, args.batches.split(",")):
        if args.model == "scanqa":
            print(json.dumps(measure_scanqa(batch, args.points, torch.device(args.device), args.repeats, args.cpu_clock)))
        else:
            print(json.dumps(measure(batch, args.points, torch.device(args.device), args.repeats, args.scale)))


if __name__ == "__main__":
    main()

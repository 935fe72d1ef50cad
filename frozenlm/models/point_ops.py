"""Farthest-point sampling, gathering and k-nearest neighbours on batched point clouds, in plain PyTorch.

Point-BERT groups a cloud with a CUDA extension (pointnet2's FPS, KNN_CUDA); these run on any device.
FPS starts at index 0, like that kernel, so a cloud's grouping is deterministic. On the CPU the FPS of
the ``fpsample`` package (compiled; extra ``pointcloud``) is used when it is installed, 3-4x faster at
8,192 points on one core (``python benchmarks/pointcloud_step.py`` measures both side by side). On
clouds whose farthest point is unique at every step it selects the same points in the same order as
the loop below (the tests check this on random clouds); where two points tie for farthest (duplicate
points, or distances equal up to float rounding, which the two compute in different orders) either may
be chosen, so the two can part ways from there, as the CUDA kernel of Point-BERT could. Its faster
bucket variants neither start at a given point nor select the same points, so they are not used.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    import fpsample
except ImportError:  # the loop below does the same, slower on the CPU
    fpsample = None


def farthest_point_sample(points: Tensor, count: int, use_fpsample: bool | None = None) -> Tensor:
    """Indices ``[B, count]`` of ``count`` farthest-point-sampled points of ``points [B, N, 3]``,
    starting at index 0; each next point is the one farthest from those already chosen (first of
    equals). ``use_fpsample`` None = on the CPU when the package is installed."""
    batch, size, _ = points.shape
    if not 0 < count <= size:
        raise ValueError(f"Cannot sample {count} points from clouds of {size} points.")
    if use_fpsample is None:
        use_fpsample = fpsample is not None and points.device.type == "cpu"
    if use_fpsample:
        clouds = points.detach().float().numpy()
        indices = [fpsample.fps_sampling(cloud, count, start_idx=0) for cloud in clouds]
        return torch.from_numpy(np.stack(indices).astype(np.int64))
    chosen = torch.zeros(batch, count, dtype=torch.long, device=points.device)
    nearest = torch.full((batch, size), float("inf"), device=points.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    for i in range(count):
        chosen[:, i] = farthest
        centre = points[rows, farthest].unsqueeze(1)
        nearest = torch.minimum(nearest, (points - centre).square().sum(-1))
        farthest = nearest.argmax(dim=-1)
    return chosen


def gather_points(points: Tensor, indices: Tensor) -> Tensor:
    """``points [B, N, C]`` at ``indices [B, ...]`` -> ``[B, ..., C]``."""
    flat = indices.reshape(indices.shape[0], -1)
    gathered = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return gathered.reshape(*indices.shape, points.shape[-1])


def knn_indices(points: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices ``[B, G, k]`` of the ``k`` points of ``points [B, N, 3]`` nearest to each of ``centres
    [B, G, 3]``, nearest first."""
    if k > points.shape[1]:
        raise ValueError(f"Cannot take {k} nearest neighbours in clouds of {points.shape[1]} points.")
    return torch.cdist(centres, points).topk(k, dim=-1, largest=False).indices


def group_points(points: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Point-BERT's grouping: ``num_groups`` FPS centres and, around each, its ``group_size`` nearest
    points re-centred on it. Returns ``(neighbourhoods [B, G, K, 3], centres [B, G, 3])``."""
    centres = gather_points(points, farthest_point_sample(points, num_groups).to(points.device))
    neighbourhoods = gather_points(points, knn_indices(points, centres, group_size))
    return neighbourhoods - centres.unsqueeze(2), centres

"""Point-cloud ops in plain PyTorch with the semantics of the pointnet2 CUDA kernels (`_ext_src` of
PointNet++ / VoteNet / ScanQA, and Point-BERT's FPS): farthest-point sampling, ball query, grouping,
three nearest neighbours and their interpolation, plus gathering and kNN (Point-BERT's groups).

All are batched and vectorised on the input's device: FPS loops over its samples, as the kernel does;
nothing loops over points or over the batch (ball query and three_nn work in chunks of centres to bound
memory). Squared distances are summed as the kernels write them, `(dx*dx + dy*dy) + dz*dz` in the
input's dtype, so the indices equal a direct loop over the points (the tests check this, ties
included); a CUDA build may contract those sums into fused multiply-adds, which can move a tie or a
radius boundary by one rounding.

The kernels' rules, which these follow exactly:

* **FPS** (`farthest_point_sample`): starts at index 0; distances to the chosen set start at
  1e10; a point with `|p|^2 <= 1e-3` is never selected after the first (its distance is never
  updated); each step takes the largest distance, ties broken as the kernel's thread reduction does
  (`fps_priority`); when no point is eligible at all, index 0 is repeated; once every eligible
  point is at distance 0 (all chosen, or duplicates of chosen ones), already-chosen points are repeated.
* **Ball query** (`ball_query`): points scanned in index order, strict `d^2 < r^2`; the first
  `nsample` hits in order, the remaining slots filled with the first hit; no hit: all slots 0.
* **three_nn** (`three_nn`): the three nearest by strict `<` in index order (an earlier index
  wins a tie), returned as Euclidean distances (the square root of the squared ones); with fewer than
  three known points the missing slots are index 0 at infinite distance.
* **Interpolation** (`interpolation_weights`, `three_interpolate`): weights
  `1 / (d + 1e-8)` normalised over the three; features `f1*w1 + f2*w2 + f3*w3`.
* **Grouping** (`query_and_group`): `(xyz - centre)` (divided by the radius with
  `normalize_xyz`) concatenated before the grouped features.

On the CPU, FPS uses the compiled `fpsample` package (extra `pointcloud`) when it is installed,
3-4x faster at 8,192 points on one core: it is given the eligible points (and point 0, the start) in
the kernel's priority order, reversed because it keeps the last of equal distances, and its indices
are mapped back, so it selects what the kernel selects (tested against the loop reference, ties
included); a cloud on which it could not (every eligible point exhausted while point 0 is itself
ineligible, or distances beyond the kernel's 1e10 start) goes through the PyTorch loop instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

try:
    import fpsample
except ImportError:  # the loop below does the same, slower on the CPU
    fpsample = None

MIN_NORM2 = 1e-3  # the FPS kernel never selects a point with |p|^2 <= this after the first
START_DISTANCE = 1e10  # the FPS kernel's initial distance to the chosen set
CHUNK_ELEMENTS = 1 << 24  # distances held at once by ball_query / three_nn (64 MiB of float32)


def squared_norm(points: Tensor) -> Tensor:
    """`(x*x + y*y) + z*z` of `points [..., 3]`, summed in the kernels' order."""
    x, y, z = points.unbind(-1)
    return (x * x + y * y) + z * z


def squared_distances(a: Tensor, b: Tensor, out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """`[B, M, N]` squared distances from `a [B, M, 3]` to `b [B, N, 3]`, summed as the kernels do,
    one coordinate at a time (no `[B, M, N, 3]` temporary); `out` and `scratch`, buffers of at
    least that size reused across chunks, spare the allocations (most of the time on the CPU)."""
    shape = (a.shape[0], a.shape[1], b.shape[1])
    d = torch.empty(shape, dtype=a.dtype, device=a.device) if out is None else out.view(-1)[: math.prod(shape)].view(shape)
    t = torch.empty_like(d) if scratch is None else scratch.view(-1)[: math.prod(shape)].view(shape)
    for i, (ca, cb) in enumerate(zip(a.unbind(-1), b.unbind(-1))):
        target = d if i == 0 else t
        torch.sub(ca.unsqueeze(2), cb.unsqueeze(1), out=target)
        target.mul_(target)
        if i:
            d.add_(t)
    return d


def fps_threads(size: int) -> int:
    """Threads per block of the FPS kernel for clouds of `size` points (`opt_n_threads`: the power
    of two below `size`, at most 512, computed through a double-precision log as the kernel's host
    code does)."""
    return max(min(1 << int(math.log(size) / math.log(2.0)), 512), 1)


def fps_priority(size: int, device: torch.device | str | None = None) -> Tensor:
    """The FPS kernel's tie-break order: the indices `[size]` of a cloud sorted so that, of points at
    equal distance, the kernel picks the earliest in this order. Thread `t` of the block scans
    indices `t, t + T, ...` keeping the first of equals; the block's tree reduction keeps the left
    operand on equals, which ranks threads by their bit-reversed id. Index 0 stays first."""
    threads = fps_threads(size)
    bits = threads.bit_length() - 1
    index = torch.arange(size, dtype=torch.long)
    thread = index % threads
    reversed_thread = torch.zeros_like(thread)
    for bit in range(bits):  # over the bits of a thread id, not over points
        reversed_thread |= ((thread >> bit) & 1) << (bits - 1 - bit)
    return torch.argsort(reversed_thread * size + index).to(device)


def farthest_point_sample(points: Tensor, count: int, use_fpsample: bool | None = None) -> Tensor:
    """Indices `[B, count]` of `count` farthest-point-sampled points of `points [B, N, 3]`, as the
    pointnet2 CUDA kernel selects them (see the module's notes: start at index 0, never a point with
    `|p|^2 <= 1e-3` after it, the kernel's tie-break). `use_fpsample` None = on the CPU when the
    package is installed."""
    batch, size, _ = points.shape
    if not 0 < count <= size:
        raise ValueError(f"Cannot sample {count} points from clouds of {size} points.")
    if use_fpsample is None:  # (float32 only: fpsample computes in float32, as the kernel)
        use_fpsample = fpsample is not None and points.device.type == "cpu"
    points = points.detach()
    if use_fpsample and fpsample is not None and points.device.type == "cpu" and points.dtype == torch.float32:
        return _fpsample_kernel_rule(points, count)
    return _fps_loop(points, count)


def _fps_loop(points: Tensor, count: int) -> Tensor:
    """The kernel's FPS, vectorised over points and clouds, one iteration per sample: points in the
    kernel's priority order so that `argmax` (first of equals) breaks ties as the kernel does, and
    ineligible points at distance -1, below every eligible one (which is never updated: min(d, -1))."""
    batch, size, _ = points.shape
    order = fps_priority(size, points.device)
    ordered = points[:, order]
    x, y, z = (c.contiguous() for c in ordered.unbind(-1))
    eligible = squared_norm(ordered).double() > MIN_NORM2  # the kernel compares float |p|^2 with the double 1e-3
    nearest = torch.where(eligible, START_DISTANCE, -1.0).to(points.dtype)
    chosen = torch.zeros(batch, count, dtype=torch.long, device=points.device)
    last = torch.zeros(batch, 1, dtype=torch.long, device=points.device)
    for i in range(1, count):
        d = x - x.gather(1, last)
        d.mul_(d)
        t = y - y.gather(1, last)
        d.add_(t.mul_(t))
        t = z - z.gather(1, last)
        d.add_(t.mul_(t))
        torch.minimum(nearest, d, out=nearest)
        last = nearest.argmax(dim=1, keepdim=True)  # the first of equals, in the kernel's order
        chosen[:, i] = last[:, 0]
    return order[chosen]


def _fpsample_kernel_rule(points: Tensor, count: int) -> Tensor:
    """The kernel's FPS through `fpsample` (one compiled call per cloud): point 0 and the eligible
    points, in reversed priority order (`fpsample` keeps the last of equals), start at point 0, map
    back. Clouds it cannot do as the kernel are done by `_fps_loop`."""
    batch, size, _ = points.shape
    order = fps_priority(size).numpy()
    clouds = points.numpy()
    results = []
    for cloud in clouds:  # fpsample takes one cloud at a time
        ordered = cloud[order]
        norms = squared_norm(torch.from_numpy(ordered)).double().numpy()
        keep = norms > MIN_NORM2
        keep[0] = True  # point 0 starts; its distances count even when it may not be selected again
        subset = order[keep][::-1]  # reversed priority: fpsample's last of equals = the kernel's first
        extent = float(np.abs(cloud).max()) if size else 0.0
        fallback = len(subset) < count or 12.0 * extent * extent >= START_DISTANCE
        if not fallback:
            picked = fpsample.fps_sampling(np.ascontiguousarray(cloud[subset]), count, start_idx=len(subset) - 1)
            indices = subset[picked.astype(np.int64)]
            # Exhausted: fpsample repeats point 0 (last, at distance 0); the kernel repeats an eligible one.
            fallback = norms[0] <= MIN_NORM2 and bool((indices[1:] == 0).any())
        if fallback:
            indices = _fps_loop(torch.from_numpy(cloud)[None], count)[0].numpy()
        results.append(np.asarray(indices, dtype=np.int64))
    return torch.from_numpy(np.stack(results))


def gather_points(points: Tensor, indices: Tensor) -> Tensor:
    """`points [B, N, C]` at `indices [B, ...]` -> `[B, ..., C]`."""
    flat = indices.reshape(indices.shape[0], -1)
    gathered = points.gather(1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return gathered.reshape(*indices.shape, points.shape[-1])


def group_features(features: Tensor, indices: Tensor) -> Tensor:
    """pointnet2's `grouping_operation`: `features [B, C, N]` at `indices [B, M, K]` -> `[B, C, M, K]`
    (differentiable in the features)."""
    batch, channels, _ = features.shape
    flat = indices.reshape(batch, 1, -1).expand(-1, channels, -1)
    return features.gather(2, flat).reshape(batch, channels, *indices.shape[1:])


def _chunk_rows(batch: int, columns: int) -> int:
    """Rows of a `[B, rows, columns]` distance chunk within `CHUNK_ELEMENTS`."""
    return max(1, CHUNK_ELEMENTS // max(1, batch * columns))


def ball_query(points: Tensor, centres: Tensor, radius: float, nsample: int) -> Tensor:
    """Indices `[B, M, nsample]` of the points of `points [B, N, 3]` within `radius` of each of
    `centres [B, M, 3]`, as pointnet2's kernel: the first `nsample` with `d^2 < r^2` in index
    order, the remaining slots filled with the first of them; all 0 where none is."""
    batch, size, _ = points.shape
    points, centres = points.detach(), centres.detach()
    radius2 = (torch.tensor(radius, dtype=points.dtype) ** 2).to(points.device)  # r*r in the points' precision
    take = min(nsample, size)
    index = torch.arange(size, dtype=torch.int32, device=points.device)
    out = []
    step = max(1, min(_chunk_rows(batch, size), centres.shape[1]))
    buffers = [torch.empty(batch * step * size, dtype=points.dtype, device=points.device) for _ in range(2)]
    for start in range(0, centres.shape[1], step):  # chunks of centres, to bound memory
        inside = squared_distances(centres[:, start : start + step], points, *buffers) < radius2
        keys = torch.where(inside, index, size)  # hits keep their index, misses sort last
        first = keys.topk(take, dim=-1, largest=False, sorted=True).values  # the first hits, in order
        if take < nsample:
            first = torch.cat([first, first.new_full((*first.shape[:-1], nsample - take), size)], dim=-1)
        fill = torch.where(first[..., :1] < size, first[..., :1], 0)  # the first hit, or 0 without one
        out.append(torch.where(first < size, first, fill).long())
    return torch.cat(out, dim=1)


def query_and_group(
    points: Tensor, centres: Tensor, features: Tensor | None, radius: float, nsample: int,
    use_xyz: bool = True, normalize_xyz: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """pointnet2's `QueryAndGroup`: the ball query of `centres [B, M, 3]` in `points [B, N, 3]`,
    and for each centre its points' `xyz - centre` (divided by `radius` with `normalize_xyz`)
    concatenated before their `features [B, C, N]`. Returns `(grouped [B, 3 + C, M, nsample],
    indices [B, M, nsample])` (`[B, C, ...]` without `use_xyz`; `[B, 3, ...]` without features)."""
    indices = ball_query(points, centres, radius, nsample)
    grouped_xyz = group_features(points.transpose(1, 2), indices) - centres.transpose(1, 2).unsqueeze(-1)
    if normalize_xyz:
        grouped_xyz = grouped_xyz / radius
    if features is None:
        if not use_xyz:
            raise ValueError("query_and_group needs features or use_xyz.")
        return grouped_xyz, indices
    grouped = group_features(features, indices)
    return (torch.cat([grouped_xyz, grouped], dim=1) if use_xyz else grouped), indices


def three_nn(unknown: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """`(distances [B, N, 3], indices [B, N, 3])`: the three points of `known [B, M, 3]` nearest to
    each of `unknown [B, N, 3]`, nearest first, an earlier index first among equals (the kernel's
    strict `<`); Euclidean distances. Fewer than three known points: index 0 at infinite distance."""
    batch, size, _ = unknown.shape
    unknown, known = unknown.detach(), known.detach()  # as the kernel: no gradient through the distances
    out_d, out_i = [], []
    step = min(_chunk_rows(batch, max(known.shape[1], 3)), max(size, 1))
    buffers = [torch.empty(batch * step * known.shape[1], dtype=unknown.dtype, device=unknown.device) for _ in range(2)]
    for start in range(0, size, step):  # chunks of unknown points, to bound memory
        d = squared_distances(unknown[:, start : start + step], known, *buffers)
        if d.shape[-1] < 3:  # missing neighbours: never chosen before a real one
            d = torch.cat([d, d.new_full((*d.shape[:-1], 3 - d.shape[-1]), math.inf)], dim=-1)
        values, indices = [], []
        for _ in range(3):  # the three smallest in turn; argmin gives the first of equals
            i = d.argmin(dim=-1, keepdim=True)
            values.append(d.gather(-1, i))
            indices.append(i)
            d = d.scatter(-1, i, math.inf)
        v, i = torch.cat(values, -1), torch.cat(indices, -1)
        missing = torch.isinf(v)  # the kernel's 1e40 start, never beaten: index 0, 1e40 as float = inf
        out_d.append(torch.where(missing, math.inf, v))
        out_i.append(torch.where(missing, 0, i))
    return torch.cat(out_d, dim=1).sqrt(), torch.cat(out_i, dim=1)


def interpolation_weights(distances: Tensor) -> Tensor:
    """PointNet++ feature propagation's weights: `1 / (d + 1e-8)` normalised over the three."""
    reciprocal = 1.0 / (distances + 1e-8)
    return reciprocal / reciprocal.sum(dim=2, keepdim=True)


def three_interpolate(features: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """`features [B, C, M]` interpolated at `indices, weights [B, N, 3]` -> `[B, C, N]`:
    `f1*w1 + f2*w2 + f3*w3` in that order (differentiable in the features and the weights)."""
    grouped = group_features(features, indices)  # [B, C, N, 3]
    w = weights.unsqueeze(1)
    return (grouped[..., 0] * w[..., 0] + grouped[..., 1] * w[..., 1]) + grouped[..., 2] * w[..., 2]


def knn_indices(points: Tensor, centres: Tensor, k: int) -> Tensor:
    """Indices `[B, G, k]` of the `k` points of `points [B, N, 3]` nearest to each of `centres
    [B, G, 3]`, nearest first."""
    if k > points.shape[1]:
        raise ValueError(f"Cannot take {k} nearest neighbours in clouds of {points.shape[1]} points.")
    return torch.cdist(centres, points).topk(k, dim=-1, largest=False).indices


def group_points(points: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Point-BERT's grouping: `num_groups` FPS centres (the kernel's rule) and, around each, its
    `group_size` nearest points re-centred on it. Returns `(neighbourhoods [B, G, K, 3], centres
    [B, G, 3])`."""
    centres = gather_points(points, farthest_point_sample(points, num_groups).to(points.device))
    neighbourhoods = gather_points(points, knn_indices(points, centres, group_size))
    return neighbourhoods - centres.unsqueeze(2), centres

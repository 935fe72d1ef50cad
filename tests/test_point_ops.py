"""The point ops against direct loops written from the pointnet2 CUDA kernels (``_ext_src``: FPS's
per-thread scan and block reduction, ball query's fill rule, three_nn's strict ``<``), on small random
clouds with ties (grid points, duplicates) and points with |p|^2 <= 1e-3: indices exactly equal."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from frozenlm.data import ModelNet40DataModule
from frozenlm.data.modelnet40 import normalize
from frozenlm.files import source_stamp
from frozenlm.models import point_ops
from frozenlm.models.point_ops import (
    ball_query,
    farthest_point_sample,
    interpolation_weights,
    query_and_group,
    squared_norm,
    three_interpolate,
    three_nn,
)
from frozenlm.models.pointbert import PointBERT
from tests.data.modelnet40.data import write as write_modelnet40

f32 = np.float32


# -- the kernels, one point at a time ---------------------------------------------------------------
def kernel_fps(cloud: np.ndarray, m: int) -> list[int]:
    """furthest_point_sampling_kernel for one cloud: block_size threads, thread t scans k = t, t + T, ...
    (skipping |p|^2 <= 1e-3, keeping the first of equals), then the shared-memory tree reduction."""
    n = len(cloud)
    threads = max(min(2 ** int(math.log(n) / math.log(2.0)), 512), 1)
    temp = [f32(1e10)] * n
    idxs, old = [0], 0
    for _ in range(1, m):
        x1, y1, z1 = (f32(v) for v in cloud[old])
        dists, dists_i = [], []
        for tid in range(threads):
            best, besti = f32(-1), 0
            for k in range(tid, n, threads):
                x2, y2, z2 = (f32(v) for v in cloud[k])
                mag = x2 * x2 + y2 * y2 + z2 * z2
                if float(mag) <= 1e-3:  # float promoted to double against the double literal
                    continue
                d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
                d2 = min(d, temp[k])
                temp[k] = d2
                if d2 > best:
                    best, besti = d2, k
            dists.append(best)
            dists_i.append(besti)
        half = threads // 2
        while half >= 1:
            for tid in range(half):
                if dists[tid + half] > dists[tid]:
                    dists[tid], dists_i[tid] = dists[tid + half], dists_i[tid + half]
            half //= 2
        old = dists_i[0]
        idxs.append(old)
    return idxs


def kernel_ball_query(points: np.ndarray, centres: np.ndarray, radius: float, nsample: int) -> list[list[int]]:
    radius2 = f32(radius) * f32(radius)
    out = []
    for cx, cy, cz in centres.astype(f32):
        idx, cnt = [0] * nsample, 0
        for k, (x, y, z) in enumerate(points.astype(f32)):
            if cnt >= nsample:
                break
            d2 = (cx - x) * (cx - x) + (cy - y) * (cy - y) + (cz - z) * (cz - z)
            if d2 < radius2:
                if cnt == 0:
                    idx = [k] * nsample
                idx[cnt] = k
                cnt += 1
        out.append(idx)
    return out


def kernel_three_nn(unknown: np.ndarray, known: np.ndarray) -> tuple[list[list[float]], list[list[int]]]:
    dist2, idx = [], []
    for ux, uy, uz in unknown.astype(f32):
        best, besti = [1e40] * 3, [0] * 3
        for k, (x, y, z) in enumerate(known.astype(f32)):
            d = float((ux - x) * (ux - x) + (uy - y) * (uy - y) + (uz - z) * (uz - z))
            if d < best[0]:
                best, besti = [d, best[0], best[1]], [k, besti[0], besti[1]]
            elif d < best[1]:
                best, besti = [best[0], d, best[1]], [besti[0], k, besti[1]]
            elif d < best[2]:
                best[2], besti[2] = d, k
        dist2.append([b if b < 1e39 else math.inf for b in best])  # stored as float: 1e40 -> inf
        idx.append(besti)
    return dist2, idx


# -- clouds with ties and near-origin points ----------------------------------------------------------
def tie_clouds(n: int, seed: int) -> torch.Tensor:
    """[4, n, 3] float32: a grid cloud (many equal distances), random points with duplicates and points
    within |p|^2 <= 1e-3 (index 0 among them in two clouds), and a cloud mostly near the origin."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(-2, 3, size=(n, 3)).astype(f32)  # integer coordinates: exact ties, duplicates
    noisy = rng.normal(size=(n, 3)).astype(f32)
    noisy[rng.choice(n, n // 8, replace=False)] *= 0.01  # |p|^2 <= 1e-3
    noisy[0] = [0.01, 0.0, 0.02]  # the start point itself ineligible
    noisy[-3:] = noisy[1:4]  # duplicates
    grid[0] = 0.0
    sparse = (rng.normal(size=(n, 3)) * 0.005).astype(f32)  # near the origin, a few eligible points
    sparse[rng.choice(n, 3, replace=False)] = rng.integers(1, 3, size=(3, 3))
    boundary = rng.normal(size=(n, 3)).astype(f32)
    boundary[1:4] = [[math.sqrt(1e-3), 0, 0]] * 3  # |p|^2 at the threshold, as float32 rounds it
    return torch.from_numpy(np.stack([grid, noisy, sparse, boundary]))


@pytest.mark.parametrize("use_fpsample", [False, True])
@pytest.mark.parametrize(("n", "m"), [(5, 5), (37, 37), (64, 20), (100, 30), (600, 8)])
def test_fps_follows_the_kernel_exactly(n, m, use_fpsample):
    if use_fpsample and point_ops.fpsample is None:
        pytest.skip("fpsample is not installed")
    clouds = tie_clouds(n, seed=n)
    indices = farthest_point_sample(clouds, m, use_fpsample=use_fpsample)
    for cloud, chosen in zip(clouds.numpy(), indices.tolist()):
        assert chosen == kernel_fps(cloud, m)


def test_fps_skips_near_origin_points_and_repeats_index_0_when_none_is_eligible():
    cloud = torch.tensor([[[0.0, 0.0, 0.0], [0.01, 0.01, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.02, 0.0, 0.0]]])
    for use_fpsample in (False, True):
        chosen = farthest_point_sample(cloud, 5, use_fpsample=use_fpsample)[0].tolist()
        assert chosen[:3] == [0, 3, 2] and set(chosen[3:]) <= {2, 3}  # exhausted: chosen points repeat
        none_eligible = farthest_point_sample(cloud * 0.001, 4, use_fpsample=use_fpsample)
        assert none_eligible.tolist() == [[0, 0, 0, 0]]


def test_fps_tie_order_is_the_kernel_reduction():
    # Two points at the same distance: indices 1 and 2 of 4 (threads 1 and 2 of a 4-thread block). The
    # reduction ranks threads by their bit-reversed id, so index 2 wins although index 1 comes first.
    cloud = torch.tensor([[[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [1.0, 3.0, 1.0], [1.5, 1.0, 1.0]]])
    assert farthest_point_sample(cloud, 2, use_fpsample=False).tolist() == [[0, 2]] == [kernel_fps(cloud[0].numpy(), 2)]


@pytest.mark.parametrize("nsample", [1, 4, 9])
def test_ball_query_follows_the_kernel_exactly(nsample, monkeypatch):
    monkeypatch.setattr(point_ops, "CHUNK_ELEMENTS", 200)  # several chunks of centres
    rng = np.random.default_rng(nsample)
    points = rng.integers(-3, 4, size=(2, 60, 3)).astype(f32) * f32(0.25)  # exact ties at the radius
    centres = np.concatenate([points[:, :10], rng.normal(size=(2, 6, 3)).astype(f32) * 2], axis=1)  # some far
    indices = ball_query(torch.from_numpy(points), torch.from_numpy(centres), 0.5, nsample)
    assert indices.dtype == torch.long and indices.shape == (2, 16, nsample)
    for b in range(2):
        assert indices[b].tolist() == kernel_ball_query(points[b], centres[b], 0.5, nsample)
    assert (indices[:, 10:] == 0).any()  # a centre with no point within the radius: zeros


@pytest.mark.parametrize("known_count", [2, 3, 25])
def test_three_nn_follows_the_kernel_exactly(known_count, monkeypatch):
    monkeypatch.setattr(point_ops, "CHUNK_ELEMENTS", 64)
    rng = np.random.default_rng(known_count)
    known = rng.integers(-2, 3, size=(2, known_count, 3)).astype(f32)  # duplicates and equal distances
    unknown = np.concatenate([known[:, :2], rng.integers(-2, 3, size=(2, 18, 3)).astype(f32) * f32(0.5)], axis=1)
    distances, indices = three_nn(torch.from_numpy(unknown), torch.from_numpy(known))
    for b in range(2):
        dist2, idx = kernel_three_nn(unknown[b], known[b])
        assert indices[b].tolist() == idx
        assert torch.equal(distances[b], torch.tensor(dist2, dtype=torch.float32).sqrt())


def test_three_interpolate_and_grouping_match_loops():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(2, 4, 12)).astype(f32)).requires_grad_()
    unknown = torch.from_numpy(rng.normal(size=(2, 7, 3)).astype(f32))
    known = torch.from_numpy(rng.normal(size=(2, 12, 3)).astype(f32))
    distances, indices = three_nn(unknown, known)
    weights = interpolation_weights(distances)
    out = three_interpolate(features, indices, weights)
    for b in range(2):
        for n in range(7):
            recip = [1.0 / (distances[b, n, j] + 1e-8) for j in range(3)]
            w = [r / (recip[0] + recip[1] + recip[2]) for r in recip]
            torch.testing.assert_close(weights[b, n], torch.stack(w))
            f = [features[b, :, indices[b, n, j]] * weights[b, n, j] for j in range(3)]
            assert torch.equal(out[b, :, n], f[0] + f[1] + f[2])
    out.sum().backward()  # the gradient reaches the features
    assert features.grad is not None and features.grad.abs().sum() > 0

    points = torch.from_numpy(rng.normal(size=(2, 30, 3)).astype(f32))
    centres = points[:, :5]
    grouped, idx = query_and_group(points, centres, features[..., :10].detach().repeat(1, 1, 3), 0.8, 6, normalize_xyz=True)
    assert grouped.shape == (2, 3 + 4, 5, 6)
    feats = features[..., :10].detach().repeat(1, 1, 3)
    for b in range(2):
        for m in range(5):
            for s in range(6):
                k = idx[b, m, s]
                torch.testing.assert_close(grouped[b, :3, m, s], (points[b, k] - centres[b, m]) / 0.8)
                assert torch.equal(grouped[b, 3:, m, s], feats[b, :, k])


# -- Point-BERT's grouping and the ModelNet40 cache follow the kernel's rule ----------------------------
def test_point_bert_centres_are_the_kernels_fps():
    clouds = tie_clouds(64, seed=3)[1:2]  # near-origin points (index 0 among them) and duplicates
    model = PointBERT(num_groups=56, group_size=4, embed_dim=8, depth=1, num_heads=1, encoder_dims=8)
    _, centres = model.group(clouds)
    assert torch.equal(centres[0], clouds[0, kernel_fps(clouds[0].numpy(), 56)])
    assert (squared_norm(centres[0, 1:]).double() > 1e-3).all()


def test_modelnet40_caches_of_the_old_fps_rule_are_not_reused(tmp_path):
    root = write_modelnet40(tmp_path, train_per_class=1, test_per_class=1, points=200)
    data = ModelNet40DataModule(root, cache_points=48, num_points=32, num_workers=0, val_fraction=0.0)
    ids, paths, labels = data.shapes("train")
    old = root / "modelnet40_train_48pts_fps.safetensors"  # the key before the kernel's rule, otherwise valid
    save_file({"points": torch.zeros(len(ids), 48, 3), "labels": torch.tensor(labels)}, old,
              metadata={"ids": json.dumps(ids), "sources": json.dumps([source_stamp(p) for p in paths]),
                        "cache_points": "48"})  # fmt: skip
    train = data.dataset("train")
    assert data.cache_path("train") != old and data.cache_path("train").is_file()
    raw = np.loadtxt(paths[0], delimiter=",", dtype=np.float32)[:, :3]
    expected = torch.from_numpy(normalize(raw[kernel_fps(raw, 48)]))
    torch.testing.assert_close(train.points[0], expected)  # resampled, not the old cache's zeros


def test_the_point_ops_benchmark_runs():
    """benchmarks/point_ops.py at a tiny size (figures reported, never asserted)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "point_ops.py"
    spec = importlib.util.spec_from_file_location("point_ops_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(batch=1, points=400, device=torch.device("cpu"), repeats=1, scale=0.05)
    assert result["sa_points"] == [102, 51, 25, 12]
    assert {"step_s", "fps_s", "ball_query_s", "three_nn_s", "ops_share", "fps_first_loop_s"} <= set(result)

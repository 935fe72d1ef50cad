"""VectorNet's fused CPU subgraph layer (frozenlm.models.polyline_kernel) against PyTorch's own operations."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from frozenlm.data.motion import VECTOR_DIM
from frozenlm.models import polyline_kernel
from frozenlm.models.vectornet import VectorNet, polyline_ranges

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to build the fused kernel"
)


def random_groups(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Agents and lanes as the datamodules pad them: garbage in padded slots, an empty polyline, a full one,
    polylines of one vector (their max ties with the padded copies) and a group of one polyline."""
    generator = torch.Generator().manual_seed(seed)
    groups = []
    for polylines, length in ((5, 13), (9, 4), (1, 3)):
        vectors = torch.randn(3, polylines, length, VECTOR_DIM, dtype=dtype, generator=generator)
        mask = torch.rand(3, polylines, length, generator=generator) < 0.6
        mask[0, 0], mask[1, -1] = False, True
        mask[2, 0], mask[2, 0, 0] = False, True  # one real vector, copied into every padded slot
        vectors[~mask] = 1e3
        groups.append((vectors, mask))
    return groups


def subgraph_step(net: VectorNet, groups, weights: torch.Tensor, fused: bool, monkeypatch) -> tuple[torch.Tensor, dict]:
    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "1" if fused else "0")
    net.zero_grad(set_to_none=True)
    features = net.polyline_features(groups)
    (features * weights).sum().backward()
    return features.detach(), {name: p.grad.clone() for name, p in net.subgraph.named_parameters()}


@pytest.mark.parametrize("hidden", [64, 16, 6])
def test_the_fused_layer_gives_pytorchs_features_and_gradients_in_float64(monkeypatch, hidden):
    """Same features and parameter gradients as Linear, LayerNorm, ReLU and max_pool1d, in float64, with
    padding, ties and empty polylines; and the fused kernel is what ran (it builds on this machine). Widths:
    VectorNet's 64 (the kernel's fixed-width loops), 16 (its other loops) and 6 (not whole SIMD vectors)."""
    torch.manual_seed(0)
    net = VectorNet(VECTOR_DIM, hidden=hidden).double()
    groups = random_groups(torch.float64)
    assert polyline_kernel.usable(torch.zeros(1, dtype=torch.float64))
    weights = torch.randn(3, 15, 2 * hidden, dtype=torch.float64)
    ours, our_grads = subgraph_step(net, groups, weights, True, monkeypatch)
    theirs, their_grads = subgraph_step(net, groups, weights, False, monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    assert ours[0, 0].abs().max() == 0  # the empty polyline
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-11, rtol=1e-11, msg=name)


@pytest.mark.parametrize("keep_nodes", [True, False])
def test_the_fused_layer_gives_the_same_bits_on_one_and_two_threads(keep_nodes):
    """Rows split among threads by rows; the weight, LayerNorm weight and bias gradients summed over fixed
    chunks of polylines in order: float32 outputs and every gradient bit for bit the same on 1 and 2 threads,
    with the nodes kept (their gradient flows back) and without (the last layer)."""
    shapes = ((4, 60, 20), (4, 100, 5))  # 6,800 rows: above the 2,048 rows a thread takes at least
    ranges = polyline_ranges(shapes, torch.device("cpu"))
    rows, polylines = int(ranges[1].sum()), len(ranges[0])
    generator = torch.Generator().manual_seed(1)
    shapes = ((rows, 64), (64, 64), (polylines, 64), (64,), (64,))
    inputs = [torch.randn(*s, generator=generator) for s in shapes]
    grads = torch.randn(rows, 64, generator=generator), torch.randn(polylines, 64, generator=generator)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in inputs]
            nodes, pooled = polyline_kernel.PolylineLayer.apply(*leaves, ranges, 1e-5, keep_nodes)
            if keep_nodes:
                torch.autograd.backward((nodes, pooled), grads)
            else:
                assert nodes is None
                pooled.backward(grads[1])
            results.append(([nodes] if keep_nodes else []) + [pooled] + [leaf.grad for leaf in leaves])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_kernel_that_cannot_be_built_falls_back_with_one_warning(monkeypatch):
    """A failed build warns once, naming the reason and the switch, and the subgraph runs PyTorch's operations."""
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'frozenlm_polyline_layer': c++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    polyline_kernel.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .*c\\+\\+: not found.*FROZENLM_CPU_KERNELS=0"):
            assert not polyline_kernel.usable(torch.zeros(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not polyline_kernel.usable(torch.zeros(1))  # once per process
            net = VectorNet(VECTOR_DIM, hidden=8)
            assert net.polyline_features(random_groups(torch.float32)).shape == (3, 15, 16)
    finally:
        polyline_kernel.load.cache_clear()
    assert not polyline_kernel.usable(torch.zeros(1, device="meta"))  # FLOP counting on the meta device
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the matmuls hand over bfloat16
        assert not polyline_kernel.usable(torch.zeros(1))
        features = VectorNet(VECTOR_DIM, hidden=8).polyline_features(random_groups(torch.float32))
        assert features.shape == (3, 15, 16) and features.isfinite().all()
    assert not polyline_kernel.usable(torch.zeros(1, dtype=torch.bfloat16))
    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "0")
    assert not polyline_kernel.usable(torch.zeros(1))


def test_polylines_without_rows_and_ranges_that_do_not_tile_the_rows():
    """Polylines of no rows pool to 0 and add nothing to any gradient (float64, against PyTorch's operations
    on the other polylines' rows); ranges that skip or overrun rows, or pool two polylines into one row, are
    refused before any row is read."""
    generator = torch.Generator().manual_seed(2)
    lengths = torch.tensor([3] * 16 + [0] * 16 + [2])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    dest = torch.arange(len(lengths))
    rows, width = int(lengths.sum()), 8
    tensors = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((rows, 5), (width, 5), (len(lengths), width), (width,), (width,))]  # fmt: skip
    leaves = [t.clone().requires_grad_() for t in tensors]
    pooled = polyline_kernel.PolylineLayer.apply(*leaves, (starts, lengths, dest), 1e-5, False)[1]
    weights = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    for size in range(8, 129, 8):  # freed NaN blocks of the sizes the backward's buffers take: garbage to reuse
        torch.full((size,), float("nan"), dtype=torch.float64)
    (pooled * weights).sum().backward()

    inputs, weight, per_polyline, gamma, beta = [t.clone().requires_grad_() for t in tensors]
    owner = torch.repeat_interleave(dest, lengths)
    nodes = torch.relu(torch.nn.functional.layer_norm(inputs @ weight.T + per_polyline[owner], (width,), gamma, beta, 1e-5))  # fmt: skip
    index = owner[:, None].expand(-1, width)
    expected = torch.zeros(len(lengths), width, dtype=torch.float64).scatter_reduce(0, index, nodes, "amax", include_self=False)  # fmt: skip
    (expected * weights).sum().backward()
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)
    assert pooled[16:32].abs().max() == 0
    for leaf, theirs in zip(leaves, (inputs, weight, per_polyline, gamma, beta)):
        torch.testing.assert_close(leaf.grad, theirs.grad, atol=1e-11, rtol=1e-11)

    twice = torch.cat([dest[:-1], dest[:1]])  # the last polyline pooled into the first one's row
    for bad, message in (((starts + 1, lengths, dest), "do not follow"), ((starts[:-1], lengths, dest), "one length"),
                         ((starts, lengths, twice), "pools into row 0 as an earlier polyline does")):  # fmt: skip
        with pytest.raises(RuntimeError, match=message):
            polyline_kernel.PolylineLayer.apply(*tensors, bad, 1e-5, False)
    with pytest.raises(RuntimeError, match="the polylines hold 50 rows, the inputs 51"):
        polyline_kernel.PolylineLayer.apply(torch.cat([tensors[0], tensors[0][:1]]), *tensors[1:], (starts, lengths, dest), 1e-5, False)  # fmt: skip

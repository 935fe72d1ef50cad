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
    shapes = ((rows, 64), (64, 128), (64,), (polylines, 64), (64,), (64,))  # the nodes, [nodes, previous max]'s Linear
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


def reference_layer(inputs, weight, bias, previous, gamma, beta, lengths, dest, eps=1e-5):
    """PyTorch's operations for `PolylineLayer` with `previous` (and the pooled max as a scatter_reduce)."""
    width = weight.shape[0]
    owner = torch.repeat_interleave(dest, lengths)
    nodes = torch.relu(torch.nn.functional.layer_norm(torch.cat([inputs, previous[owner]], -1) @ weight.T + bias, (width,), gamma, beta, eps))  # fmt: skip
    index = owner[:, None].expand(-1, width)
    return torch.zeros(len(lengths), width, dtype=inputs.dtype).scatter_reduce(0, index, nodes, "amax", include_self=False)  # fmt: skip


def test_polylines_without_rows_and_ranges_that_do_not_tile_the_rows():
    """Polylines of no rows pool to 0 and add nothing to any gradient but their previous pooled row's (float64,
    against PyTorch's operations on the other polylines' rows, pooled rows in another order than the polylines);
    ranges that skip or overrun rows, or pool two polylines into one row, and tensors of the wrong shape are
    refused before any row is read."""
    generator = torch.Generator().manual_seed(2)
    lengths = torch.tensor([3] * 16 + [0] * 16 + [2])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    dest = torch.randperm(len(lengths), generator=generator)
    rows, width, previous = int(lengths.sum()), 8, 4
    sizes = ((rows, 5), (width, 5 + previous), (width,), (len(lengths), previous), (width,), (width,))
    tensors = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in sizes]
    leaves = [t.clone().requires_grad_() for t in tensors]
    pooled = polyline_kernel.PolylineLayer.apply(*leaves, (starts, lengths, dest), 1e-5, False)[1]
    weights = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    for size in range(8, 129, 8):  # freed NaN blocks of the sizes the backward's buffers take: garbage to reuse
        torch.full((size,), float("nan"), dtype=torch.float64)
    (pooled * weights).sum().backward()

    theirs = [t.clone().requires_grad_() for t in tensors]
    expected = reference_layer(*theirs, lengths, dest)
    (expected * weights).sum().backward()
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)
    assert pooled[dest[16:32]].abs().max() == 0
    for leaf, their in zip(leaves, theirs):
        torch.testing.assert_close(leaf.grad, their.grad, atol=1e-11, rtol=1e-11)

    twice = torch.cat([dest[:-1], dest[:1]])  # the last polyline pooled into the first one's row
    for bad, message in (((starts + 1, lengths, dest), "do not follow"), ((starts[:-1], lengths, dest), "one length"),
                         ((starts, lengths, twice), f"pools into row {int(dest[0])} as an earlier polyline does"),
                         ((starts, lengths, dest + 1), "pools outside the pooled rows")):  # fmt: skip
        with pytest.raises(RuntimeError, match=message):
            polyline_kernel.PolylineLayer.apply(*tensors, bad, 1e-5, False)
    with pytest.raises(RuntimeError, match="the polylines hold 50 rows, the inputs 51"):
        polyline_kernel.PolylineLayer.apply(torch.cat([tensors[0], tensors[0][:1]]), *tensors[1:], (starts, lengths, dest), 1e-5, False)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"weight_t must be a contiguous \[K \+ W, D\] tensor"):
        polyline_kernel.PolylineLayer.apply(tensors[0], *tensors[1:3], tensors[3][:, :2], *tensors[4:], (starts, lengths, dest), 1e-5, False)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"previous must be a contiguous \[polylines, W\] tensor"):
        polyline_kernel.PolylineLayer.apply(*tensors[:3], tensors[3][1:], *tensors[4:], (starts, lengths, dest), 1e-5, False)  # fmt: skip


def test_a_scene_of_empty_polylines_only():
    """All polylines without rows (no row to split among threads): every pooled row 0 and every gradient
    written, the previous pooled rows' too (float64, against PyTorch's operations)."""
    lengths = torch.zeros(40, dtype=torch.long)
    starts, dest = torch.zeros(40, dtype=torch.long), torch.arange(40).flip(0)
    generator = torch.Generator().manual_seed(3)
    sizes = ((0, 5), (8, 5 + 4), (8,), (40, 4), (8,), (8,))
    tensors = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in sizes]
    for size in range(8, 2049, 8):  # NaN garbage where the outputs and partial sums will be allocated
        torch.full((size,), float("nan"), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in tensors]
    pooled = polyline_kernel.PolylineLayer.apply(*leaves, (starts, lengths, dest), 1e-5, False)[1]
    weights = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    (pooled * weights).sum().backward()
    assert pooled.abs().max() == 0
    theirs = [t.clone().requires_grad_() for t in tensors]
    (reference_layer(*theirs, lengths, dest) * weights).sum().backward()
    for leaf, their in zip(leaves, theirs):
        torch.testing.assert_close(leaf.grad, their.grad, atol=0, rtol=0)


def test_the_rows_and_identifiers_in_one_pass_are_pytorchs(monkeypatch):
    """`polyline_rows` and `polyline_identifiers` (one C++ pass each) give exactly what PyTorch's operations give:
    the padded rows, ranges and real polylines of `forward_groups`, and `VectorNet.identifiers` (a NaN start
    coordinate included); vectors that need a gradient take PyTorch's rows and still the fused layers."""
    from frozenlm.models.vectornet import padded_rows

    groups = random_groups(torch.float32, seed=4)
    groups[1][0][1, 2, 1, 0] = float("nan")  # a real vector's start x
    wide = [torch.cat([vectors, torch.randn(*vectors.shape[:3], 1)], dim=-1) for vectors, _ in groups]
    groups = [(w[..., :-1], mask) for w, (_, mask) in zip(wide, groups)]  # views, as the collated batch's
    assert not groups[0][0].is_contiguous()
    assert groups[1][1][1, 2, 1]
    shapes = tuple(tuple(mask.shape) for _, mask in groups)
    assert polyline_kernel.takes_groups(groups)
    rows, ranges, real = polyline_kernel.polyline_rows(groups)
    torch.testing.assert_close(rows, padded_rows(groups), rtol=0, atol=0, equal_nan=True)  # NaN copied alike
    assert all(torch.equal(a, b) for a, b in zip(ranges, polyline_ranges(shapes, torch.device("cpu"))))
    assert torch.equal(real, torch.cat([mask.any(dim=2) for _, mask in groups], dim=1))
    ours = polyline_kernel.polyline_identifiers(groups)
    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "0")
    theirs = VectorNet.identifiers(groups)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert ours[1, 5 + 2, 0].isnan() and ours.isnan().sum() == 1
    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "1")

    leaves = [(vectors.clone().requires_grad_(), mask) for vectors, mask in random_groups(torch.float64)]
    assert not polyline_kernel.takes_groups(leaves)
    net = VectorNet(VECTOR_DIM, hidden=8).double()
    fused = net.polyline_features(leaves)
    fused.sum().backward()
    grads = [vectors.grad.clone() for vectors, _ in leaves]
    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "0")
    for vectors, _ in leaves:
        vectors.grad = None
    plain = net.polyline_features(leaves)
    plain.sum().backward()
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=0)
    for ours, (vectors, _) in zip(grads, leaves):
        torch.testing.assert_close(ours, vectors.grad, atol=1e-11, rtol=1e-11)


def test_the_paper_global_graph_in_one_pass_is_pytorchs(monkeypatch):
    """The global graph's attention in C++ (`PolylineAttention`, a scene at a time) against PyTorch's
    operations in float64: outputs and the gradients of the nodes and of P_Q, P_K, P_V, with padded polylines,
    a scene of real ones only and a scene without any (0, finite gradients); float32 bits the same on 1 and 2
    threads."""
    from frozenlm.models.vectornet import PaperGlobalGraph

    torch.manual_seed(5)
    graph = PaperGlobalGraph(16).double()
    mask = torch.rand(4, 7) < 0.6
    mask[0], mask[1], mask[2, 0] = True, False, True
    nodes = torch.randn(4, 7, 16, dtype=torch.float64)
    weights = torch.randn(4, 7, 16, dtype=torch.float64)

    def run(fused: bool):
        monkeypatch.setenv("FROZENLM_CPU_KERNELS", "1" if fused else "0")
        graph.zero_grad(set_to_none=True)
        leaf = nodes.clone().requires_grad_()
        out = graph(leaf, mask)
        (out * weights).sum().backward()
        return out.detach(), [leaf.grad] + [p.grad for p in graph.parameters()]

    calls = []
    apply = polyline_kernel.PolylineAttention.apply
    monkeypatch.setattr(polyline_kernel.PolylineAttention, "apply", lambda *args: calls.append(1) or apply(*args))
    ours, our_grads = run(True)
    theirs, their_grads = run(False)
    assert calls == [1]  # the C++ attention ran once, in the first run only
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    assert ours[1].abs().max() == 0 and all(g.isfinite().all() for g in our_grads)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)

    monkeypatch.setenv("FROZENLM_CPU_KERNELS", "1")
    qkv = torch.randn(64, 56, 3 * 128)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            leaf = qkv.clone().requires_grad_()
            out = polyline_kernel.PolylineAttention.apply(leaf, torch.arange(56) < torch.arange(64)[:, None])
            out.backward(torch.ones_like(out))
            results.append((out, leaf.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_batch_without_polylines_and_a_nan_feature(monkeypatch):
    """No polyline at all gives PyTorch's empty `[B, 0, 2 * hidden]`; a NaN in a polyline's last max-pool gives
    NaN features and a NaN gradient, as `F.normalize`'s."""
    net = VectorNet(VECTOR_DIM, hidden=8)
    groups = [(torch.randn(2, 0, 5, VECTOR_DIM), torch.zeros(2, 0, 5, dtype=torch.bool))]
    assert net.polyline_features(groups).shape == (2, 0, 16)
    pooled = torch.tensor([[float("nan"), 1.0, 2.0], [3.0, 0.0, 4.0]], dtype=torch.float64, requires_grad=True)
    features = polyline_kernel.PolylineFeatures.apply(pooled, torch.tensor([True, True]), 1e-12)
    features.sum().backward()
    theirs = pooled.detach().clone().requires_grad_()
    expected = torch.nn.functional.normalize(torch.cat([theirs, theirs], dim=-1), dim=-1)
    expected.sum().backward()
    torch.testing.assert_close(features, expected, equal_nan=True)
    torch.testing.assert_close(pooled.grad, theirs.grad, equal_nan=True)
    assert pooled.grad[0].isnan().all()

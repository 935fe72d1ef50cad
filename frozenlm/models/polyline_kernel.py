"""VectorNet fused for CPUs (`csrc/polyline_layer.cpp`), each piece one C++ pass forward and one backward where
PyTorch's own operations take many passes or many small operators:

* `PolylineLayer`, a subgraph layer: `Linear([node, previous max]) -> LayerNorm -> ReLU -> max-pool per
  polyline`, where PyTorch's operations take about twelve passes over the `[rows, 64]` activations (the
  matmul, an add, LayerNorm, ReLU, the pool; in backward a zero fill, a scatter, the two gradients' sum, the
  ReLU's and LayerNorm's backward, an index_add and four matmuls). It works through chunks of 16
  polylines: the chunk's matmul (a register-blocked kernel, faster than a BLAS call on these thin `[rows,
  64] x [64, 64]` shapes) and its polylines' rows of the previous max's half, then its rows through the rest
  while they are in cache; backward, every gradient from the chunk's LayerNorm gradients while those are in
  cache.
* `polyline_rows` and `polyline_identifiers`: the subgraph's padded rows and ranges, and the identifiers,
  from the batch's vectors (about seventy small operators in PyTorch);
* `PolylineAttention`: the paper global graph's masked `softmax(Q K^T) V`, a scene at a time;
* `PolylineFeatures`: the normalised polyline features from the last max-pool.

Built with `torch.utils.cpp_extension` on first use in a process that needs it (about 40 s with two cores;
cached under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, so later runs load it at once),
for CPU tensors of float32 or float64 in training or inference. Where it cannot be built (no C++ compiler
or OpenMP, another platform) it says why once and [`PolylineSubgraph`][frozenlm.models.vectornet.PolylineSubgraph]
runs PyTorch's operations, the same function; `FROZENLM_CPU_KERNELS=0` turns it off. On GPUs, under
autocast and under a `TorchDispatchMode` (such as the FLOP counter) VectorNet runs PyTorch's operations."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import warnings
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

SOURCE = Path(__file__).with_name("csrc") / "polyline_layer.cpp"


def enabled() -> bool:
    """False when `FROZENLM_CPU_KERNELS=0`."""
    return os.environ.get("FROZENLM_CPU_KERNELS", "1") != "0"


@lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The compiled kernel (built on the first call of a process; later processes load the cached build),
    or None, with one warning saying why, where it cannot be built."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2, DEFAULT
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"]  # as PyTorch's own AVX2 kernels (ATen's SIMD types too)
    name = f"frozenlm_polyline_layer_{capability.lower()}"
    if shutil.which("ninja") is None:  # the `ninja` package's binary, when its environment's bin is not on PATH
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    print(f"frozenlm: loading VectorNet's fused CPU kernel {name} (built on first use, ~40 s, then cached under "
          "TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions)", flush=True)  # fmt: skip
    try:
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no OpenMP, a failed build: PyTorch's operations instead
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"frozenlm: VectorNet's fused CPU kernel could not be built ({reason}); the subgraph runs PyTorch's "
            "operations instead (the same function, slower on a CPU). FROZENLM_CPU_KERNELS=0 skips the attempt.",
            stacklevel=2,
        )
        return None


def usable(h: Tensor) -> bool:
    """Whether the fused kernel runs on `h`: a CPU tensor of float32 or float64 outside autocast (whose
    matmuls would hand it bfloat16) and outside a `TorchDispatchMode` such as PyTorch's `FlopCounterMode`
    (which sees only PyTorch's operations, so counts the same function's matmuls there), kernel enabled and
    built."""
    return (
        h.device.type == "cpu"
        and h.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not is_in_torch_dispatch_mode()
        and enabled()
        and load() is not None
    )


def takes_groups(groups: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether `polyline_rows` and `polyline_identifiers` run on these groups: the kernel usable on their
    vectors, which need no gradient, with bool masks."""
    return (
        usable(groups[0][0])
        and not any(vectors.requires_grad for vectors, _ in groups)
        and all(mask.dtype == torch.bool for _, mask in groups)
    )


def polyline_rows(groups: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
    """`(rows, (starts, lengths, dest), real)` of groups `(vectors [B, N_g, V_g, C], mask [B, N_g, V_g])` in one
    C++ pass: [`padded_rows`][frozenlm.models.vectornet.padded_rows], [`polyline_ranges`][frozenlm.models.vectornet.polyline_ranges]
    and each polyline's `real` `[B, sum N_g]` (any real vector), where PyTorch's operations take about fifty
    small ones (see `takes_groups`)."""
    rows, starts, lengths, dest, real = load().polyline_rows(*_channels_contiguous(groups))
    return rows, (starts, lengths, dest), real


def polyline_identifiers(groups: list[tuple[Tensor, Tensor]]) -> Tensor:
    """[`VectorNet.identifiers`][frozenlm.models.vectornet.VectorNet.identifiers] in one C++ pass (see
    `takes_groups`)."""
    return load().polyline_identifiers(*_channels_contiguous(groups))


def _channels_contiguous(groups: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """The groups' vectors with each vector's channels side by side (a collated batch's are already: a view of
    a wider tensor, read in place) and contiguous masks."""
    vectors = [v if v.stride(-1) == 1 else v.contiguous() for v, _ in groups]
    return vectors, [mask.contiguous() for _, mask in groups]


class PolylineLayer(torch.autograd.Function):
    """`(inputs [rows, K], weight [D, K + W], bias [D], previous [P, W] or None, norm_weight, norm_bias, ranges,
    eps, keep_nodes)` -> `(nodes [rows, D] or None, pooled [P, D])`: `nodes = relu(layer_norm(cat([inputs,
    previous[owner]], -1) @ weight.T + bias))` and `pooled` its max over each polyline's rows, where `ranges =
    (starts, lengths, dest)` say that polyline `p` is rows `starts[p] : starts[p] + lengths[p]`, pooled into row
    `dest[p]` (the `dest` of the `P` polylines: each row once), and `owner` is each row's polyline's `dest`.
    `previous` is the previous layer's `pooled` (None for the first layer, `W = 0`): the concatenation is never
    built, `previous @ weight[:, K:].T + bias` is computed once per polyline. Without `keep_nodes` (the last layer,
    whose nodes only feed the max-pool) the nodes are neither written nor returned."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, previous, norm_weight, norm_bias, ranges, eps, keep_nodes):
        starts, lengths, dest = ranges
        inputs, weight = inputs.contiguous(), weight.contiguous()
        previous = None if previous is None else previous.contiguous()
        pre, nodes, pooled, argmax, mean, rstd = load().forward(
            inputs, weight.t().contiguous(), bias.contiguous(), previous, norm_weight.contiguous(),
            norm_bias.contiguous(), starts, lengths, dest, eps, keep_nodes,
        )
        ctx.save_for_backward(inputs, weight, previous, pre, nodes, pooled, norm_weight, mean, rstd, argmax)
        ctx.ranges, ctx.keep_nodes = ranges, keep_nodes
        ctx.set_materialize_grads(False)  # no zero gradient made for nodes that go unused
        return (nodes if keep_nodes else None), pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nodes, grad_pooled):
        inputs, weight, previous, pre, nodes, pooled, norm_weight, mean, rstd, argmax = ctx.saved_tensors
        grad_nodes = grad_nodes.contiguous() if grad_nodes is not None and ctx.keep_nodes else None
        grad_pooled = pooled.new_zeros(pooled.shape) if grad_pooled is None else grad_pooled.contiguous()
        grad_inputs, grad_weight, grad_bias, grad_previous, grad_gamma, grad_beta = load().backward(
            grad_nodes, grad_pooled, inputs, weight, previous, pre, nodes, pooled, norm_weight, mean, rstd, argmax,
            *ctx.ranges, ctx.needs_input_grad[0],
        )
        return (
            grad_inputs if ctx.needs_input_grad[0] else None,
            grad_weight,
            grad_bias,
            grad_previous if previous is not None else None,
            grad_gamma,
            grad_beta,
            None,
            None,
            None,
        )


class PolylineAttention(torch.autograd.Function):
    """VectorNet's paper global graph `softmax(Q K^T) V` with the padded polylines masked as keys, a scene at a
    time in C++: `(qkv [B, N, 3d], polyline_mask [B, N] bool)` -> `[B, N, d]`, 0 for a scene without a real
    polyline. Where PyTorch takes two batched matmuls, two masked fills and a softmax forward (four matmuls,
    the fills' and the softmax's backward and a concatenation backward), each scene's `[N, N]` scores stay in
    cache."""

    @staticmethod
    def forward(ctx, qkv, polyline_mask):
        out, weights = load().attention_forward(qkv.contiguous(), polyline_mask.contiguous())
        ctx.save_for_backward(qkv, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, weights = ctx.saved_tensors
        return load().attention_backward(grad_out.contiguous(), qkv.contiguous(), weights), None


class PolylineFeatures(torch.autograd.Function):
    """The subgraph's polyline features from its last max-pool in C++: `(pooled [P, D], real [P] bool, eps)` ->
    `F.normalize(cat([pooled, pooled], -1), dim=-1, eps=eps)` where `real`, 0 elsewhere `[P, 2D]`, one pass
    forward and one backward where PyTorch takes seven operations and their backward."""

    @staticmethod
    def forward(ctx, pooled, real, eps):
        pooled, real = pooled.contiguous(), real.contiguous()
        ctx.save_for_backward(pooled, real)
        ctx.eps = eps
        return load().features_forward(pooled, real, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        pooled, real = ctx.saved_tensors
        return load().features_backward(grad.contiguous(), pooled, real, ctx.eps), None, None

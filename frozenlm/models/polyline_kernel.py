"""VectorNet's subgraph layer fused for CPUs: `matmul -> [per-polyline row added] -> LayerNorm -> ReLU ->
max-pool per polyline` as one C++ pass forward and one backward (`csrc/polyline_layer.cpp`), where PyTorch's
own operations take about twelve passes over the `[rows, 64]` activations (the matmul, an add, LayerNorm,
ReLU, the pool; in backward a zero fill, a scatter, the two gradients' sum, the ReLU's and LayerNorm's
backward, an index_add and two matmuls). The kernel works through chunks of 16 polylines: the chunk's
matmul (a register-blocked kernel, faster than a BLAS call on these thin `[rows, 64] x [64, 64]` shapes),
then its rows through the rest while they are in cache; backward, both of the matmul's gradients from the
chunk's LayerNorm gradients while those are in cache.

Built with `torch.utils.cpp_extension` on first use in a process that needs it (about 40 s with two cores;
cached under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, so later runs load it at once),
for CPU tensors of float32 or float64 in training or inference. Where it cannot be built (no C++ compiler
or OpenMP, another platform) it says why once and [`PolylineSubgraph`][frozenlm.models.vectornet.PolylineSubgraph]
runs PyTorch's operations, the same function; `FROZENLM_CPU_KERNELS=0` turns it off. On GPUs, under
autocast and under a `TorchDispatchMode` (such as the FLOP counter) the subgraph runs PyTorch's operations.
"""

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
        flags += ["-mavx2", "-mfma"]  # as PyTorch's own AVX2 kernels; the build's name says which
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


class PolylineLayer(torch.autograd.Function):
    """`(inputs [rows, K], weight [D, K], per_polyline [P, D] or None, norm_weight, norm_bias, ranges, eps,
    keep_nodes)` -> `(nodes [rows, D] or None, pooled [P, D])`: `nodes = relu(layer_norm(inputs @ weight.T +
    per_polyline[owner]))` and `pooled` its max over each polyline's rows, where `ranges = (starts, lengths,
    dest)` say that polyline `p` is rows `starts[p] : starts[p] + lengths[p]`, pooled into row `dest[p]`.
    Without `keep_nodes` (the last layer, whose nodes only feed the max-pool) the nodes are neither written
    nor returned."""

    @staticmethod
    def forward(ctx, inputs, weight, per_polyline, norm_weight, norm_bias, ranges, eps, keep_nodes):
        starts, lengths, dest = ranges
        inputs, weight = inputs.contiguous(), weight.contiguous()
        per_polyline = None if per_polyline is None else per_polyline.contiguous()
        pre, nodes, pooled, argmax, mean, rstd = load().forward(
            inputs, weight.t().contiguous(), per_polyline, norm_weight.contiguous(), norm_bias.contiguous(),
            starts, lengths, dest, len(dest), eps, keep_nodes,
        )
        ctx.save_for_backward(inputs, weight, pre, nodes, pooled, norm_weight, mean, rstd, argmax)
        ctx.ranges, ctx.keep_nodes, ctx.has_per_polyline = ranges, keep_nodes, per_polyline is not None
        ctx.set_materialize_grads(False)  # no zero gradient made for nodes that go unused
        return (nodes if keep_nodes else None), pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nodes, grad_pooled):
        inputs, weight, pre, nodes, pooled, norm_weight, mean, rstd, argmax = ctx.saved_tensors
        grad_nodes = grad_nodes.contiguous() if grad_nodes is not None and ctx.keep_nodes else None
        grad_pooled = pooled.new_zeros(pooled.shape) if grad_pooled is None else grad_pooled.contiguous()
        grad_inputs, grad_weight, grad_per_polyline, grad_gamma, grad_beta = load().backward(
            grad_nodes, grad_pooled, inputs, weight, pre, nodes, pooled, norm_weight, mean, rstd, argmax,
            *ctx.ranges, ctx.needs_input_grad[0], ctx.has_per_polyline,
        )
        return (
            grad_inputs if ctx.needs_input_grad[0] else None,
            grad_weight,
            grad_per_polyline if ctx.has_per_polyline else None,
            grad_gamma,
            grad_beta,
            None,
            None,
            None,
        )

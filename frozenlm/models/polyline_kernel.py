"""VectorNet's subgraph layer fused for CPUs: `[per-polyline row added] -> LayerNorm -> ReLU -> max-pool per
polyline` as one C++ pass forward and one backward (`csrc/polyline_layer.cpp`), where PyTorch's own
operations take about ten passes over the `[rows, 64]` activations (an add, LayerNorm, ReLU, the pool; in
backward a zero fill, a scatter, the two gradients' sum, the ReLU's and LayerNorm's backward, an index_add).

Built with `torch.utils.cpp_extension` on first use in a process that needs it (about 40 s with two cores;
cached under `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`, so later runs load it at once),
for CPU tensors of float32 or float64 in training or inference. Where it cannot be built (no C++ compiler
or OpenMP, another platform) it says why once and [`PolylineSubgraph`][frozenlm.models.vectornet.PolylineSubgraph]
runs PyTorch's operations, the same function; `FROZENLM_CPU_KERNELS=0` turns it off. On GPUs the subgraph
always runs PyTorch's operations.
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
    matmuls would hand it bfloat16), kernel enabled and built."""
    return (
        h.device.type == "cpu"
        and h.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and enabled()
        and load() is not None
    )


class PolylineLayer(torch.autograd.Function):
    """`(h [rows, D], per_polyline [P, D] or None, weight, bias, ranges, eps)` -> `(nodes [rows, D], pooled
    [P, D])`: `relu(layer_norm(h + per_polyline[owner]))` and its max over each polyline's rows, where
    `ranges = (starts, lengths, dest)` say that polyline `p` is rows `starts[p] : starts[p] + lengths[p]`,
    pooled into row `dest[p]`."""

    @staticmethod
    def forward(ctx, h, per_polyline, weight, bias, ranges, eps):
        starts, lengths, dest = ranges
        h = h.contiguous()
        per_polyline = None if per_polyline is None else per_polyline.contiguous()
        nodes, pooled, argmax, mean, rstd = load().forward(
            h, per_polyline, weight.contiguous(), bias.contiguous(), starts, lengths, dest, len(dest), eps
        )
        ctx.save_for_backward(h, per_polyline, nodes, weight, mean, rstd, argmax)
        ctx.ranges = ranges
        ctx.set_materialize_grads(False)  # the last layer's nodes go unused: no zero gradient made for them
        return nodes, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nodes, grad_pooled):
        h, per_polyline, nodes, weight, mean, rstd, argmax = ctx.saved_tensors
        grad_nodes = None if grad_nodes is None else grad_nodes.contiguous()
        grad_pooled = nodes.new_zeros(argmax.shape) if grad_pooled is None else grad_pooled.contiguous()
        grad_h, grad_per_polyline, grad_weight, grad_bias = load().backward(
            grad_nodes, grad_pooled, h, per_polyline, nodes, weight, mean, rstd, argmax, *ctx.ranges
        )
        return grad_h, grad_per_polyline if per_polyline is not None else None, grad_weight, grad_bias, None, None

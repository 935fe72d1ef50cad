"""Peak memory of one video clip's 1568 tokens through a LLaMA-7B-shaped frozen block.

Claim under test: the frozen block runs its attention with PyTorch's scaled-dot-product attention
(SDPA) kernels, which never materialise the 32 x 1568 x 1568 attention matrix, so a 16-frame 224 px
VideoMAE clip (8 x 14 x 14 = 1568 tokens of width 384) fits through a 4096-wide block.

What it does, without any download: builds `FrozenLMBlock.from_config` with a LLaMA-7B layer's
shapes (hidden 4096, SwiGLU 11008, 32 heads) and random weights (bf16 by default), adapters for width
384, then, in a fresh process per measurement, runs forward + backward (to the input tokens and the
trainable adapters, as in training; the LM layer is frozen) on one clip (under bf16 autocast for bf16
weights), twice: with the default SDPA kernels and with SDPA forced to its `math` backend, which
does materialise the matrix. CPUs without native bf16 (no AVX512-BF16/AMX) run bf16 matrix products
hundreds of times slower than fp32: measure with `--dtype float32` there.
It prints the peak memory above the baseline (weights and input already resident) and, for
comparison, the size of one materialised attention matrix.

Memory: on CPU the kernel's resident-set high-water mark (`VmHWM` in /proc/self/status, reset with
`/proc/self/clear_refs` just before the run; Linux only); on CUDA
`torch.cuda.max_memory_allocated`. tracemalloc is not used: it sees only Python's allocator, not
PyTorch's tensor memory.

    python benchmarks/video_block_memory.py [--device cpu|cuda] [--dtype bfloat16|float32] [--tokens 1568] [--clips 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20


def child(device: str, dtype: str, backend: str, tokens: int, clips: int) -> None:
    """One measurement; prints one JSON line."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from frozenlm.llm import FrozenLMBlock
    from frozenlm.llm.families import SHAPES

    block = FrozenLMBlock.from_config(SHAPES["llama-7b"].config(), [0], in_dim=384, dtype=dtype).to(device)
    x = torch.randn(clips, tokens, 384, device=device, requires_grad=True)
    backends = [SDPBackend.MATH] if backend == "math" else list(SDPBackend.__members__.values())
    run = _peak_cuda if device == "cuda" else _peak_cpu

    def step() -> None:
        with sdpa_kernel(backends), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = block(x)
        out.float().square().mean().backward()

    peak, method, seconds = run(step)
    print(json.dumps({"peak": peak, "method": method, "seconds": seconds}))


def _peak_cpu(step) -> tuple[int, str, float]:
    status = Path("/proc/self/status")
    if not status.exists():
        raise OSError("CPU measurements read Linux's /proc/self/status; use --device cuda elsewhere.")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return (_status_kib("VmHWM") - baseline) * 1024, "CPU peak RSS (VmHWM after clear_refs)", seconds


def _peak_cuda(step) -> tuple[int, str, float]:
    import torch

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    method = f"CUDA max_memory_allocated ({torch.cuda.get_device_name()})"
    return torch.cuda.max_memory_allocated() - baseline, method, seconds


def _status_kib(key: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(f"{key}:"))
    return int(line.split()[1])


def measure(device: str, dtype: str, backend: str, tokens: int, clips: int) -> dict:
    command = [sys.executable, __file__, "--child", backend, "--device", device, "--dtype", dtype]
    command += ["--tokens", str(tokens), "--clips", str(clips)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measurement {backend} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="LM weight dtype")
    parser.add_argument("--tokens", type=int, default=1568, help="tokens per clip (16 frames at 224 px: 1568)")
    parser.add_argument("--clips", type=int, default=1, help="clips per batch")
    parser.add_argument("--child", choices=["sdpa", "math"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.device, args.dtype, args.child, args.tokens, args.clips)
        return

    from frozenlm.llm.families import SHAPES

    shape = SHAPES["llama-7b"]
    heads, n = shape.heads, args.tokens
    matrix_bf16 = args.clips * heads * n * n * 2
    print(
        f"LLaMA-7B-shaped frozen block (d {shape.hidden}, FFN {shape.intermediate}, {heads} heads, {args.dtype} weights), "
        f"{args.clips} clip(s) "
        f"x {n} tokens of width 384; forward + backward on {args.device}"
        + (" under bf16 autocast." if args.dtype == "bfloat16" else ".")
    )
    print(
        f"One materialised attention matrix {args.clips}x{heads}x{n}x{n}: {matrix_bf16 / MiB:.0f} MiB in bf16, "
        f"{2 * matrix_bf16 / MiB:.0f} MiB in fp32 (the math path also keeps the softmax for backward).\n"
    )
    print("| attention | peak above weights + input | per clip | time |")
    print("|---|---:|---:|---:|")
    method = ""
    for backend, label in (("sdpa", "SDPA (default kernels)"), ("math", "SDPA math backend (materialised)")):
        result = measure(args.device, args.dtype, backend, n, args.clips)
        method = result["method"]
        peak = result["peak"] / MiB
        print(f"| {label} | {peak:.0f} MiB | {peak / args.clips:.0f} MiB | {result['seconds']:.1f} s |")
    print(f"\nMemory: {method}.")


if __name__ == "__main__":
    main()

"""Measuring a frozen LM block and the visual trunks around it: FLOPs, time against a matmul ideal, peak memory.

What `frozenlm bench` ([`bench`][frozenlm.bench], the command), the sweep (FLOPs per sample) and the scripts
in `benchmarks/` measure with.

FLOP count of a block's training step (`block_flops`; multiply-adds count 2; elementwise ops,
norms, softmax and activations are not counted):

* forward: `2 * B * N * in * out` for every linear map in the LM layer(s) and both adapters, plus
  `2 * B * N^2 * heads * head_dim` for each of the two attention matmuls `Q K^T` and `P V`.
* backward: a frozen linear needs only its input gradient `dX = dY W` (1x its forward). The
  attention matmuls multiply two activations that both depend on the input, so both operands need a
  gradient (2x their forward). The trainable adapters, and LoRA's `A` and `B`, need the input and
  the weight gradient (2x).
  Recomputation (e.g. a fused attention kernel recomputing `Q K^T` in backward) is not counted: the
  count is the minimum work, so the ratio to the ideal includes such overheads.

The ideal time (`time_block_step`) is that of one plain `torch.matmul` of the same FLOPs, timed
in the same run and the same dtype, interleaved with the block's steps so both see the same machine
load: `a [m, n] @ w.T` with `w [n, n]` stored like an `nn.Linear` weight (the layout the block's
linears use; CPUs without native bf16 run the other layout on a much slower path), `m, n` chosen so
`2 m n^2` is the step's FLOPs (the small rounding is scaled out). `ratio` = block time / ideal time.

`trunk_flops` gives the parameters and forward FLOPs of the visual trunks the block sits in:
DeiT-T/S/B with the patchify stem, with the convolutional stem (one block fewer) and with CAPE
positions, counted by PyTorch's `FlopCounterMode` on the meta device (not timed); `flop_counter`
is that counter with attention on CPU tensors counted too.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import PretrainedConfig

from frozenlm.llm.block import DType, FrozenLMBlock
from frozenlm.llm.lora import LoRAConfig
from frozenlm.models import create_vit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (stem, pos_embed) of the trunks compared by `trunk_flops`.
TRUNK_VARIANTS = (("patch", "learn"), ("conv", "learn"), ("patch", "cape"))
DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def measure_block_step(
    config: PretrainedConfig,
    *,
    lm_layers: int,
    in_dim: int,
    dtype: DType,
    device: torch.device,
    batch: int,
    tokens: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
    lora: LoRAConfig | None = None,
) -> dict[str, Any]:
    """One training step (forward, then backward to the input tokens) of a frozen LM block with random
    weights: the first `lm_layers` layers of `config` between adapters from `in_dim`, its weights in
    `dtype`, on `[batch, tokens, in_dim]` tokens that require grad (as inside a ViT).

    Returns `flops_forward, flops_backward, flops` (`block_flops`), what `time_block_step`
    returns, and `weights_mib` (the block's parameters)."""
    block = FrozenLMBlock.from_config(config, list(range(lm_layers)), in_dim, dtype=dtype, seed=seed, lora=lora)
    block.to(device).train()
    flops = block_flops(block, batch, tokens)
    timed = time_block_step(block, device, DTYPES[dtype], batch, tokens, flops["total"], repeats, warmup, seed)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    del block
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"flops_forward": flops["forward"], "flops_backward": flops["backward"], "flops": flops["total"], **timed,
            "weights_mib": weights / 2**20}  # fmt: skip


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """PyTorch's `FlopCounterMode` that also counts attention on CPU tensors. Its table knows the CUDA
    attention kernels only, so the CPU's fused kernel, what `scaled_dot_product_attention` runs there,
    counted 0; it gets the same closed form (`Q K^T` and `P V`: 2 x 2 B H N M d, backward twice that)."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )


def trunk_flops(backbones: Sequence[str] = DEIT, img_size: int = 224) -> list[dict[str, Any]]:
    """Parameters and forward FLOPs per image of each timm ViT in `backbones` in the variants of
    `TRUNK_VARIANTS`: patchify stem (as timm builds it), convolutional stem (Xiao et al.; one block
    fewer) and CAPE positions (no position table).

    FLOPs are those of matmuls and convolutions (a multiply-add counts 2) of a 1000-class model's
    eval forward on one `img_size` image, counted by `FlopCounterMode` on the meta device.
    Returns one row per (backbone, variant): `backbone, stem, pos_embed, depth, params, flops,
    embed_flops` (the patch embedding's part).
    """
    rows = []
    for name in backbones:
        for stem, pos_embed in TRUNK_VARIANTS:
            with torch.device("meta"):
                model = create_vit(name, 1000, img_size=img_size, stem=stem, pos_embed=pos_embed).eval()
                images = torch.empty(1, 3, img_size, img_size)
                with flop_counter() as whole:
                    model(images)
                with flop_counter() as embed:
                    model.patch_embed(images)
            rows.append(
                {
                    "backbone": name, "stem": stem, "pos_embed": pos_embed, "depth": len(model.blocks),
                    "params": sum(p.numel() for p in model.parameters()), "flops": whole.get_total_flops(),
                    "embed_flops": embed.get_total_flops(),
                }
            )  # fmt: skip
    return rows


def block_flops(block: FrozenLMBlock, batch: int, tokens: int) -> dict[str, int]:
    """Matmul FLOPs of one forward + input-gradient backward of `block` on `[batch, tokens, in_dim]`.

    Returns `forward`, `backward`, `total` and the parts `lm_linear`, `attention`,
    `adapters` and `lora` (forward FLOPs of each). Counting rule in the module docstring: backward
    = 1x forward for the frozen linears, 2x for the attention matmuls and 2x for the trainable
    adapters and LoRA maps.
    """
    rows = batch * tokens
    adapters = 2 * rows * (block.adapter_in.weight.numel() + block.adapter_out.weight.numel())
    lm_linear = attention = lora = 0
    if block.layers is not None:
        for module in block.layers.modules():
            # nn.Linear and GPT-2's Conv1D (a linear with a transposed [in, out] weight); peft's LoRA
            # wrappers are neither, their base map and A, B are (A and B train).
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                flops = 2 * rows * module.weight.numel()
                if module.weight.requires_grad:
                    lora += flops
                else:
                    lm_linear += flops
        config = block.lm_config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or block.d_llm // heads
        attention = len(block.layers) * 2 * (2 * batch * tokens * tokens * heads * head_dim)
    forward = lm_linear + attention + adapters + lora
    backward = lm_linear + 2 * attention + 2 * (adapters + lora)
    return {
        "forward": forward, "backward": backward, "total": forward + backward,
        "lm_linear": lm_linear, "attention": attention, "adapters": adapters, "lora": lora,
    }  # fmt: skip


def cpu_native(dtype_name: str) -> bool:
    """Whether oneDNN has native CPU matmuls for this reduced-precision dtype (AVX512-BF16/FP16, AMX)."""
    probe = "_is_mkldnn_bf16_supported" if dtype_name == "bfloat16" else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # private ops; assume the fast path when they are missing
        return True


def time_block_step(
    block: FrozenLMBlock,
    dev: torch.device,
    dtype: torch.dtype,
    batch: int,
    tokens: int,
    flops: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> dict[str, Any]:
    """Median times of the block's step and of the ideal matmul of `flops` (module docstring), and the
    step's peak memory (over the `warmup` steps): `block_ms, ideal_ms, matmul_shape, block_tflops,
    ideal_tflops, ratio, peak_mem_mib, mem_method`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, block.in_dim, generator=generator).to(dev).requires_grad_()
    grad_out = torch.randn(batch, tokens, block.in_dim, generator=generator).to(dev)
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        with autocast:
            out = block(x)
        out.backward(grad_out.to(out.dtype))

    # The ideal: a [m, n] @ w.T with 2 m n^2 ~= flops, w stored like an nn.Linear weight.
    m, n = ideal_shape(flops)
    a = torch.randn(m, n, generator=generator).to(dev, dtype)
    w = torch.randn(n, n, generator=generator).to(dev, dtype)
    c = torch.empty(m, n, device=dev, dtype=dtype)
    scale = flops / (2 * m * n * n)

    def matmul() -> None:
        torch.matmul(a, w.mT, out=c)

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with _PeakMemory(dev) as memory:
        for _ in range(warmup):
            step()
        sync()
    matmul()  # warm the matmul too (cuBLAS handles, oneDNN primitives)
    block_times, matmul_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same load
        block_times.append(_timed(step, sync))
        matmul_times.append(_timed(matmul, sync))
    block_s = statistics.median(block_times)
    ideal_s = statistics.median(matmul_times) * scale
    return {
        "block_ms": block_s * 1e3, "ideal_ms": ideal_s * 1e3, "matmul_shape": f"[{m}, {n}] @ [{n}, {n}].T",
        "block_tflops": flops / block_s / 1e12, "ideal_tflops": flops / ideal_s / 1e12,
        "ratio": block_s / ideal_s, "peak_mem_mib": memory.peak / 2**20, "mem_method": memory.method,
    }  # fmt: skip


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` after one warm-up call (CUDA synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    return statistics.median(_timed(fn, sync) for _ in range(repeats))


def ideal_seconds(flops: int, device: torch.device, repeats: int) -> float:
    """The FLOP ideal: the time of one fp32 `torch.matmul` `[m, n] @ [n, n].T` scaled to `flops`."""
    matmul, scale = _ideal_matmul(flops, device)
    return median_seconds(matmul, device, repeats) * scale


def step_and_ideal_seconds(step: Callable[[], object], flops: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median times of `step` and of its FLOP ideal (`ideal_seconds`), timed in turns (step, matmul,
    step, matmul, ...) after one warm-up call of each, so that load from other processes falls on both."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    matmul, scale = _ideal_matmul(flops, device)
    step(), matmul()
    steps, ideals = [], []
    for _ in range(repeats):
        steps.append(_timed(step, sync))
        ideals.append(_timed(matmul, sync) * scale)
    return statistics.median(steps), statistics.median(ideals)


def ideal_shape(flops: int) -> tuple[int, int]:
    """`(m, n)` of the FLOP ideal `[m, n] @ [n, n].T` with `2 m n^2 ~= flops` (its time is scaled to exactly
    `flops`): n the cube root rounded to a multiple of 64, since a width that is not one sends cuBLAS's
    bf16 matmul to kernels several times slower (on an H200, n = 29,137 ran at about 125 TFLOP/s)."""
    n = max(1, round((flops / 2) ** (1 / 3) / 64)) * 64
    return max(1, round(flops / (2 * n * n))), n


def _ideal_matmul(flops: int, device: torch.device) -> tuple[Callable[[], torch.Tensor], float]:
    """One fp32 matmul `[m, n] @ [n, n].T` of about `flops` and the factor from its FLOPs to `flops`."""
    m, n = ideal_shape(flops)
    a, w = torch.randn(m, n, device=device), torch.randn(n, n, device=device)
    return (lambda: torch.matmul(a, w.mT)), flops / (2 * m * n * n)


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class _PeakMemory:
    """Peak memory of a code region above what was held when it started (bytes in `.peak`)."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.peak = 0
        self.method = ""
        self._stop: threading.Event | None = None
        self._sampled = 0

    def __enter__(self) -> _PeakMemory:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self._base = torch.cuda.memory_allocated(self.dev)
            self.method = "CUDA: torch.cuda.max_memory_allocated"
            return self
        import psutil

        self._process = psutil.Process()
        try:  # "5" resets the kernel's resident-set high-water mark (VmHWM) to the current RSS.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = self._process.memory_info().rss
            self.method = "CPU: RSS high-water mark (VmHWM after clear_refs)"
        except OSError:
            self._base = self._process.memory_info().rss
            self._sampled = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self.method = "CPU: psutil RSS sampled every 1 ms"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            high = torch.cuda.max_memory_allocated(self.dev)
        elif self._stop is not None:
            self._stop.set()
            self._thread.join()
            high = max(self._sampled, self._process.memory_info().rss)
        else:
            high = _vm_hwm()
        self.peak = max(0, high - self._base)


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")

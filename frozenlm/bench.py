"""``frozenlm bench``: speed of a frozen LM block's training step against its FLOP ideal.

The block (``Linear(in_dim -> d_llm)`` -> frozen LM layer(s) -> ``Linear(d_llm -> in_dim)``) is
built with random weights from a config alone (:meth:`FrozenLMBlock.from_config`), so nothing is
downloaded. One training step of the block is timed: forward, then backward to the input tokens
(which require grad, as they do inside a ViT); the frozen weights get no gradient, the two adapters do.

FLOP count (multiply-adds count 2; elementwise ops, norms, softmax and activations are not counted):

* forward: ``2 * B * N * in * out`` for every linear map in the LM layer(s) and both adapters, plus
  ``2 * B * N^2 * heads * head_dim`` for each of the two attention matmuls ``Q K^T`` and ``P V``.
* backward: a frozen linear needs only its input gradient ``dX = dY W`` (1x its forward). The
  attention matmuls multiply two activations that both depend on the input, so both operands need a
  gradient (2x their forward). The trainable adapters, and LoRA's ``A`` and ``B`` with ``--lora``,
  need the input and the weight gradient (2x).
  Recomputation (e.g. a fused attention kernel recomputing ``Q K^T`` in backward) is not counted: the
  count is the minimum work, so the ratio below includes such overheads.

The ideal time is that of one plain ``torch.matmul`` of the same FLOPs, timed in the same run and the
same dtype, interleaved with the block's steps so both see the same machine load: ``a [m, n] @ w.T``
with ``w [n, n]`` stored like an ``nn.Linear`` weight (the layout the block's linears use; CPUs
without native bf16 run the other layout on a much slower path), ``m, n`` chosen so ``2 m n^2`` is
the step's FLOPs (the small rounding is scaled out). ``ratio`` = block time / ideal time.

A second table (:func:`trunk_flops`) gives the parameters and forward FLOPs of the visual trunks the
block sits in: DeiT-T/S/B with the patchify stem, with the convolutional stem (one block fewer) and
with CAPE positions, counted by PyTorch's ``FlopCounterMode`` on the meta device (not timed).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import AutoConfig, PretrainedConfig

from frozenlm.files import write_atomically
from frozenlm.llm.block import DType, FrozenLMBlock
from frozenlm.llm.lora import LoRAConfig
from frozenlm.models import create_vit

ModelType = Literal["llama", "mistral", "qwen2", "opt", "gpt2", "bert"]
_ROTARY = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (stem, pos_embed) of the trunks compared by `trunk_flops`.
TRUNK_VARIANTS = (("patch", "learn"), ("conv", "learn"), ("patch", "cape"))
DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")


def bench(
    *,
    model_type: ModelType = "llama",
    hidden: int = 4096,
    intermediate: int = 11008,
    heads: int = 32,
    kv_heads: int | None = None,
    lm_layers: int = 1,
    lora: LoRAConfig | None = None,
    in_dim: int = 384,
    batch: int | None = None,
    tokens: int = 197,
    dtypes: tuple[DType, ...] | None = None,
    device: str | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
    trunks: bool = True,
    quiet: bool = False,
    markdown: str | None = None,
) -> list[dict[str, Any]]:
    """Time a frozen LM block's forward + input-gradient backward against a plain matmul of the same FLOPs.

    The defaults are LLaMA-7B's layer shape (the LM4VE block) behind ViT-S tokens at 224 px (196
    patches + CLS). The LM weights are random (nothing is downloaded): speed does not depend on them.
    For each dtype a table row reports the step's FLOPs, the block's time, the time of one plain
    matmul of the same FLOPs and dtype measured in the same run, achieved TFLOP/s, their ratio and
    the step's peak memory. See the module docstring for how FLOPs are counted.

    Args:
        model_type: language-model family whose transformer layer is timed.
        hidden: hidden size ``d_llm`` of the LM layer (LLaMA-7B: 4096).
        intermediate: feed-forward width of the LM layer (LLaMA-7B: 11008).
        heads: attention heads of the LM layer (LLaMA-7B: 32).
        kv_heads: key/value heads for grouped-query attention (llama, mistral, qwen2 only); default
            ``heads`` (plain multi-head attention, as LLaMA-7B).
        lm_layers: number of consecutive frozen LM layers in the block (the paper's best ablation uses 2).
        lora: LoRA adapters on the LM layers (``"{r: 8, alpha: 16}"``, see
            :class:`frozenlm.llm.lora.LoRAConfig`); they train, so their weights get gradients.
        in_dim: width of the visual tokens the adapters map from and back to (ViT-S: 384).
        batch: images per step; default 1 on CPU (keeps the default CPU run to a few minutes), 64 on GPU.
        tokens: tokens per image (ViT/16 at 224 px with CLS: 197).
        dtypes: dtypes of the frozen LM weights to compare. ``bfloat16``/``float16`` runs under
            ``torch.autocast`` of that dtype (CUDA or CPU), as mixed-precision training does;
            ``float32`` runs without autocast (TF32 stays at PyTorch's setting, the same for the ideal).
            Default ``[float32, bfloat16]``, except on a CPU without native bf16 matmuls (no
            AVX512-BF16/AMX, see ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``): ``[float32]``,
            because there the bf16 backward matmuls take an unvectorised path (minutes per step at
            the default shape); pass ``--dtypes [float32,bfloat16]`` to time it anyway.
        device: ``cuda``, ``cuda:1``, ``cpu``...; default ``cuda`` when available, else ``cpu``.
        repeats: timed steps per dtype (the median is reported); default 2 on CPU, 10 on GPU.
        warmup: untimed steps before timing; the peak memory is measured over them. Default 1 on
            CPU, 3 on GPU.
        seed: seed of the random LM weights and inputs.
        trunks: also print :func:`trunk_flops`' table: parameters and FLOPs of DeiT-T/S/B with the
            patchify stem, the convolutional stem and CAPE positions (counted, not timed).
        quiet: do not print the tables.
        markdown: also write the tables as Markdown to this file (``docs/benchmarks/bench.md`` is the one
            the documentation includes; the trunk table is its section ``trunks``).

    Returns:
        One dict per dtype with the keys ``model_type, hidden, intermediate, heads, lm_layers,
        lora, in_dim, batch, tokens, dtype, device, flops_forward, flops_backward, flops, block_ms,
        ideal_ms, matmul_shape, block_tflops, ideal_tflops, ratio, peak_mem_mib, mem_method,
        weights_mib``. ``peak_mem_mib`` is the step's peak above the memory held before it (weights,
        inputs): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's resident-set
        high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``, or else ``psutil`` RSS
        sampled every millisecond), as ``mem_method`` says. In a long-lived process (a notebook) the CPU
        figure can read low: memory freed earlier and still resident is reused without raising RSS.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    batch = batch if batch is not None else (64 if on_gpu else 1)
    repeats = repeats if repeats is not None else (10 if on_gpu else 2)
    warmup = warmup if warmup is not None else (3 if on_gpu else 1)
    for name, value in (("batch", batch), ("tokens", tokens), ("repeats", repeats), ("warmup", warmup)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (warmup steps also measure the peak memory), got {value}.")
    notes = []
    if dtypes is None:
        dtypes = ("float32", "bfloat16")
        if not on_gpu and not _cpu_native("bfloat16"):
            dtypes = ("float32",)
            notes.append(
                "bfloat16 skipped: this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so bf16 backward "
                "matmuls run unvectorised (minutes per step); ask for it with --dtypes [float32,bfloat16]."
            )
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {list(_DTYPES)}, got {list(dtypes)}.")
    for name in dtypes:
        if name != "float32" and not on_gpu and not _cpu_native(name):
            notes.append(f"this CPU has no native {name} matmuls: they run unvectorised (backward above all).")

    config = lm_config(model_type, hidden, intermediate, heads, kv_heads=kv_heads, num_layers=lm_layers)
    rows = []
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        block = FrozenLMBlock.from_config(
            config, list(range(lm_layers)), in_dim, dtype=dtype_name, seed=seed, lora=lora
        )
        block.to(dev).train()
        flops = block_flops(block, batch, tokens)
        row = _time_one(block, dev, dtype, batch, tokens, flops["total"], repeats, warmup, seed)
        weights = sum(p.numel() * p.element_size() for p in block.parameters())
        rows.append(
            {
                "model_type": model_type, "hidden": hidden, "intermediate": intermediate, "heads": heads,
                "lm_layers": lm_layers, "lora": lora and dataclasses.asdict(lora), "in_dim": in_dim, "batch": batch,
                "tokens": tokens, "dtype": dtype_name, "device": str(dev), "flops_forward": flops["forward"],
                "flops_backward": flops["backward"], "flops": flops["total"], **row,
                "weights_mib": weights / 2**20,
            }
        )  # fmt: skip
        del block
        if on_gpu:
            torch.cuda.empty_cache()
    trunk_rows = trunk_flops() if trunks else None
    if not quiet:
        print_table(rows, notes)
        if trunk_rows:
            print_trunk_table(trunk_rows)
    if markdown is not None:
        text = markdown_table(rows, notes)
        if trunk_rows:  # a section of its own, for the guides that quote only it
            text += f"\n<!-- --8<-- [start:trunks] -->\n{markdown_trunk_table(trunk_rows)}<!-- --8<-- [end:trunks] -->\n"
        write_atomically(markdown, text)
    return rows


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """PyTorch's ``FlopCounterMode`` that also counts attention on CPU tensors. Its table knows the CUDA
    attention kernels only, so the CPU's fused kernel, what ``scaled_dot_product_attention`` runs there,
    counted 0; it gets the same closed form (``Q K^T`` and ``P V``: 2 x 2 B H N M d, backward twice that)."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )


def trunk_flops(backbones: Sequence[str] = DEIT, img_size: int = 224) -> list[dict[str, Any]]:
    """Parameters and forward FLOPs per image of each timm ViT in ``backbones`` in the variants of
    ``TRUNK_VARIANTS``: patchify stem (as timm builds it), convolutional stem (Xiao et al.; one block
    fewer) and CAPE positions (no position table).

    FLOPs are those of matmuls and convolutions (a multiply-add counts 2) of a 1000-class model's
    eval forward on one ``img_size`` image, counted by ``FlopCounterMode`` on the meta device.
    Returns one row per (backbone, variant): ``backbone, stem, pos_embed, depth, params, flops,
    embed_flops`` (the patch embedding's part).
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


TRUNK_COLUMNS = ("backbone", "stem", "positions", "blocks", "params (M)", "vs patchify", "GFLOP", "vs patchify", "stem GFLOP")
TRUNK_TITLE = "Visual trunks: forward FLOPs per 224 px image and parameters (1000 classes)"


def _trunk_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """:func:`trunk_flops` rows as table cells, each with its change against its backbone's patchify row."""
    reference, cells = {}, []
    for row in rows:
        base = reference.setdefault(row["backbone"], row)
        cells.append([
            row["backbone"], row["stem"], row["pos_embed"], str(row["depth"]), f"{row['params'] / 1e6:.2f}",
            f"{row['params'] / base['params'] - 1:+.1%}", f"{row['flops'] / 1e9:.2f}",
            f"{row['flops'] / base['flops'] - 1:+.1%}", f"{row['embed_flops'] / 1e9:.3f}",
        ])  # fmt: skip
    return cells


def print_trunk_table(rows: list[dict[str, Any]]) -> None:
    """Print :func:`trunk_flops` rows, each with its change against the backbone's patchify row."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=TRUNK_TITLE)
    for column in TRUNK_COLUMNS:
        table.add_column(column, justify="left" if column in ("backbone", "stem", "positions") else "right")
    for cells in _trunk_cells(rows):
        table.add_row(*cells)
    Console(width=140).print(table)


def markdown_trunk_table(rows: list[dict[str, Any]]) -> str:
    """:func:`trunk_flops` rows as a Markdown table."""
    lines = [f"{TRUNK_TITLE}:", "", "| " + " | ".join(TRUNK_COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(TRUNK_COLUMNS) - 3)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in _trunk_cells(rows)]) + "\n"


def lm_config(
    model_type: ModelType,
    hidden: int,
    intermediate: int,
    heads: int,
    *,
    kv_heads: int | None = None,
    num_layers: int = 1,
) -> PretrainedConfig:
    """A transformers config of one family with this layer shape (e.g. ``LlamaConfig`` for ``llama``)."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}).")
    if kv_heads is not None and model_type not in _ROTARY:
        raise ValueError(f"kv_heads is only supported for {', '.join(_ROTARY)}, not {model_type!r}.")
    if model_type in _ROTARY:
        kv = kv_heads if kv_heads is not None else heads
        if heads % kv:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv}).")
        shape = dict(
            hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv
        )
    elif model_type == "opt":
        shape = dict(hidden_size=hidden, ffn_dim=intermediate, num_attention_heads=heads, word_embed_proj_dim=hidden)
    elif model_type == "gpt2":
        shape = dict(n_embd=hidden, n_inner=intermediate, n_head=heads)
    elif model_type == "bert":
        shape = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads)
    else:
        raise ValueError(f"Unsupported model_type {model_type!r}; choose one of {', '.join(ModelType.__args__)}.")
    return AutoConfig.for_model(model_type, num_hidden_layers=num_layers, **shape)


def block_flops(block: FrozenLMBlock, batch: int, tokens: int) -> dict[str, int]:
    """Matmul FLOPs of one forward + input-gradient backward of ``block`` on ``[batch, tokens, in_dim]``.

    Returns ``forward``, ``backward``, ``total`` and the parts ``lm_linear``, ``attention``,
    ``adapters`` and ``lora`` (forward FLOPs of each). Counting rule in the module docstring: backward
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


def _title(first: dict[str, Any]) -> str:
    lora = f", LoRA r={first['lora']['r']}" if first["lora"] else ""
    return (
        f"{first['model_type']} layer x{first['lm_layers']} (hidden {first['hidden']}, ffn {first['intermediate']}, "
        f"{first['heads']} heads{lora}), adapters from {first['in_dim']}, "
        f"batch {first['batch']} x {first['tokens']} tokens, {first['device']}"
    )


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["dtype"], f"{row['flops'] / 1e9:.2f}", f"{row['block_ms']:.1f}", f"{row['ideal_ms']:.1f}",
        _sig(row["block_tflops"]), _sig(row["ideal_tflops"]), f"{row['ratio']:.2f}", f"{row['peak_mem_mib']:.0f}",
        f"{row['weights_mib']:.0f}",
    ]  # fmt: skip


def _explanation(rows: list[dict[str, Any]]) -> str:
    methods = "; ".join(sorted({row["mem_method"] for row in rows}))
    shapes = ", ".join(f"{row['dtype']} {row['matmul_shape']}" for row in rows)
    return (
        "GFLOP: matmul FLOPs of forward + backward (input grads only for the frozen weights). "
        f"ideal: one torch.matmul of the same FLOPs and dtype in the same run ({shapes}). "
        "ratio = block ms / ideal ms (medians). "
        f"peak: the step's peak above the memory held before it ({methods})."
    )


COLUMNS = ["dtype", "GFLOP", "block ms", "ideal ms", "TFLOP/s", "ideal TFLOP/s", "ratio", "peak MiB", "weights MiB"]


def markdown_table(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """``bench`` rows as a Markdown table with its title and how the figures were obtained."""
    lines = [f"{_title(rows[0])}:", "", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", _explanation(rows), *(f"Note: {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> None:
    """Print ``bench`` rows as a rich table, with how the figures were obtained below it."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        return
    table = Table(title=escape(_title(rows[0])))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "dtype" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=120)
    console.print(table)
    console.print(escape(_explanation(rows)), style="dim")
    for note in notes:
        console.print(escape(f"Note: {note}"), style="yellow")


def _cpu_native(dtype_name: str) -> bool:
    """Whether oneDNN has native CPU matmuls for this reduced-precision dtype (AVX512-BF16/FP16, AMX)."""
    probe = "_is_mkldnn_bf16_supported" if dtype_name == "bfloat16" else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):  # private ops; assume the fast path when they are missing
        return True


def _sig(value: float) -> str:
    return f"{value:.3g}"


def _time_one(
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
    """Median times of the block step and of the ideal matmul, and the step's peak memory."""
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
    n = max(1, round((flops / 2) ** (1 / 3)))
    m = max(1, round(flops / (2 * n * n)))
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
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (CUDA synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    return statistics.median(_timed(fn, sync) for _ in range(repeats))


def ideal_seconds(flops: int, device: torch.device, repeats: int) -> float:
    """The FLOP ideal: the time of one fp32 ``torch.matmul`` ``[m, n] @ [n, n].T`` scaled to ``flops``."""
    n = max(1, round((flops / 2) ** (1 / 3)))
    m = max(1, round(flops / (2 * n * n)))
    a, w = torch.randn(m, n, device=device), torch.randn(n, n, device=device)
    return median_seconds(lambda: torch.matmul(a, w.mT), device, repeats) * flops / (2 * m * n * n)


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


class _PeakMemory:
    """Peak memory of a code region above what was held when it started (bytes in ``.peak``)."""

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


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(bench)

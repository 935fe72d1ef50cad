"""`frozenlm bench`: speed of a frozen LM block's training step against its FLOP ideal; with `--config`,
of any config's whole training step (`frozenlm.bench_config`).

The block (`Linear(in_dim -> d_llm)` -> frozen LM layer(s) -> `Linear(d_llm -> in_dim)`) is
built with random weights from a config alone (`FrozenLMBlock.from_config`), so nothing is
downloaded. One training step of the block is timed: forward, then backward to the input tokens
(which require grad, as they do inside a ViT); the frozen weights get no gradient, the two adapters do.
How FLOPs are counted and what the ideal is: `measure`, which measures; this module is the
command (its options, tables and Markdown).

A second table gives the parameters and forward FLOPs of the visual trunks the block sits in
(`trunk_flops`): DeiT-T/S/B with the patchify stem, with the convolutional stem
(one block fewer) and with CAPE positions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from frozenlm.files import write_atomically
from frozenlm.llm.block import DType
from frozenlm.llm.families import FAMILIES, SHAPES, lm_config
from frozenlm.llm.lora import LoRAConfig
from frozenlm.measure import DTYPES, cpu_native, measure_block_step, trunk_flops

# Imported from here before the measuring part moved to frozenlm.measure (and the shapes to the families).
from frozenlm.measure import block_flops, flop_counter, ideal_seconds, median_seconds  # noqa: F401, E402

ModelType = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]
LLAMA_7B = SHAPES["llama-7b"]  # the default shape: the LM4VE block


def bench(
    *,
    config: str | None = None,
    batch_size: int | None = None,
    threads: list[int] | None = None,
    llm_random: bool = False,
    loader_batches: int = 5,
    count_only: bool = False,
    args: list[str] | None = None,
    output: str | None = None,
    model_type: ModelType = "llama",
    hidden: int = LLAMA_7B.hidden,
    intermediate: int = LLAMA_7B.intermediate,
    heads: int = LLAMA_7B.heads,
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

    With `config`, instead: one whole training step of that config (task and datamodule built as
    `frozenlm fit` builds them) against a matmul of its FLOPs, at one and two threads, the loader's time
    per batch in one process and its share of the step with the config's workers, peak memory and parameter counts (`frozenlm.bench_config`
    says how); the block options below are then unused, except `device`, `repeats`, `warmup`.

    Args:
        config: a trainer config (`configs/*.yaml`): bench its whole training step. Its dataset, where
            absent, is replaced by the family's tiny generated data (`frozenlm.data.fake`).
        batch_size: the batch with `config` (default: the config's `data.batch_size`).
        threads: CPU thread counts to time the step at, each against its own ideal (default `[1, 2]`).
        llm_random: with `config`: random weights of the real shapes for every pretrained part (LM block,
            METER's towers, teachers), nothing downloaded; the output says so.
        loader_batches: with `config`: batches the loader is timed over (after its first).
        count_only: with `config`: parameters, FLOPs and memory only (two untimed steps, no loader).
        args: with `config`: dotted overrides as `frozenlm fit` takes them, e.g.
            `'[--model.llm.checkpoint=/models/llama-7b]'`.
        output: with `config`: also write the row as JSON to this file.
        model_type: language-model family whose transformer layer is timed.
        hidden: hidden size `d_llm` of the LM layer (default LLaMA-7B's, as all shape defaults:
            `frozenlm.llm.families.SHAPES`).
        intermediate: feed-forward width of the LM layer.
        heads: attention heads of the LM layer.
        kv_heads: key/value heads for grouped-query attention (llama, mistral, qwen2 only); default
            `heads` (plain multi-head attention, as LLaMA-7B).
        lm_layers: number of consecutive frozen LM layers in the block (the paper's best ablation uses 2).
        lora: LoRA adapters on the LM layers (`"{r: 8, alpha: 16}"`, see
            `LoRAConfig`); they train, so their weights get gradients.
        in_dim: width of the visual tokens the adapters map from and back to (ViT-S: 384).
        batch: images per step; default 1 on CPU (keeps the default CPU run to a few minutes), 64 on GPU.
        tokens: tokens per image (ViT/16 at 224 px with CLS: 197).
        dtypes: dtypes of the frozen LM weights to compare. `bfloat16`/`float16` runs under
            `torch.autocast` of that dtype (CUDA or CPU), as mixed-precision training does;
            `float32` runs without autocast (TF32 stays at PyTorch's setting, the same for the ideal).
            Default `[float32, bfloat16]`, except on a CPU without native bf16 matmuls (no
            AVX512-BF16/AMX, see `torch.ops.mkldnn._is_mkldnn_bf16_supported()`): `[float32]`,
            because there the bf16 backward matmuls take an unvectorised path (minutes per step at
            the default shape); pass `--dtypes [float32,bfloat16]` to time it anyway.
        device: `cuda`, `cuda:1`, `cpu`...; default `cuda` when available, else `cpu`.
        repeats: timed steps per dtype (the median is reported); default 2 on CPU, 10 on GPU.
        warmup: untimed steps before timing; the peak memory is measured over them. Default 1 on
            CPU, 3 on GPU.
        seed: seed of the random LM weights and inputs.
        trunks: also print `trunk_flops`' table: parameters and FLOPs of DeiT-T/S/B with the
            patchify stem, the convolutional stem and CAPE positions (counted, not timed).
        quiet: do not print the tables.
        markdown: also write the tables as Markdown to this file (`docs/benchmarks/bench.md` is the one
            the documentation includes; the trunk table is its section `trunks`).

    Returns:
        One dict per dtype with the keys `model_type, hidden, intermediate, heads, lm_layers,
        lora, in_dim, batch, tokens, dtype, device, flops_forward, flops_backward, flops, block_ms,
        ideal_ms, matmul_shape, block_tflops, ideal_tflops, ratio, peak_mem_mib, mem_method,
        weights_mib`. `peak_mem_mib` is the step's peak above the memory held before it (weights,
        inputs): `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's resident-set
        high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`, or else `psutil` RSS
        sampled every millisecond), as `mem_method` says. In a long-lived process (a notebook) the CPU
        figure can read low: memory freed earlier and still resident is reused without raising RSS.

    Examples:
        From the command line: `frozenlm bench` (random weights of the LLaMA-7B block shape), or
        `frozenlm bench --help` for the shapes, dtypes and batch sizes it takes.
    """
    if config is not None:
        from frozenlm.bench_config import measure_config

        row = measure_config(
            config, batch_size=batch_size, threads=threads or [1, 2], repeats=repeats or 5, warmup=warmup or 2,
            loader_batches=loader_batches, llm_random=llm_random, device=device, args=args or [], timed=not count_only,
        )  # fmt: skip
        if not quiet and not count_only:
            print_config_table([row])
        if output is not None:
            write_atomically(output, json.dumps([row], indent=1) + "\n")
        return [row]
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
        if not on_gpu and not cpu_native("bfloat16"):
            dtypes = ("float32",)
            notes.append(
                "bfloat16 skipped: this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so bf16 backward "
                "matmuls run unvectorised (minutes per step); ask for it with --dtypes [float32,bfloat16]."
            )
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty subset of {list(DTYPES)}, got {list(dtypes)}.")
    for name in dtypes:
        if name != "float32" and not on_gpu and not cpu_native(name):
            notes.append(f"this CPU has no native {name} matmuls: they run unvectorised (backward above all).")

    config = lm_config(model_type, hidden, intermediate, heads, kv_heads=kv_heads, num_layers=lm_layers)
    rows = []
    for dtype_name in dtypes:
        measured = measure_block_step(
            config, lm_layers=lm_layers, in_dim=in_dim, dtype=dtype_name, device=dev, batch=batch, tokens=tokens,
            repeats=repeats, warmup=warmup, seed=seed, lora=lora,
        )  # fmt: skip
        rows.append(
            {
                "model_type": model_type, "hidden": hidden, "intermediate": intermediate, "heads": heads,
                "lm_layers": lm_layers, "lora": lora and dataclasses.asdict(lora), "in_dim": in_dim, "batch": batch,
                "tokens": tokens, "dtype": dtype_name, "device": str(dev), **measured,
            }
        )  # fmt: skip
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


TRUNK_COLUMNS = ("backbone", "stem", "positions", "blocks", "params (M)", "vs patchify", "GFLOP", "vs patchify", "stem GFLOP")
TRUNK_TITLE = "Visual trunks: forward FLOPs per 224 px image and parameters (1000 classes)"


def _trunk_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    """`trunk_flops` rows as table cells, each with its change against its backbone's patchify row."""
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
    """Print `trunk_flops` rows, each with its change against the backbone's patchify row."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=TRUNK_TITLE)
    for column in TRUNK_COLUMNS:
        table.add_column(column, justify="left" if column in ("backbone", "stem", "positions") else "right")
    for cells in _trunk_cells(rows):
        table.add_row(*cells)
    Console(width=140).print(table)


def markdown_trunk_table(rows: list[dict[str, Any]]) -> str:
    """`trunk_flops` rows as a Markdown table."""
    lines = [f"{TRUNK_TITLE}:", "", "| " + " | ".join(TRUNK_COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(TRUNK_COLUMNS) - 3)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in _trunk_cells(rows)]) + "\n"


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
    """`bench` rows as a Markdown table with its title and how the figures were obtained."""
    lines = [f"{_title(rows[0])}:", "", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", _explanation(rows), *(f"Note: {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> None:
    """Print `bench` rows as a rich table, with how the figures were obtained below it."""
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


CONFIG_COLUMNS = ["family", "config", "batch", "trainable M", "frozen M", "GFLOP/sample", "threads",
                  "step ms", "ideal ms", "step/ideal", "loader ms, 1 proc. (workers)", "loader/step", "peak MiB"]  # fmt: skip


def config_cells(row: dict[str, Any]) -> list[list[str]]:
    """One line per thread count of a `bench --config` row (the row's own cells on its first)."""
    lines = []
    for i, t in enumerate(row["timings"]):
        loader = f"{row['loader_ms']:.1f} ({row['loader_workers']})" if row["loader_ms"] is not None else "-"
        share = f"{row['loader_per_step']:.2f}" if row["loader_per_step"] is not None else "-"
        first = [row["family"], Path(row["config"]).stem, str(row["batch"]), f"{row['params_trainable'] / 1e6:.2f}",
                 f"{row['params_frozen'] / 1e6:.2f}", f"{row['flops_per_sample'] / 1e9:.2f}"]  # fmt: skip
        lines.append((first if i == 0 else [""] * len(first)) + [
            str(t["threads"]), f"{t['step_ms']:.1f}", f"{t['ideal_ms']:.1f}", f"{t['ratio']:.2f}",
            loader if i == 0 else "", share if i == 0 else "", f"{row['peak_mem_mib']:.0f}" if i == 0 else "",
        ])  # fmt: skip
    return lines


def print_config_table(rows: list[dict[str, Any]]) -> None:
    """Print `bench --config` rows, with what the figures mean and which weights and data they used."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"One training step (forward, backward, optimiser) on {rows[0]['device']}")
    for column in CONFIG_COLUMNS:
        table.add_column(column, justify="left" if column in ("family", "config") else "right")
    for row in rows:
        for cells in config_cells(row):
            table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    console.print(escape(
        "GFLOP/sample: the training step's matmul, convolution and attention FLOPs (forward + backward, "
        "FlopCounterMode) / batch. step/ideal: median step time / median time of one matmul of the same FLOPs, "
        "interleaved in the same run. loader: median time per batch of the training loader alone, in one process; "
        "loader/step: that / min(workers, cores) / step (above 1 the loader cannot keep up). peak: "
        "the step's peak memory above what was held before it."
    ), style="dim")  # fmt: skip
    for row in rows:
        for note in [f"data: {row['data']}", f"weights: {row['weights']}", *row["notes"]]:
            style = "yellow" if "random" in note or "generated" in note else "dim"
            console.print(escape(f"{Path(row['config']).stem}: {note}"), style=style)


def _sig(value: float) -> str:
    return f"{value:.3g}"


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(bench)

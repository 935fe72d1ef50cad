"""Measure the memory of loading one frozen layer from a large sharded checkpoint.

Claim under test: `FrozenLMBlock.from_pretrained(dir, [-1], ...)` reads only the chosen layer's
tensors, so its peak memory tracks one layer, not the checkpoint (the reference code loads the
whole 13.5 GB LLaMA checkpoint to take one 0.4 GB layer).

What it does, without any download:

1. Writes a LLaMA-shaped `LlamaForCausalLM` checkpoint with random bf16 weights (default: LLaMA-7B
   layer shapes, hidden 4096 / FFN 11008 / vocab 32000, but 8 layers instead of 32: ~3.8 GB) into a
   temporary folder (or `--dir`), sharded like the Hugging Face hub's files
   (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
2. In a fresh Python process per measurement, imports everything first, takes the resident set
   size (RSS) as baseline, resets the kernel's RSS high-water mark (`/proc/self/clear_refs`;
   falls back to `ru_maxrss`), loads, and reports the peak RSS above the baseline and the RSS
   still held afterwards.
3. Does the same for a `pytorch_model-*.bin` variant (written after the safetensors one is
   deleted, so only one copy is on disk at a time) unless `--no-bin`.
4. For comparison (`--no-naive` skips it), measures loading the whole `.bin` checkpoint the way
   the reference code does: `torch.load` of every file (no mmap), which materialises all of it.
   (`safetensors.torch.load_file` is lazy, memory-mapped, so loading every shard with it costs
   no resident memory until the tensors are read; it makes no useful comparison row.)

It prints a markdown table of the measured figures only (nothing is extrapolated to 32 layers).
The files were just written, so they are read from the page cache; page-cache pages are not part of
a process's RSS unless mapped into it (memory-mapped pages that are touched do count).

    python benchmarks/loading_memory.py [--dir DIR] [--layers 8] [--no-bin] [--no-naive] [--keep] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import Report  # noqa: E402

MiB = 2**20
GB = 1e9


# --------------------------------------------------------------------------------------------
# writing the checkpoint
# --------------------------------------------------------------------------------------------
def tensor_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """`LlamaForCausalLM` state-dict names and shapes (multi-head attention, as LLaMA-7B)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: float, itemsize: int = 2) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `shard_bytes` (like `save_pretrained`)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_checkpoint(folder: Path, args: argparse.Namespace, fmt: str) -> dict:
    """Write config.json, the shards and their index; return what was written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        dtype="bfloat16",
    ).save_pretrained(folder)  # fmt: skip
    shapes = tensor_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    shards = plan_shards(shapes, args.shard_gb * GB)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i, names in enumerate(shards, 1):
        file = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        state = {}
        for name in names:
            tensor = torch.empty(shapes[name], dtype=torch.bfloat16)
            if tensor.ndim == 1:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            state[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        if fmt == "safetensors":
            save_file(state, folder / file, metadata={"format": "pt"})
        else:
            torch.save(state, folder / file)
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return {"seconds": time.perf_counter() - start, "shards": len(shards), "tensor_bytes": total}


def layer_bytes(hidden: int, intermediate: int) -> int:
    """bf16 bytes of one LLaMA decoder layer (4 attention + 3 MLP matrices, 2 norm vectors)."""
    return 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------
# measuring, in a fresh process
# --------------------------------------------------------------------------------------------
def child(folder: str, how: str) -> None:
    """Load from `folder` the way `how` says and print one JSON line of memory figures."""
    import resource

    import psutil
    import safetensors.torch
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the layer class, imported up front)

    from frozenlm.llm.block import FrozenLMBlock

    process = psutil.Process()
    baseline = process.memory_info().rss
    before = _rss_parts()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    start = time.perf_counter()
    if how == "frozenlm":
        kept = FrozenLMBlock.from_pretrained(folder, [-1], in_dim=384, dtype="bfloat16")
        loaded = sum(p.numel() * p.element_size() for p in kept.layers.parameters())
    else:  # the whole checkpoint in memory, as a plain script would load it
        kept = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            kept.update(safetensors.torch.load_file(file))
        for file in sorted(Path(folder).glob("*.bin")):
            kept.update(torch.load(file, map_location="cpu", weights_only=True))
        loaded = sum(t.numel() * t.element_size() for t in kept.values())
    seconds = time.perf_counter() - start
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        status = Path("/proc/self/status").read_text().splitlines()
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    held = process.memory_info().rss
    after = _rss_parts()
    print(json.dumps({
        "baseline": baseline, "peak": peak - baseline, "held": held - baseline, "loaded": loaded,
        "held_anon": after["RssAnon"] - before["RssAnon"], "held_file": after["RssFile"] - before["RssFile"],
        "seconds": seconds, "method": method,
    }))  # fmt: skip


def _rss_parts() -> dict[str, int]:
    """Anonymous and file-backed (memory-mapped file pages) parts of the RSS, in bytes."""
    parts = {"RssAnon": 0, "RssFile": 0}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in parts:
            parts[key] = int(line.split()[1]) * 1024
    return parts


def measure(folder: Path, how: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), how], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"measurement {how} on {folder} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
def main() -> None:
    from frozenlm.llm.families import SHAPES

    llama = SHAPES["llama-7b"]  # its layers' shapes; fewer layers (--layers)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers in the checkpoint (default 8)")
    parser.add_argument("--hidden", type=int, default=llama.hidden)
    parser.add_argument("--intermediate", type=int, default=llama.intermediate)
    parser.add_argument("--heads", type=int, default=llama.heads)
    parser.add_argument("--vocab", type=int, default=llama.vocab)
    parser.add_argument("--shard-gb", type=float, default=1.0, help="maximum shard size in GB (default 1.0)")
    parser.add_argument("--no-bin", action="store_true", help="skip the pytorch_model.bin variant")
    parser.add_argument("--no-naive", action="store_true", help="skip loading the whole checkpoint for comparison")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--markdown", type=Path, help="also write the table here (docs/benchmarks/ is what the docs include)")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    shapes = tensor_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    need = 2 * sum(_numel(s) for s in shapes.values())
    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="frozenlm-loading-"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need * 1.2:
        raise SystemExit(
            f"{root} has {free / GB:.1f} GB free; the checkpoint needs {need / GB:.1f} GB. Use --dir or --layers."
        )

    one_layer = layer_bytes(args.hidden, args.intermediate)
    results = []
    formats = ["safetensors"] + ([] if args.no_bin else ["bin"])
    try:
        for fmt in formats:
            folder = root / f"llama-{args.layers}layers-{fmt}"
            written = write_checkpoint(folder, args, fmt)
            on_disk = disk_bytes(folder)
            print(f"wrote {written['shards']} {fmt} shards, {on_disk / GB:.2f} GB, in {written['seconds']:.0f} s",
                  file=sys.stderr)  # fmt: skip
            # The comparison is the reference's way: torch.load of the whole checkpoint (materialised).
            # safetensors.torch.load_file is lazy (memory-mapped; untouched pages are not resident),
            # so "loading" all of it with load_file says nothing until the tensors are read.
            hows = ["frozenlm"] + ([] if args.no_naive or fmt != "bin" else ["whole"])
            for how in hows:
                figures = measure(folder, how)
                results.append({"fmt": fmt, "how": how, "disk": on_disk, "shards": written["shards"], **figures})
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    import torch
    import transformers

    report = Report(args.markdown)
    report.line()
    report.line(
        f"LLaMA-shaped checkpoint, random bf16 weights: hidden {args.hidden}, FFN {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}, shards <= {args.shard_gb:g} GB. One layer: "
        f"{one_layer / MiB:.0f} MiB. Peak = RSS high-water mark of a fresh process above its RSS after "
        f"imports ({results[0]['method']}); held = RSS still used after loading, split into anonymous "
        "memory and memory-mapped file pages. "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; files in the page cache."
    )
    report.line()
    header = ["format", "loader", "on disk", "loaded", "peak RSS", "peak / layer", "peak / checkpoint",
              "held (anon + file)", "time"]  # fmt: skip
    report.line("| " + " | ".join(header) + " |")
    report.line("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        fmt = f"{r['shards']} x {'.safetensors' if r['fmt'] == 'safetensors' else '.bin'}"
        loader = (
            "`FrozenLMBlock.from_pretrained(dir, [-1], dtype=\"bfloat16\")`"
            if r["how"] == "frozenlm"
            else "`torch.load` of every shard (no mmap)"
        )
        report.line(
            f"| {fmt} | {loader} | {r['disk'] / MiB:,.0f} MiB | {r['loaded'] / MiB:,.0f} MiB | "
            f"{r['peak'] / MiB:,.0f} MiB | {r['peak'] / one_layer:.2f} | {r['peak'] / r['disk']:.3f} | "
            f"{r['held'] / MiB:,.0f} MiB ({r['held_anon'] / MiB:,.0f} + {r['held_file'] / MiB:,.0f}) | "
            f"{r['seconds']:.1f} s |"
        )
    report.save()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()

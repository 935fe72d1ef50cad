"""`frozenlm bench` on tiny layer shapes: row structure, FLOP counts, and the jsonargparse CLI. No timing asserts."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jsonargparse import CLI
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from frozenlm.bench import bench
from frozenlm.llm.families import FAMILIES, SHAPES, lm_config
from frozenlm.measure import block_flops
from frozenlm.llm.block import FrozenLMBlock
from frozenlm.llm.lora import LoRAConfig

TINY = dict(hidden=64, intermediate=128, heads=2, in_dim=32, batch=2, tokens=5)
KEYS = {
    "model_type", "hidden", "intermediate", "heads", "lm_layers", "lora", "in_dim", "batch", "tokens", "dtype",
    "device", "flops_forward", "flops_backward", "flops", "block_ms", "ideal_ms", "matmul_shape", "block_tflops",
    "ideal_tflops", "ratio", "peak_mem_mib", "mem_method", "weights_mib",
}  # fmt: skip


def llama_hand_count(hidden, intermediate, heads, in_dim, batch, tokens):
    """Matmul FLOPs of one LLaMA layer between adapters, written out by hand."""
    rows = batch * tokens
    head_dim = hidden // heads
    q = k = v = o = 2 * rows * hidden * hidden  # multi-head attention: k, v as wide as q
    gate = up = down = 2 * rows * hidden * intermediate
    qk = av = 2 * batch * heads * tokens * tokens * head_dim
    adapter_in = adapter_out = 2 * rows * in_dim * hidden
    forward = q + k + v + o + gate + up + down + qk + av + adapter_in + adapter_out
    # frozen linears: dX only; QK^T and PV: grads of both operands; adapters: dX and dW.
    backward = (q + k + v + o + gate + up + down) + 2 * (qk + av) + 2 * (adapter_in + adapter_out)
    return forward, backward


def test_bench_rows_cpu_fp32_and_bf16(capsys):
    rows = bench(**TINY, dtypes=("float32", "bfloat16"), device="cpu", repeats=2, warmup=1)
    assert [row["dtype"] for row in rows] == ["float32", "bfloat16"]
    forward, backward = llama_hand_count(**TINY)
    for row in rows:
        assert set(row) == KEYS
        assert row["device"] == "cpu" and row["batch"] == 2 and row["tokens"] == 5
        assert (row["flops_forward"], row["flops_backward"]) == (forward, backward)
        assert row["flops"] == forward + backward
        for key in ("block_ms", "ideal_ms", "block_tflops", "ideal_tflops", "ratio", "weights_mib"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert math.isfinite(row["peak_mem_mib"]) and row["peak_mem_mib"] >= 0
        assert row["block_tflops"] == pytest.approx(row["flops"] / (row["block_ms"] * 1e-3) / 1e12)
        assert row["ratio"] == pytest.approx(row["block_ms"] / row["ideal_ms"])
        assert row["mem_method"].startswith("CPU")
    # bf16 weights hold half the bytes of fp32 ones (the adapters stay fp32).
    assert rows[1]["weights_mib"] < rows[0]["weights_mib"]
    printed = capsys.readouterr().out
    assert "float32" in printed and "bfloat16" in printed and "ratio" in printed


def test_bench_through_jsonargparse_cli():
    args = ["--hidden=64", "--intermediate=96", "--heads=4", "--in_dim=16", "--batch=1", "--tokens=3",
            "--dtypes=[float32]", "--device=cpu", "--repeats=1", "--warmup=1", "--quiet=true"]  # fmt: skip
    rows = CLI(bench, args=args)
    assert len(rows) == 1 and rows[0]["dtype"] == "float32" and rows[0]["intermediate"] == 96
    assert rows[0]["flops_forward"] == llama_hand_count(64, 96, 4, 16, 1, 3)[0]


@pytest.mark.parametrize(
    "model_type, kv_heads, lora",
    [
        ("llama", None, None), ("llama", 1, None), ("gpt2", None, None), ("opt", None, None), ("bert", None, None),
        ("llama", 1, LoRAConfig(r=4, mlp=True)), ("gpt2", None, LoRAConfig(r=4, mlp=True)),
        ("bert", None, LoRAConfig(r=2)),
    ],
)  # fmt: skip
def test_flop_count_matches_torch_flop_counter(model_type, kv_heads, lora):
    """The analytic count equals what torch's FlopCounterMode sees in a real forward + backward.

    The math SDPA backend runs attention as plain matmuls (fused kernels are not all counted by
    FlopCounterMode on CPU, and recompute Q K^T in backward), so the counts must agree exactly.
    """
    config = lm_config(model_type, 64, 128, 4, kv_heads=kv_heads, num_layers=2)
    block = FrozenLMBlock.from_config(config, [0, 1], in_dim=24, lora=lora)
    x = torch.randn(3, 7, 24, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            out = block(x)
        with FlopCounterMode(display=False) as backward_counter:
            out.backward(torch.randn_like(out))
    count = block_flops(block, batch=3, tokens=7)
    assert count["forward"] == forward_counter.get_total_flops()
    assert count["backward"] == backward_counter.get_total_flops()
    assert count["total"] == count["forward"] + count["backward"]
    assert (count["lora"] > 0) == (lora is not None)
    # frozen weights got no gradient; the trainable adapters (and LoRA's) did
    assert all((p.grad is None) != ("lora_" in name) for name, p in block.layers.named_parameters())
    assert block.adapter_in.weight.grad is not None and x.grad is not None


def test_llama_7b_in_the_shape_table_has_llama_7bs_published_size():
    """6.74 B parameters (LLaMA's paper rounds it to 6.7 B): 32 layers, embeddings and LM head, final norm."""
    shape = SHAPES["llama-7b"]
    with torch.device("meta"):
        layer = FAMILIES[shape.family].build_layer(shape.config(), 0)
    total = shape.layers * sum(p.numel() for p in layer.parameters()) + 2 * shape.vocab * shape.hidden + shape.hidden
    assert round(total / 1e9, 2) == 6.74
    assert (shape.config().hidden_size, shape.config().num_key_value_heads) == (shape.hidden, shape.kv_heads)


def test_the_shapes_of_language_models_live_in_one_table():
    """No module or benchmark writes LLaMA-7B's feed-forward width itself: they read ``SHAPES``."""
    repo = Path(__file__).resolve().parents[1]
    table = repo / "frozenlm" / "llm" / "families.py"
    written = [
        f"{path.relative_to(repo)}:{node.lineno}"
        for path in [*(repo / "frozenlm").rglob("*.py"), *(repo / "benchmarks").glob("*.py")]
        if path != table
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == SHAPES["llama-7b"].intermediate
    ]
    assert not written, written


def test_bad_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="kv_heads"):
        lm_config("gpt2", 64, 128, 4, kv_heads=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        lm_config("llama", 65, 128, 4)
    with pytest.raises(ValueError, match="repeats"):
        bench(**TINY, device="cpu", repeats=0, quiet=True)
    with pytest.raises(ValueError, match="dtypes"):
        bench(**TINY, device="cpu", dtypes=("int8",), quiet=True)


# Run in a fresh process: in a long-lived one, malloc may serve the buffer from pages freed earlier and
# still resident (the top of its heap), which no RSS-based measurement can see.
PEAK_PROBE = """
import sys, time, torch
import frozenlm.measure as measure
sampled = sys.argv[1] == "sampled"
if sampled:  # /proc/self/clear_refs not writable: psutil sampling takes over
    def no_clear_refs(*args, **kwargs):
        raise PermissionError("clear_refs")
    measure.open = no_clear_refs
with measure._PeakMemory(torch.device("cpu")) as memory:
    buffer = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    if sampled:
        time.sleep(0.05)
    del buffer
print(memory.method)
print(memory.peak)
"""


@pytest.mark.parametrize("sampled", [False, True])
def test_cpu_peak_memory_sees_a_transient_allocation(sampled):
    """The CPU peak is the RSS high-water mark (or sampled RSS) above the start, so a freed buffer still shows."""
    probe = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, "sampled" if sampled else "clear_refs"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    method, peak = probe.stdout.strip().splitlines()[-2:]
    assert method.startswith("CPU: psutil" if sampled else "CPU: RSS high-water")
    assert 60 * 2**20 <= int(peak) < 200 * 2**20


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("pointcloud_step.py", ["--settings", "256:16", "--batch", "2", "--repeats", "1"]),
        ("motion_step.py", ["--scenes", "12", "--batch", "4", "--repeats", "1"]),
    ],
)
def test_benchmark_scripts_run_and_report_ratios(script, args):
    """The benchmark scripts still run (tiny settings; their timings are reported, never asserted)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / script), *args], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    header, row = done.stdout.strip().splitlines()[-2:]
    assert "step/ideal" in header and len(row.split(" | ")) == len(header.split(" | "))


def test_loader_throughput_benchmark_reports_every_pipeline_and_worker_count():
    """benchmarks/loader_throughput.py on the point-cloud pipeline (tiny settings; figures not asserted)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--workers", "1", "--batches", "2", "--only", "point-cloud"]  # motion loading: motion_step.py's test
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "loader_throughput.py"), *args], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| point-cloud")]
    assert [row[3] for row in rows] == ["0", "1"]
    assert all(float(row[4]) > 0 for row in rows)

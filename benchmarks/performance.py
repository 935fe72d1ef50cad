"""Every family's training step against its FLOP ideal, and every shipped config's size, in one command.

    python benchmarks/performance.py            # or: make performance

1. `frozenlm bench --config C --llm_random` for each family's representative config(s) (`TIMED`),
   each in its own process (so one's memory cannot raise another's high-water mark): one and two threads,
   the median of 5 timed steps after warm-up, step and ideal interleaved in the same run.
2. `frozenlm bench --config C --llm_random --count_only --batch_size 2` for every `configs/*.yaml`, each in
   its own process too (one process for all held 13 GB after a few 7B-shaped blocks): parameters,
   training-step FLOPs and the activations saved for backward, per sample.

Both go into `docs/performance/performance.json` (written after each config, so a run that stops
resumes where it stopped; `--fresh` starts over), and from it `docs/performance.md` (the timed table and
the GPU memory and epoch-time estimates of every config) is written. `--render` only rewrites the page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from frozenlm.bench_config import machine  # noqa: E402
from frozenlm.files import write_atomically  # noqa: E402

JSON = REPO / "docs" / "performance" / "performance.json"
PAGE = REPO / "docs" / "performance.md"
# (config, batch or None for the config's): one or more per family, the batch small enough for a shared
# 2-core CPU (the config's own where it fits there; at least 2 where the recipe mixes samples: mixup, cutmix).
TIMED = [  # in the order run: the cheaper first
    ("demo", None),
    ("mnist_vit_smollm2", None),
    ("argoverse2_vectornet", None),
    ("modelnet40_1k_pointbert", 2),
    ("imagenet21k_uta_base", 1),
    ("ssv2_videomae_small", 2),
    ("sqa3d_scanqa", 2),
    ("vqav2_meter", 1),
    ("flickr30k_meter", 1),
    ("cifar100_deit_lora", 2),
    ("imagenet_tleg_auxs", 2),
    ("imagenet_deit_small_cape_llama", 2),
    ("cifar100_deit_convstem_llama", 2),
    ("imagenet_deit_small_llama", 2),
]
THREADS = (1, 2)
# The paper's number each config targets, from docs/reproducing.md ("-": none published).
TARGETS = {
    "imagenet_deit_tiny": "72.1 top-1", "imagenet_deit_tiny_llama": "73.2 top-1",
    "imagenet_deit_small": "80.1 top-1", "imagenet_deit_small_llama": "80.7 top-1",
    "imagenet_deit_base": "80.6 top-1", "imagenet_deit_base_llama": "81.7 top-1",
    "ssv2_videomae_small": "64.71 top-1", "ssv2_videomae_small_llama": "65.89 top-1",
    "ssv2_videomae_base": "64.97 top-1", "ssv2_videomae_base_llama": "66.03 top-1",
    "scanobjectnn_objbg_pointbert": "87.43", "scanobjectnn_objbg_pointbert_llama": "88.64",
    "scanobjectnn_objonly_pointbert": "88.12", "scanobjectnn_objonly_pointbert_llama": "88.81",
    "scanobjectnn_hardest_pointbert": "83.07", "scanobjectnn_hardest_pointbert_llama": "83.87",
    "modelnet40_1k_pointbert": "92.67", "modelnet40_1k_pointbert_llama": "92.42",
    "modelnet40_4k_pointbert": "92.91", "modelnet40_4k_pointbert_llama": "92.82",
    "modelnet40_8k_pointbert": "93.19", "modelnet40_8k_pointbert_llama": "93.56",
    "argoverse1_vectornet": "minADE/minFDE/MR 0.77/1.23/13.2 %",
    "argoverse1_vectornet_llama": "minADE/minFDE/MR 0.76/1.20/12.7 %",
    "vqav2_meter": "test-dev 69.60", "vqav2_meter_llama": "test-dev 70.23",
    "flickr30k_meter": "text->image R@1 49.66", "flickr30k_meter_llama": "text->image R@1 50.22",
    "imagenet_uta_base_zeroshot": "UTA-B zero-shot 77.0",
    "sqa3d_scanqa": "test EM@1 47.20", "sqa3d_scanqa_llama": "test EM@1 48.09",
}  # fmt: skip
# Training samples per epoch (public dataset statistics, rounded; the configs' held-out splits ignored).
# SQA3D is not here: its training split's size after the answerable-only filter was not readable offline.
EPOCH_SAMPLES = {
    "CIFAR100DataModule": 50_000, "Caltech256DataModule": 21_400, "MNISTDataModule": 50_000,
    "DigitsDataModule": 1_437, "SSv2DataModule": 168_913, "ModelNet40DataModule": 9_843,
    "Argoverse1DataModule": 205_942, "Argoverse2DataModule": 199_908, "VQAv2DataModule": 658_000,
    "Flickr30kDataModule": 145_000,
}  # fmt: skip
IMAGENET = {"imagenet21k": 13_150_000, "default": 1_281_167}
SCANOBJECTNN = {"hardest": 11_416, "default": 2_309}
# Peak dense bf16 tensor throughput (FLOP/s) and memory (bytes) of the GPUs the estimates are for, and the
# assumed model-FLOP utilisation. RTX 3090: NVIDIA Ampere GA102 GPU architecture whitepaper (v2), "Peak
# BF16 Tensor TFLOPS with FP32 Accumulate" 71 (142 with sparsity); A100 80GB: NVIDIA A100 datasheet, BF16
# Tensor Core 312 TFLOPS dense.
GPUS = {"RTX 3090 (24 GB)": (71e12, 24 * 2**30), "A100 80GB": (312e12, 80 * 2**30)}
MFU = 0.4
# What the page says of a config the run has not reached (the run resumes where it stopped).
NOT_RUN = "not reached yet (`make performance` resumes)"
USABLE = 0.9  # the share of a GPU's memory the estimate allows a run (CUDA context, fragmentation)


def bench(config: str, batch: int | None, count_only: bool, out: Path) -> dict | str:
    """One `frozenlm bench --config` row in a fresh process, or the last line of its error."""
    command = [sys.executable, "-m", "frozenlm.cli", "bench", "--config", f"configs/{config}.yaml",
               "--llm_random", "true", "--quiet", "true", "--output", str(out), "--warmup", "1"]  # fmt: skip
    command += ["--threads", json.dumps(list(THREADS))]
    if batch is not None:
        command += ["--batch_size", str(batch)]
    if count_only:
        command += ["--count_only", "true"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    print(f"  {config}: {time.time() - start:.0f} s, exit {done.returncode}", flush=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {done.returncode}"
    return json.loads(out.read_text())[0]


def _update(kind: str, config: str | None, row: dict | str | None, fresh: bool = False) -> dict:
    """The JSON with `row` set (read, changed and written under a lock: the two phases may run at once)."""
    import fcntl

    JSON.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "frozenlm-performance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = {} if fresh or not JSON.exists() else json.loads(JSON.read_text())
        results.setdefault("timed", {})
        results.setdefault("counted", {})
        if config is not None:
            results[kind][config] = row
            results.setdefault("machines", {})[f"{kind}/{config}"] = machine()
        write_atomically(JSON, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def run(fresh: bool, only: set[str] | None, phases: Sequence[str]) -> dict:
    results = _update("timed", None, None, fresh)
    configs = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    jobs = [("timed", c, b) for c, b in TIMED if "timed" in phases]
    jobs += [("counted", c, 2) for c in configs if "counted" in phases]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, config, batch in jobs:
            if (only and config not in only) or isinstance(results[kind].get(config), dict):
                continue
            print(f"{kind} {config} (batch {batch or 'of the config'})", flush=True)
            row = bench(config, batch, kind == "counted", Path(tmp) / "row.json")
            results = _update(kind, config, row)
    return _update("timed", None, None)


# -- the page -------------------------------------------------------------------------------------------
def _m(n: float) -> str:
    return f"{n / 1e6:.1f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def _epoch_samples(row: dict) -> int | None:
    name = row["datamodule"].rsplit(".", 1)[-1]
    config = Path(row["config"]).stem
    if name == "ImageFolderDataModule":
        return IMAGENET["imagenet21k"] if "21k" in config else IMAGENET["default"]
    if name == "ScanObjectNNDataModule":
        return SCANOBJECTNN["hardest"] if "hardest" in config else SCANOBJECTNN["default"]
    return EPOCH_SAMPLES.get(name)


def _recipe(config: str) -> tuple[int, int, str]:
    """(per-GPU batch, GPUs, llm description) of a shipped config."""
    import yaml

    parsed = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    trainer = parsed.get("trainer") or {}
    devices = trainer.get("devices", 1)
    gpus = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
    llm = (parsed["model"].get("init_args") or {}).get("llm")
    block = "-"
    if llm:
        name = Path(str(llm.get("checkpoint"))).name if not str(llm.get("checkpoint")).startswith("pkg:") else str(llm["checkpoint"])
        block = f"{name} {llm.get('layers', [-1])}" + (" GCR" if llm.get("mode") == "auxiliary" else "")
    return int(parsed["data"]["init_args"].get("batch_size", 1)), gpus, block


def memory_at(row: dict, batch: int) -> float:
    """Estimated training memory (bytes) at `batch`: weights + gradients + optimiser state + the measured
    saved activations per sample x batch."""
    fixed = (row["weights_mib"] + row["grads_mib"] + 2 * row["params_trainable"] * 4 / 2**20) * 2**20
    return fixed + row["activation_mib_per_sample"] * 2**20 * batch


def largest_batch(row: dict, memory: float) -> int:
    fixed = memory_at(row, 0)
    per = row["activation_mib_per_sample"] * 2**20
    return max(0, math.floor((memory * USABLE - fixed) / per)) if per > 0 else 10**6


def render(results: dict) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `make performance` (`python benchmarks/performance.py`) from "
        "[performance/performance.json](performance/performance.json); do not edit by hand.",
        "",
    ]
    machines = list(results.get("machines", {}).values())
    m = machines[0] if machines else {}
    lines += [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores"
        + (f" ({m['cpu_capability']}: PyTorch's CPU kernels' instruction set)" if m.get("cpu_capability") else
           " (AVX-512 with BF16: this page's runs predate the field that records it)")
        + f"; PyTorch {m.get('torch')}, GPU: {m.get('gpu') or 'none'}. "
        "The 1-minute load average when each config finished (above the core count: other work ran beside "
        "it; times vary from run to run, ratios less): "
        + "; ".join(
            f"{kind} {min(v):.1f} to {max(v):.1f}"
            for kind in ("timed", "counted")
            if (v := [x["load_average_1min"] for k, x in results.get("machines", {}).items()
                      if k.startswith(kind + "/") and "load_average_1min" in x])
        )
        + f" on {m.get('cores')} cores.",
        "",
        "## One training step of each family against its FLOP ideal",
        "",
        "Protocol: `frozenlm bench --config C --llm_random --threads [1,2]` (batch: the recipe's, or the one in "
        "the table where the recipe's is too slow for this CPU); the task and datamodule built as `frozenlm fit` "
        "builds them, trained by Lightning's `Trainer`; one step = `on_after_batch_transfer` + forward + backward "
        "+ optimiser step, in float32 on the CPU. The first step is counted (FLOPs by PyTorch's `FlopCounterMode`: "
        "matmuls, convolutions, attention; forward and backward), then warm-up, then per thread count one untimed "
        "step and the median of 5 timed steps, each followed by the ideal: one `torch.matmul` of the same FLOPs, "
        "timed in the same run. loader: median time per batch of the training loader alone, in one "
        "process (after its first batch; through workers it would time their queue, filled ahead); loader / step: that / min(workers, this machine's cores) / the 1-thread step, "
        "the loader's share with the config's workers at best (above 1 it cannot keep up; no workers: it adds "
        "to the step). Data: the family's generated data where the dataset is absent (all here). "
        "Weights: random of the real shapes (`--llm_random`): speed does not depend on them. peak: the step's "
        "RSS high-water mark above what was held before it (reads low on CPU: freed memory is reused).",
        "",
        "| family | config | batch | params trainable / frozen (M) | GFLOPs / sample | step / ideal, 1 thread | "
        "step / ideal, 2 threads | step ms (1 thread) | loader ms / batch, one process (workers) | loader / step | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    queued = False
    for config, _ in TIMED:
        row = results.get("timed", {}).get(config)
        if not isinstance(row, dict):
            lines.append(f"| | {config} | | | | | | | | | not measured: {row or NOT_RUN} |")
            continue
        t = {x["threads"]: x for x in row["timings"]}
        ratio = lambda n: f"{t[n]['ratio']:.2f}" if n in t else "-"  # noqa: E731
        loader = f"{row['loader_ms']:.0f} ({row['loader_workers']})" if row["loader_ms"] is not None else "-"
        share = f"{row['loader_per_step']:.2f}" if row["loader_per_step"] is not None else "-"
        if "loader_parallel" not in row and row["loader_workers"]:  # timed through the workers' queue
            loader, share = f"* ({row['loader_workers']})", "-"
            queued = True
        lines.append(
            f"| {row['family']} | {config} | {row['batch']} | {_m(row['params_trainable'])} / {_m(row['params_frozen'])} | "
            f"{row['flops_per_sample'] / 1e9:.2f} | {ratio(1)} | {ratio(2)} | {t[1]['step_ms']:.0f} | {loader} | {share} | "
            f"{row['peak_mem_mib']:.0f} |"
        )
    notes = sorted({n for row in results.get("timed", {}).values() if isinstance(row, dict)
                    for n in row["weights"].split("; ") if "stand-in" in n})  # fmt: skip
    lines += [""] + [f"Note: {n}." for n in notes]
    if queued:
        lines += [
            "",
            "\\* Not shown: this row's loader was timed through its workers, before the method was fixed, "
            "which timed taking a batch from a queue the workers fill ahead (about 0 ms), not the loading; "
            "`make performance` with this row removed from the JSON measures it again.",
        ]
    lines += [
        "",
        "Reading it. The timed rows were measured with nothing else running (the load averages above). Below 1: "
        "the configs with a LLaMA-7B-shaped block keep its weights in bfloat16 (`llm.dtype`), and this CPU has "
        "AVX-512 BF16 matmuls, so the block (most of the FLOPs) runs in bf16 while the ideal is a float32 "
        "matmul; run them with `--args '[\"--model.llm.dtype=float32\"]'` for a float32 ratio. Well above 1 "
        "at 2 threads: small batches (point clouds at 2, the 1-thread ratio is the comparable one) and steps "
        "of many small operations (motion, SQA3D), which two OpenMP threads speed up less than one large "
        "matmul. SQA3D's PointNet++ (farthest-point sampling, ball queries, gathers) does work no FLOP count "
        "sees. Generated data differs from the real data in one way that matters for motion: the generated "
        "Argoverse 2 scenes hold fewer map vectors than real ones, so the VectorNet step here is smaller than on "
        "real scenes (its FLOPs and ratio: `benchmarks/motion_step.py` on a real scenario, "
        "[Benchmarks](benchmarks.md#whole-training-steps-motion-and-point-bert)). GPU figures: the section at "
        "the end.",
    ]
    lines += _config_table(results)
    lines += [
        "",
    ] + _gpu_section(results) + [
        "",
        "Regenerate this page (about an hour on the shared 2-core machine; resumable):",
        "",
        "<!-- docs: needs about an hour of CPU -->",
        "```bash",
        "make performance                             # python benchmarks/performance.py [--fresh] [--render]",
        "```",
    ]
    return "\n".join(lines) + "\n"


GPU_CHECK = REPO / "docs" / "performance" / "gpu_check"  # benchmarks/gpu_check.sh's output, as run on a GPU


def _gpu_section(results: dict) -> list[str]:
    """`benchmarks/gpu_check.sh` and, where its output is in `GPU_CHECK`, what it measured, beside the
    memory estimate of the config table for the same config and batch."""
    lines = [
        "## On a GPU: benchmarks/gpu_check.sh",
        "",
        "One script, under 8 minutes on a CUDA machine, random weights, nothing downloaded: the bf16 MFU of one "
        "training step of ViT-S + the LLaMA-7B-shaped block (`imagenet_deit_small_llama`, batch 256; the step's "
        "counted FLOPs / its median time / the GPU's dense bf16 peak), the same under 2-rank NCCL DDP when the "
        "machine has 2 GPUs, and the video config's (`ssv2_videomae_small_llama`) peak memory at batch 24 "
        "(`torch.cuda.max_memory_allocated` over a training step after the warm-up) with its step time. Each is "
        "`frozenlm bench --config C --llm_random` on the GPU (the config's bf16-mixed precision, 5 timed steps "
        "after warm-up). It writes `runs/gpu_check/*.json` and prints a summary. `--dry` runs the same "
        "commands on the CPU at tiny shapes (what `tests/test_bench.py` checks).",
        "",
        "<!-- docs: needs a CUDA machine (--dry: a CPU, about a minute) -->",
        "```bash",
        "bash benchmarks/gpu_check.sh                 # --peak_tflops N where the GPU is not in its table",
        "bash benchmarks/gpu_check.sh --dry --out /tmp/gpu_check",
        "```",
        "",
    ]
    summary_path = GPU_CHECK / "summary.json"
    if not summary_path.exists():
        return lines + ["**It has not been run on a GPU**: no GPU figure on this page is measured."]
    summary = json.loads(summary_path.read_text())
    rows = {name: json.loads((GPU_CHECK / f"{name}.json").read_text())[0]
            for name in ("image_1gpu", "image_ddp2", "video_peak") if (GPU_CHECK / f"{name}.json").exists()}  # fmt: skip
    m = next(iter(rows.values()))["machine"]
    aligned = {}
    alignment_path = GPU_CHECK / "ideal_alignment.json"
    if alignment_path.exists():
        for r in json.loads(alignment_path.read_text())["rows"]:
            aligned.setdefault(r["flops"], {})[r["width"]] = r
    lines += [
        f"Run once, as [performance/gpu_check/](performance/gpu_check/gpu_check_log.txt) holds it: {m['gpu']}, "
        f"PyTorch {m['torch']}, Python {m['python']}; peak dense bf16 {summary['peak_tflops']:.0f} TFLOP/s (NVIDIA's "
        "datasheet), random weights. "
        + ("" if "image_ddp2" in rows else "The machine had one GPU, so the 2-rank DDP part was skipped: **unrun**. "),
        "",
        "| run | config | batch | step ms | TFLOP/s | MFU | step / ideal | peak MiB (measured) | "
        "MiB estimated from the CPU count (the table above's method) | estimate / measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    over, mfus = [], []
    for name, row in rows.items():
        t = row["timings"][0]
        mfus.append(t["step_tflops"] / summary["peak_tflops"])
        config = Path(row["config"]).stem
        counted = results.get("counted", {}).get(config)
        estimate = memory_at(counted, row["batch"]) / 2**20 if isinstance(counted, dict) else None
        ideal = aligned.get(row["flops_step"], {}).get("multiple_of_64")
        ratio = f"{t['step_ms'] / ideal['ideal_ms']:.2f}" if ideal else "-"
        if estimate:
            over.append(estimate > row["peak_mem_mib"])
        lines.append(
            f"| {name} | {config} | {row['batch']} | {t['step_ms']:.0f} | {t['step_tflops']:.0f} | "
            f"{t['step_tflops'] / summary['peak_tflops']:.0%} | {ratio} | {row['peak_mem_mib']:.0f} | "
            + (f"{estimate:.0f} | {estimate / row['peak_mem_mib']:.2f} |" if estimate else "- | - |")
        )
    if aligned:
        widths = [(r["any"], r["multiple_of_64"]) for r in aligned.values() if {"any", "multiple_of_64"} <= r.keys()]
        lines += [
            "",
            "step / ideal: the step's median time against a bf16 `[m, n] @ [n, n].T` of the same FLOPs, timed on the "
            "same kind of machine right after (`benchmarks/gpu_ideal_alignment.py`, "
            "[performance/gpu_check/ideal_alignment.json](performance/gpu_check/ideal_alignment.json)). The ideal "
            "the run timed itself (`ideal_ms` in its JSON) had a width n that was not a multiple of 64 "
            f"(n = {widths[0][0]['n_any']:,}), which cuBLAS ran at "
            + " and ".join(f"{a['tflops']:.0f}" for a, _ in widths)
            + " TFLOP/s against "
            + " and ".join(f"{b['tflops']:.0f}" for _, b in widths)
            + " at a multiple of 64: the ideal's width is now rounded so (`frozenlm.measure.ideal_shape`), and "
            "the run's own ratio is not the one to read.",
        ]
    video = rows.get("video_peak")
    lines += [
        "",
        "Reading it. The memory estimate of the config table (float32 activations counted on the CPU) was "
        + (f"above the measured bf16-mixed peak in all {len(over)} runs, as it is meant to be (an upper bound)"
           if over and all(over) else "**not** above the measured peak in every run: it is no upper bound there")
        + ": under bf16 the saved activations were "
        + (f"{video['activation_mib_per_sample']:.0f} MiB per sample for the video config against "
           f"{counted_video['activation_mib_per_sample']:.0f} counted in float32"
           if video and isinstance(counted_video := results.get("counted", {}).get(Path(video["config"]).stem), dict)
           else "smaller")
        + (f". The measured MFU is below the {MFU:.0%} the epoch-time column assumes, so those hours read short "
           "by the ratio of the two." if max(mfus) < MFU else f". The epoch-time column assumes an MFU of {MFU:.0%}."),
    ]
    return lines


def _config_table(results: dict) -> list[str]:
    lines = [
        "",
        "## Which config: size, cost and the GPU it needs",
        "",
        "Every shipped config, counted by `frozenlm bench --config C --llm_random --count_only --batch_size 2` "
        "(one training step on this CPU, float32, on generated data of the real shapes; a batch of 2 scaled to "
        "per-sample figures: the recipes' batches do not run on this CPU). GFLOPs / sample: the "
        "training step's (forward + backward). Memory at batch N is estimated as weights (in the config's dtypes) "
        "+ gradients + AdamW state (2 x 4 bytes per trainable parameter) + N x the activations one sample saves "
        "for backward (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters excluded), "
        f"with {USABLE:.0%} of the GPU's memory usable. Measured in float32: under bf16-mixed most saved activations "
        "are bf16, so the estimate is an upper bound (up to about 2x on activations); transient buffers "
        "(attention scores under a fused kernel, workspace) are not in it. Time per epoch = GFLOPs / sample x "
        f"training samples per epoch / (peak bf16 dense tensor FLOP/s x an assumed MFU of {MFU:.0%}), on one GPU; "
        "peaks: RTX 3090 71 TFLOP/s (NVIDIA Ampere GA102 whitepaper), A100 80GB 312 TFLOP/s (A100 datasheet). "
        "Against a GPU measurement: the next section. Paper targets: docs/reproducing.md.",
        "",
        "| config | family | dataset | block | params trainable / frozen (M) | GFLOPs / sample | paper target | "
        "recipe batch per GPU x GPUs | MiB / sample | RTX 3090: largest batch, h / epoch | A100 80GB: largest batch, h / epoch |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for config in sorted(p.stem for p in (REPO / "configs").glob("*.yaml")):
        row = results.get("counted", {}).get(config)
        batch, gpus, block = _recipe(config)
        if not isinstance(row, dict):
            lines.append(f"| {config} | | | {block} | | | {TARGETS.get(config, '-')} | {batch} x {gpus} | | not counted: {row or NOT_RUN} | |")
            continue
        samples = _epoch_samples(row)
        cells = []
        for peak, memory in GPUS.values():
            largest = largest_batch(row, memory)
            fits = "fits" if largest >= batch else "**does not fit**"
            hours = f"{row['flops_per_sample'] * samples / (peak * MFU) / 3600:.2g}" if samples else "-"
            cells.append(f"{largest} ({fits} {batch}), {hours}")
        lines.append(
            f"| {config} | {row['family']} | {row['datamodule'].rsplit('.', 1)[-1].removesuffix('DataModule')} | {block} | "
            f"{_m(row['params_trainable'])} / {_m(row['params_frozen'])} | {row['flops_per_sample'] / 1e9:.1f} | "
            f"{TARGETS.get(config, '-')} | {batch} x {gpus} | {row['activation_mib_per_sample']:.0f} | {cells[0]} | {cells[1]} |"
        )
    lines += [
        "",
        "Reading: \"fits\" when the recipe's per-GPU batch is at most the largest batch estimated for that GPU; a "
        "config that does not fit a 3090 at its recipe's batch needs the 80 GB A100 (or gradient accumulation: "
        "`--data.batch_size` smaller and `--trainer.accumulate_grad_batches` larger, the same global batch). "
        "Hours per epoch are for one GPU; divide by the GPUs used.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="measure everything again")
    parser.add_argument("--render", action="store_true", help="only rewrite the page from the JSON")
    parser.add_argument("--only", nargs="*", help="config names to (re)measure when missing")
    parser.add_argument("--phases", nargs="*", default=["timed", "counted"], choices=["timed", "counted"],
                        help="timed (the families' steps), counted (every config's size); the two can run as two processes")
    options = parser.parse_args()
    results = json.loads(JSON.read_text()) if options.render else run(options.fresh, set(options.only or []) or None, options.phases)
    write_atomically(PAGE, render(results))
    print(f"wrote {JSON.relative_to(REPO)} and {PAGE.relative_to(REPO)}")


if __name__ == "__main__":
    main()

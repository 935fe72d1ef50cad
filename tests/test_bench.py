"""`frozenlm bench` on tiny layer shapes: row structure, FLOP counts, and the jsonargparse CLI. No timing asserts."""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
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


# -- `frozenlm bench --config`: a whole training step of any config -------------------------------------
CONF = Path(__file__).parent / "conf"
TEXTS = ["a photo of a red square", "what colour is the circle?", "two blue circles"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from frozenlm.data.fake.meter_towers import write

    return write(tmp_path_factory.mktemp("towers"), TEXTS)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from frozenlm.data.fake.clip_teacher import write

    return write(tmp_path_factory.mktemp("teacher"), TEXTS)


# (tests/conf config, its family, overrides); llm: the tiny LLaMA checkpoint, towers, teacher: the fixtures.
FAMILY_CONFIGS = [
    ("image_llama", "image", ["llm"]),
    ("video_llama", "video", ["llm"]),
    ("pointcloud_llama", "point cloud", ["llm"]),
    ("motion_llama", "motion", ["llm"]),
    ("uta", "UTA", ["teacher"]),
]
VARIANTS = [  # slow: METER's two families (towers written first), the image family's variants by override
    ("vqa_llama", "VQA", ["llm", "towers"]),
    ("retrieval_llama", "retrieval", ["llm", "towers"]),
    ("image_llama", "image (CAPE)", ["llm", "--model.pos_embed=cape"]),
    ("image_llama", "image (convstem)", ["llm", "--model.stem=conv"]),
    ("image_llama", "image (LoRA)", ["llm", "--model.llm.lora={r: 2}"]),
    ("image_baseline", "image (learngene)", ["--model.learngene={genes: 2, basis: linear}"]),
]


def _overrides(names, tiny_llama_checkpoint, request):
    args = []
    for name in names:
        if name == "llm":
            args.append(f"--model.llm.checkpoint={tiny_llama_checkpoint}")
        elif name == "towers":
            vision, text = request.getfixturevalue("towers")
            args += [f"--model.vision_checkpoint={vision}", f"--model.text_checkpoint={text}"]
        elif name == "teacher":
            args.append(f"--model.teacher={request.getfixturevalue('teacher')}")
        else:
            args.append(name)
    return args


@pytest.mark.parametrize(
    ("config", "family", "names"),
    FAMILY_CONFIGS + [pytest.param(*v, marks=pytest.mark.slow) for v in VARIANTS],
    ids=[c[1] for c in FAMILY_CONFIGS + VARIANTS],
)
def test_bench_config_of_each_family_writes_its_row(config, family, names, tiny_llama_checkpoint, request, tmp_path):
    """One training step of each family's tiny config, built as `frozenlm fit` builds it, on the family's
    generated data where the config has no dataset: every field, the ideal timed at the counted FLOPs."""
    from frozenlm.bench_config import RESULT_KEYS

    output = tmp_path / "row.json"
    rows = bench(config=str(CONF / f"{config}.yaml"), batch_size=2, threads=[1], repeats=5, warmup=1, loader_batches=1,
                 llm_random="llm" in names, args=_overrides(names, tiny_llama_checkpoint, request), output=str(output),
                 device="cpu", quiet=True)  # fmt: skip
    row = json.loads(output.read_text())[0]
    assert rows[0] == row and set(RESULT_KEYS) <= set(row)
    assert row["family"] == family and row["batch"] == 2 and row["batch_source"] == "--batch_size"
    assert row["flops_step"] > 0 and row["flops_per_sample"] == row["flops_step"] / 2
    assert row["params_trainable"] > 0
    (timing,) = row["timings"]
    assert timing["threads"] == 1 and timing["ratio"] == pytest.approx(timing["step_ms"] / timing["ideal_ms"])
    assert row["loader_ms"] > 0 and row["activation_mib_per_sample"] > 0 and row["peak_mem_mib"] >= 0
    assert ("generated" in row["data"]) == (config not in ("image_llama", "image_baseline", "uta"))  # Digits ships
    if "llm" in names:  # --llm_random: the frozen layer's weights are random, and the row says so
        assert row["random_weights"] and "random weights" in row["weights"]


def test_bench_config_from_the_command_line(tiny_llama_checkpoint, tmp_path, capsys):
    from frozenlm.cli import run

    output = tmp_path / "row.json"
    run(["bench", "--config", str(CONF / "image_llama.yaml"), "--batch_size", "2", "--count_only", "true",
         "--args", json.dumps([f"--model.llm.checkpoint={tiny_llama_checkpoint}"]), "--output", str(output)])  # fmt: skip
    row = json.loads(output.read_text())[0]
    assert row["timings"] == [] and row["flops_step"] > 0 and row["weights"].startswith("pretrained")


def test_bench_config_errors_name_the_fix(tmp_path):
    from frozenlm.bench_config import _llm_config_folder
    from frozenlm.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="no such file"):
        bench(config=str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigurationError, match="unknown offline"):
        _llm_config_folder("someone/unknown-model-xyz", tmp_path / "llm")


def test_llm_random_builds_a_7b_shaped_block_from_a_hub_id_offline(tmp_path):
    from frozenlm.bench_config import _llm_config_folder
    from frozenlm.llm.checkpoint import LMCheckpoint

    folder, note = _llm_config_folder("huggyllama/llama-7b", tmp_path / "llm")
    checkpoint = LMCheckpoint(folder)  # what `llm.init: random` reads: the config, no tensors
    config, shape = checkpoint.config, SHAPES["llama-7b"]
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers) == (
        shape.hidden, shape.intermediate, shape.heads, shape.layers)
    assert checkpoint.weight_map == {} and "random weights" in note


def test_llm_random_gives_a_hub_backbone_random_weights_offline(tmp_path):
    import yaml

    from frozenlm.bench_config import _random_weights

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "ssv2_videomae_base.yaml").read_text())
    args, notes = _random_weights(config, tmp_path, {})
    assert "--model.pretrained=null" in args and "MCG-NJU/videomae-base-ssv2" in " ".join(notes)
    assert "--model.pretrained=null" not in _random_weights(config, tmp_path, {"model.pretrained": "folder"})[0]


def test_step_flops_of_a_known_module_equal_the_hand_count():
    """What `bench --config` counts a step with: a frozen linear (input gradient only), a trainable linear
    (input and weight gradients) and the fused attention kernel, whose backward PyTorch counts as five
    matmuls of the forward's two sizes: Q K^T recomputed, then the gradients of both operands of both."""
    from frozenlm.measure import flop_counter

    batch, tokens, width, heads = 2, 6, 16, 2
    frozen, trainable = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
    frozen.requires_grad_(False)
    x = torch.randn(batch, tokens, width, requires_grad=True)
    with flop_counter() as counter:
        q, k, v = frozen(x).view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        trainable(attended).sum().backward()
    rows = batch * tokens
    frozen_fwd, trainable_fwd = 2 * rows * width * 3 * width, 2 * rows * width * width
    one_matmul = 2 * batch * heads * tokens * tokens * (width // heads)  # Q K^T, or P V
    forward = frozen_fwd + trainable_fwd + 2 * one_matmul
    backward = frozen_fwd + 2 * trainable_fwd + 5 * one_matmul
    hand = forward + backward
    assert counter.get_total_flops() == hand


def test_saved_activations_count_what_backward_keeps_once():
    from frozenlm.bench_config import SavedActivations

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(layer) as saved:
        y = torch.relu(layer(x))  # saves x (for the weight's gradient) and relu's output; not the weight
        (y * y).sum()  # saves y twice: counted once
    assert saved.bytes == x.numel() * 4 + y.numel() * 4


# -- the generated datasets, moved from tests/data into frozenlm.data.fake ----------------------------------
# SHA-256 over (relative path, bytes) of every file each writer wrote with its defaults, recorded from the
# tests/data/*/data.py generators at 812f033 (before the move); ssv2's VP9 encoder is not deterministic.
# argoverse2's since its cos/sin/arctan2 are rounded to 1e-6 (they differed in the last bit between an
# AVX-512 CPU and an AVX2 one, numpy's SIMD paths, and so did the bytes).
WRITTEN_BEFORE = {
    "argoverse1": "82deea9df4d257f0f30b82159e731fc96f95d018089f467bda4aea6eac6d2fe1",
    "argoverse2": "9e83e8805b1962a25a2aa0b7173f9eff3f5280ca2067ff8f24717c42a71a69b7",
    "caltech256": "df2194ad77db825e5212f20d64c838723c04c4e377f6ef2ec3f2b6b10a256b14",
    "cifar100": "496b75cba72d4aae7f4aee5654bd81ddc5a5e9fe00cf50156e5af7f545af22b6",
    "flickr30k": "54db44969bae3d7158ae554b46e01be3a4dd1d2ac05f89db2323dd2ce047c0f8",
    "imagefolder": "7afa16d9da1c689a629b9c554d79b14cd541f9eb8a357ae1abffd1ff3c2c02b1",
    "imagenet_variants": "d62505fe5b7365892294d28043b736399e53ad1abc3558cc2c6f251298f1598a",
    "mnist": "a56fbcb6aba4dbdc14149754e380b183c184e3e6b3e6649336bb4dac71756b2a",
    "modelnet40": "897d045aca6d513591f800e16c4f80452233254fa6209f6eaa9b6f1a28bb3c1b",
    "scanobjectnn": "cf9bea89d729a7a41b3b03966d39e683414be66cd0d4e866c2ceefbd916e7ca4",
    "vqav2": "d5d10183d73b099aaf525948286e831d9a1069c44ff5167e51184edc58deae51",
    "meter_towers": "88757a85ec69d12950cf503641b42d3fed659c2609cb4c90142e055a8c2f7258",
    "clip_teacher": "3264135b575176d128536a837ad992187a8b597d34d82392d8ac6cd71e89c927",
}
WRITER_TEXTS = {"meter_towers": ["a red square", "what color is the circle?"],
                "clip_teacher": ["a photo of the seven.", "art of the zero."]}  # fmt: skip


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(WRITTEN_BEFORE))
def test_package_generators_write_the_files_the_test_generators_wrote(name, tmp_path):
    module = importlib.import_module(f"frozenlm.data.fake.{name}")
    module.write(tmp_path, *([WRITER_TEXTS[name]] if name in WRITER_TEXTS else []))
    assert _digest(tmp_path) == WRITTEN_BEFORE[name]


def test_tests_data_modules_are_the_package_generators():
    for name in [*WRITTEN_BEFORE, "ssv2"]:
        old = {"meter_towers": "tests.data.meter.towers", "clip_teacher": "tests.data.clip.teacher"}.get(name, f"tests.data.{name}.data")
        assert importlib.import_module(old).write is importlib.import_module(f"frozenlm.data.fake.{name}").write


def test_every_datamodule_of_a_shipped_config_has_a_generated_dataset():
    import yaml

    from frozenlm.bench_config import DATASETS, TASK_FAMILIES

    configs = [yaml.safe_load(p.read_text()) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")]
    assert {c["data"]["class_path"] for c in configs} <= set(DATASETS)
    assert {c["model"]["class_path"] for c in configs} <= set(TASK_FAMILIES)


def test_modelnet40s_generated_data_holds_the_training_samples_asked_for(tmp_path):
    from frozenlm.bench_config import DATASETS

    folder = DATASETS["frozenlm.data.ModelNet40DataModule"].write(tmp_path, 12)
    assert len((folder / "modelnet40_train.txt").read_text().split()) >= 12  # was 3 (1 per class of 3)


def test_the_loader_timing_refuses_epochs_of_one_batch_instead_of_restarting_forever():
    from torch.utils.data import DataLoader

    from frozenlm.bench_config import _loader_ms
    from frozenlm.errors import ConfigurationError

    class OneBatch:
        def train_dataloader(self):
            return DataLoader(list(range(4)), batch_size=4)

    with pytest.raises(ConfigurationError, match="one batch per epoch"):
        _loader_ms(OneBatch(), 3)

    class ThreeBatches(OneBatch):
        def train_dataloader(self):
            return DataLoader(list(range(6)), batch_size=2)

    assert _loader_ms(ThreeBatches(), 5) >= 0  # across epochs: 2 timed batches per epoch of 3



def test_the_loader_is_timed_in_one_process_not_through_its_workers_queue():
    """Through workers, the batches after the first were already waiting in their queue (about 0 ms)."""
    import time as _time

    from torch.utils.data import DataLoader, Dataset

    from frozenlm.bench_config import _loader_ms

    class Slow(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            _time.sleep(0.01)  # 10 ms of loading work per sample, 20 ms per batch
            return i

    class WithWorkers:
        num_workers = 2

        def train_dataloader(self):
            return DataLoader(Slow(), batch_size=2, num_workers=self.num_workers)

    assert _loader_ms(WithWorkers(), 3) >= 18

# -- benchmarks/gpu_check.sh ---------------------------------------------------------------------------------
GPU_CHECK = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("gpus", ["0", "2"])
def test_gpu_check_dry_run_on_the_cpu_writes_its_summary(gpus, tmp_path):
    """Its Python parts on the CPU at tiny shapes (`--dry`); with 2 "GPUs" the DDP launch too (gloo)."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(GPU_CHECK.parents[1]), "GPU_CHECK_DRY_GPUS": gpus}
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["image_1gpu"]["batch"] == 2 and summary["image_1gpu"]["mfu"] > 0
    # measured (a CPU's RSS high-water mark can read 0 at these tiny shapes: freed memory is reused)
    assert summary["video"]["peak_mem_mib"] is not None and summary["video"]["activation_mib_per_sample"] > 0
    assert summary["video"]["step_ms"] > 0
    assert ("image_ddp2" in summary) == (gpus == "2")

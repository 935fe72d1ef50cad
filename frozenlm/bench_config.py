"""`frozenlm bench --config`: one whole training step of any config, against its FLOP ideal.

The task and datamodule are built from the config by the same LightningCLI as `frozenlm fit`
(`frozenlm.trainer_cli.FrozenLMCLI`, `run=False`) and trained by a Lightning `Trainer` for a
few steps; a callback times each step from `on_train_batch_start` to `on_train_batch_end` (forward,
backward, gradient clipping, optimiser step), plus the datamodule's and the task's
`on_after_batch_transfer` (device-side work such as point sampling and augmentation). The loader is
kept out of the step (`num_workers` 0 while stepping: a batch is read between two timed steps) and
timed on its own afterwards, in one process (`loader_ms`: the work of one batch; timing it through the
config's workers would time their queue, which they fill ahead of a consumer that takes nothing); with
the config's workers it takes `loader_ms / loader_parallel` per batch at best (`loader_parallel` =
min(workers, CPU cores), 1 with no workers), and `loader_per_step` is that over the step: above 1, the
loader cannot keep up.

Protocol: the config's batch (or `batch_size`); the first step is run under
`frozenlm.measure.flop_counter` (matmuls, convolutions and attention, forward and backward, as
PyTorch's `FlopCounterMode` counts them; not timed); `warmup` untimed steps (the peak memory is
measured over the last); then, for each thread count, one untimed step and `repeats` timed steps, each
followed by the ideal: one plain `torch.matmul` `[m, n] @ [n, n].T` of the same FLOPs in the
step's compute dtype (`frozenlm.measure.ideal_shape`), timed right after it so both see the
same machine load. `ratio` = median step / median ideal.

Where the config's dataset is absent, `DATASETS` names the tiny generated dataset of its
datamodule (`frozenlm.data.fake`), written to a temporary folder. `llm_random` builds every
pretrained part of the real shape with random weights, offline: the frozen LM block (`llm.init:
random` from the checkpoint's `config.json`, or `HUB_SHAPES` for a hub id not on this machine),
METER's towers, UTA's CLIP teacher and DeiT-distillation teachers. The output says so.

A new family is one entry in `TASK_FAMILIES` (its task class) and one in `DATASETS` (its
datamodule's generated data).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from frozenlm.errors import ConfigurationError
from frozenlm.llm.families import SHAPES, LMShape

# Task class -> family name (a config's variant is added by `family_of`).
TASK_FAMILIES = {
    "frozenlm.tasks.ImageClassifier": "image",
    "frozenlm.tasks.VideoClassifier": "video",
    "frozenlm.tasks.PointCloudClassifier": "point cloud",
    "frozenlm.tasks.MotionForecaster": "motion",
    "frozenlm.tasks.VisualQuestionAnswering": "VQA",
    "frozenlm.tasks.ImageTextRetrieval": "retrieval",
    "frozenlm.tasks.UnmaskedTokenAlignment": "UTA",
    "frozenlm.tasks.SQA3DTask": "3D QA",
}


@dataclass(frozen=True)
class FakeData:
    """A datamodule's generated stand-in: `writer` (`module:function` in `frozenlm.data.fake`),
    `counts(n)` its keyword arguments for at least `n` training samples, and `overrides`: data settings
    the tiny set needs (e.g. a smaller held-out split)."""

    writer: str
    counts: Callable[[int], dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)

    def write(self, root: Path, samples: int) -> Path:
        module, name = self.writer.split(":")
        return Path(getattr(importlib.import_module(module), name)(root, **self.counts(samples)))


def _per(n: int, classes: int) -> int:
    return max(1, math.ceil(n / classes))


# Datamodule class -> its generated data (None: the dataset ships with a package).
DATASETS: dict[str, FakeData | None] = {
    "frozenlm.data.CIFAR100DataModule": FakeData("frozenlm.data.fake.cifar100:write", lambda n: {"num_train": n, "num_test": 8}),
    # Caltech-256's split is a seeded 7:3 per class (4 classes).
    "frozenlm.data.Caltech256DataModule": FakeData("frozenlm.data.fake.caltech256:write", lambda n: {"per_category": _per(n, 4) * 10 // 7 + 2}),
    "frozenlm.data.ImageFolderDataModule": FakeData(
        "frozenlm.data.fake.imagefolder:write", lambda n: {"train_per_class": _per(n, 3), "val_per_class": 2, "size": (300, 400)}
    ),
    "frozenlm.data.MNISTDataModule": FakeData("frozenlm.data.fake.mnist:write", lambda n: {"num_train": n + 16, "num_test": 8}, {"num_val": 16}),
    "frozenlm.data.DigitsDataModule": None,
    "frozenlm.data.SSv2DataModule": FakeData("frozenlm.data.fake.ssv2:write", lambda n: {"per_class": {"train": _per(n, 4), "validation": 1}}),
    "frozenlm.data.ModelNet40DataModule": FakeData(
        # the generator writes shapes of 3 classes (`WITH_SHAPES`), not 40
        "frozenlm.data.fake.modelnet40:write", lambda n: {"train_per_class": _per(n, 3), "test_per_class": 1, "points": 10_000}
    ),
    "frozenlm.data.ScanObjectNNDataModule": FakeData(
        "frozenlm.data.fake.scanobjectnn:write", lambda n: {"train_per_class": _per(n, 15), "test_per_class": 1}
    ),
    "frozenlm.data.Argoverse1DataModule": FakeData(
        "frozenlm.data.fake.argoverse1:write", lambda n: {"sequences": {"train": n, "val": 2, "test_obs": 1}}
    ),
    "frozenlm.data.Argoverse2DataModule": FakeData(
        "frozenlm.data.fake.argoverse2:write", lambda n: {"scenes": {"train": n, "val": 2, "test": 1}}
    ),
    "frozenlm.data.VQAv2DataModule": FakeData(
        "frozenlm.data.fake.vqav2:write",
        lambda n: {"images": {"train2014": _per(n, 3), "val2014": 4, "test-dev2015": 1, "test2015": 1}},
        {"holdout": 2, "min_answer_count": 1},
    ),
    "frozenlm.data.Flickr30kDataModule": FakeData(
        "frozenlm.data.fake.flickr30k:write", lambda n: {"images": {"train": n, "val": 4, "test": 4}}
    ),
    "frozenlm.data.SQA3DDataModule": FakeData("frozenlm.data.fake.sqa3d:write_prepared", lambda n: {"train_questions": n}),
}  # fmt: skip

# Language models whose shape is known offline, by hub id or folder name (random weights need only the shape).
SMOLLM2_135M = LMShape("llama", hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152)
HUB_SHAPES = {
    "huggyllama/llama-7b": SHAPES["llama-7b"], "meta-llama/Llama-2-7b-hf": SHAPES["llama-7b"],
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M, "smollm2-135m-instruct-q4_1": SMOLLM2_135M,
}  # fmt: skip
RESULT_KEYS = (
    "config", "family", "task", "datamodule", "data", "weights", "random_weights", "batch", "batch_source", "device", "precision",
    "params_trainable", "params_frozen", "flops_step", "flops_per_sample", "forward_flops_per_sample", "timings",
    "loader_ms", "loader_workers", "loader_parallel", "loader_per_step", "peak_mem_mib", "mem_method", "weights_mib", "grads_mib",
    "optimizer_state_mib", "activation_mib_per_sample", "step_peak_mib_per_sample", "repeats", "warmup", "notes", "machine",
)  # fmt: skip


def family_of(config: dict[str, Any]) -> str:
    """The family of a parsed config: its task's (`TASK_FAMILIES`) with the variant that sets it apart
    (CAPE, convolutional stem, LoRA, learngene, GCR)."""
    task = config["model"]["class_path"]
    name = TASK_FAMILIES.get(task, task.rsplit(".", 1)[-1])
    args = config["model"].get("init_args") or {}
    llm = args.get("llm") or {}

    def get(obj: Any, key: str) -> Any:  # a dict from YAML, or a dataclass from the task's hparams
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    variants = [
        "learngene" if args.get("learngene") else None,
        "convstem" if args.get("stem") == "conv" else None,
        "CAPE" if args.get("pos_embed") == "cape" else None,
        "LoRA" if get(llm, "lora") else None,
        "GCR" if get(llm, "mode") == "auxiliary" else None,
    ]
    variants = [v for v in variants if v]
    return f"{name} ({', '.join(variants)})" if variants else name


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def _llm_config_folder(checkpoint: str | None, folder: Path) -> tuple[str | None, str | None]:
    """`(checkpoint to use, note)` for random LM weights: the checkpoint itself when its config.json is on
    this machine, else a folder with the config.json of its known shape (`HUB_SHAPES`)."""
    from frozenlm.llm.checkpoint import LMCheckpoint

    if not checkpoint:
        return checkpoint, None
    with contextlib.suppress(Exception):
        LMCheckpoint(checkpoint).config  # noqa: B018 (local folder, package or hub cache)
        return checkpoint, f"LM block: random weights of {checkpoint}'s shape"
    shape = HUB_SHAPES.get(checkpoint) or HUB_SHAPES.get(Path(checkpoint).name)
    if shape is None:
        raise ConfigurationError(
            f"--llm_random: the shape of {checkpoint!r} is unknown offline (not on this machine, not one of "
            f"{sorted(HUB_SHAPES)}); pass --model.llm.checkpoint with a local folder holding its config.json."
        )
    write_lm_shape(shape.family, shape.hidden, shape.intermediate, shape.heads, shape.layers, folder, shape.kv_heads)
    return str(folder), f"LM block: random weights of {checkpoint}'s shape (hidden {shape.hidden}, {shape.layers} layers)"


def write_lm_shape(family: str, hidden: int, intermediate: int, heads: int, layers: int, folder: str | Path,
                   kv_heads: int | None = None) -> Path:
    """A checkpoint folder with a language model's shape and no tensors: what `llm.init: random` needs
    (its config.json; the empty index makes the folder a checkpoint)."""
    from frozenlm.llm.families import FAMILIES, lm_config

    kv_heads = kv_heads if "kv_heads" in FAMILIES[family].shape_keys else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm_config(family, hidden, intermediate, heads, kv_heads=kv_heads, num_layers=layers).save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return folder


def _random_weights(config: dict[str, Any], work: Path, given: dict[str, str]) -> tuple[list[str], list[str]]:
    """Overrides that give every pretrained part of `config`'s model random weights of its real shape,
    offline, and the notes that say so (`given`: the command line's overrides, which win)."""
    args, notes = [], []
    init = config["model"].get("init_args") or {}
    llm = init.get("llm")
    if llm and not (llm.get("replace_with_mlp") or llm.get("replace_with_identity")) and (
        given.get("model.llm.checkpoint") or llm.get("checkpoint")
    ):
        checkpoint, note = _llm_config_folder(given.get("model.llm.checkpoint") or llm["checkpoint"], work / "llm")
        args += [f"--model.llm.checkpoint={checkpoint}", "--model.llm.init=random"]
        notes.append(note)
    if init.get("vision_checkpoint") or init.get("text_checkpoint"):  # METER's towers
        from frozenlm.data.fake import meter_towers

        vision, text = meter_towers.write(work / "towers", ["a photo of a red square", "what is on the table?"],
                                          **meter_towers.BASE)  # fmt: skip
        args += [f"--model.vision_checkpoint={vision}", f"--model.text_checkpoint={text}"]
        notes.append("METER towers: random weights of CLIP ViT-B/32 and RoBERTa-base's shapes (a small BPE vocabulary)")
    teacher = init.get("teacher")
    if isinstance(teacher, str) and teacher:
        from frozenlm.data.fake import clip_teacher

        folder = clip_teacher.write(work / "teacher", ["a photo of a dog.", "a photo of a cat."], **clip_teacher.VIT_B16)
        args.append(f"--model.teacher={folder}")
        stand_in = "" if "clip-vit-base-patch16" in teacher else f", a stand-in for {teacher}: its teacher's FLOPs differ"
        notes.append(f"UTA teacher: random CLIP ViT-B/16-shaped weights{stand_in}")
    if isinstance(init.get("pretrained"), str) and "model.pretrained" not in given:  # e.g. VideoMAE's hub weights
        args.append("--model.pretrained=null")
        notes.append(f"backbone: random weights of the architecture {init['pretrained']} has")
    distill = init.get("distill")
    if isinstance(distill, dict) and distill.get("pretrained"):
        args.append("--model.distill.pretrained=false")
        notes.append(f"distillation teacher {distill.get('teacher')}: random weights (timm, same architecture)")
    return args, notes


class StepTimer:
    """The Lightning callback that runs the protocol of the module docstring (built by `measure_config`)."""

    def __init__(self, schedule: list[tuple[str, int]], device: torch.device, ideal_dtype: torch.dtype) -> None:
        from lightning.pytorch.callbacks import Callback

        self.schedule, self.device, self.ideal_dtype = schedule, device, ideal_dtype
        self.step = 0
        self.flops = None
        self.times: dict[int, list[float]] = {}
        self.ideal: dict[int, list[float]] = {}
        self.prepare = 0.0  # seconds in on_after_batch_transfer before the coming step
        self.peak = None
        self._counter = self._memory = None
        self.callback = type("StepTimerCallback", (Callback,), {
            "on_train_batch_start": lambda _, trainer, module, batch, i: self.start(module),
            "on_train_batch_end": lambda _, trainer, module, out, batch, i: self.end(),
        })()  # fmt: skip

    def wrap(self, hook: Callable) -> Callable:
        """`hook` (an `on_after_batch_transfer`), its time counted into the step that follows."""

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = hook(*args, **kwargs)
            self.sync()
            self.prepare += time.perf_counter() - start
            return out

        return timed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, module: torch.nn.Module) -> None:
        from frozenlm.measure import _PeakMemory, flop_counter

        self._module = module
        kind, threads = self.schedule[min(self.step, len(self.schedule) - 1)]
        torch.set_num_threads(threads)
        if kind == "count":
            self._counter = flop_counter()
            self._counter.__enter__()
            self._saved = SavedActivations(self._module)
            self._saved.__enter__()
        elif kind == "memory":
            self._memory = _PeakMemory(self.device).__enter__()
        self.sync()
        self._start = time.perf_counter()

    def end(self) -> None:
        self.sync()
        elapsed = time.perf_counter() - self._start + self.prepare
        self.prepare = 0.0
        kind, threads = self.schedule[min(self.step, len(self.schedule) - 1)]
        self.step += 1
        if kind == "count":
            self._saved.__exit__(None, None, None)
            self.saved_bytes = self._saved.bytes
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._ideal = _ideal_operands(max(self.flops, 1), self.device, self.ideal_dtype)
        elif kind == "memory":
            self._memory.__exit__(None, None, None)
            self.peak = self._memory
        elif kind == "time":
            self.times.setdefault(threads, []).append(elapsed)
            matmul, scale = self._ideal
            self.sync()
            start = time.perf_counter()
            matmul()
            self.sync()
            self.ideal.setdefault(threads, []).append((time.perf_counter() - start) * scale)


class SavedActivations:
    """Bytes of the distinct tensors autograd saves for backward while active (`.bytes`), parameters of
    `module` excluded: a step's activation memory, the same on any device (`saved_tensors_hooks`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._params:
                self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(self._seen.values())


def _ideal_operands(flops: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """`(matmul, scale)`: one `[m, n] @ [n, n].T` with `2 m n^2 ~= flops` (as `frozenlm.measure`'s
    ideal) and the factor that scales its time to exactly `flops`."""
    from frozenlm.measure import ideal_shape

    m, n = ideal_shape(flops)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, n, generator=generator).to(device, dtype)
    w = torch.randn(n, n, generator=generator).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)

    def matmul() -> None:
        torch.matmul(a, w.mT, out=out)

    matmul()  # warm (oneDNN primitive, cuBLAS handle)
    return matmul, flops / (2 * m * n * n)


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_config(
    config: str | Path,
    *,
    batch_size: int | None = None,
    threads: Sequence[int] = (1, 2),
    repeats: int = 5,
    warmup: int = 2,
    loader_batches: int = 5,
    llm_random: bool = False,
    device: str | None = None,
    args: Sequence[str] = (),
    work_dir: str | Path | None = None,
    timed: bool = True,
) -> dict[str, Any]:
    """One row of `frozenlm bench --config` (keys `RESULT_KEYS`; see the module docstring).

    `args` are dotted overrides as `frozenlm fit` takes them (`--model.llm.layers=[-2,-1]`).
    `work_dir` holds the generated data and weights (default: a temporary folder, removed after).
    `timed=False` counts only (FLOPs, parameters, saved activations: one step, no timing, no loader, no
    peak): `timings` is empty and the loader and peak figures None."""
    from frozenlm.data.base import usable_cores
    from frozenlm.trainer_cli import BaseTask, FrozenLMCLI, LightningDataModule

    path = Path(config)
    if not path.is_file():
        raise ConfigurationError(f"--config {config}: no such file (the shipped ones are configs/*.yaml).")
    parsed = yaml.safe_load(path.read_text())
    if not isinstance(parsed, dict) or "model" not in parsed or "data" not in parsed:
        raise ConfigurationError(f"--config {config}: not a trainer config (it needs model: and data: sections).")
    if repeats < 5 or warmup < 1 or loader_batches < 1 or not threads or min(threads) < 1:
        raise ConfigurationError("frozenlm bench --config: repeats >= 5, warmup >= 1, loader_batches >= 1 and threads >= 1.")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    data_args = parsed["data"].get("init_args") or {}
    batch = batch_size or int(data_args.get("batch_size") or 1)
    workers = data_args.get("num_workers")
    precision = str((parsed.get("trainer") or {}).get("precision", "32-true")) if dev.type == "cuda" else "32-true"
    notes = [] if dev.type == "cuda" else ["CPU: float32 (the config's mixed precision is for GPUs)"]
    # Given overrides (from the command line) win over the config for what it reads below.
    given = dict(a.removeprefix("--").split("=", 1) for a in args if a.startswith("--") and "=" in a)
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="frozenlm-bench-")))
        overrides = []
        data_class = parsed["data"]["class_path"]
        root = given.get("data.root", data_args.get("root"))
        data_note = f"{data_class.rsplit('.', 1)[-1]} at {root}" if root else data_class.rsplit(".", 1)[-1]
        if data_class in DATASETS and DATASETS[data_class] is not None and not (root and Path(root).exists()):
            fake = DATASETS[data_class]
            written = fake.write(work / "data", batch * (loader_batches + 1 if timed else 2))
            overrides += [f"--data.root={written}"] + [f"--data.{k}={json.dumps(v)}" for k, v in fake.overrides.items()]
            data_note = f"generated ({fake.writer.split(':')[0]}): {root or 'no root'} is absent"
        if llm_random:
            more, weight_notes = _random_weights(parsed, work, given)
            overrides += more
        else:
            weight_notes = ["pretrained weights as the config names them"]
        # The same protocol for every config: count, warm up, measure memory, then per thread count one
        # untimed step and `repeats` timed ones.
        schedule = [("count", threads[0])]
        if timed:
            schedule += [("warm", threads[0])] * (warmup - 1) + [("memory", threads[0])]
        for t in threads if timed else ():
            schedule += [("warm", t)] + [("time", t)] * repeats
        cli_args = [
            "--config", str(path), *overrides,
            f"--data.batch_size={batch}", "--data.num_workers=0",
            f"--trainer.accelerator={'gpu' if dev.type == 'cuda' else 'cpu'}", "--trainer.devices=1",
            "--trainer.num_nodes=1", "--trainer.strategy=auto", f"--trainer.precision={precision}",
            f"--trainer.max_steps={len(schedule)}", "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.accumulate_grad_batches=1", "--trainer.logger=false",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={work / 'run'}",
            "--trainer.val_check_interval=null", "--trainer.limit_train_batches=null", *args,
        ]  # fmt: skip
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = FrozenLMCLI(
            model_class=BaseTask, datamodule_class=LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, seed_everything_default=0, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False, args=cli_args, run=False,
        )  # fmt: skip
        model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
        # The family as built (command-line overrides included), from the task's hyper-parameters.
        family = family_of({"model": {"class_path": parsed["model"]["class_path"], "init_args": dict(model.hparams)}})
        ideal_dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        timer = StepTimer(schedule, dev, ideal_dtype)
        trainer.callbacks.append(timer.callback)
        datamodule.on_after_batch_transfer = timer.wrap(datamodule.on_after_batch_transfer)
        model.on_after_batch_transfer = timer.wrap(model.on_after_batch_transfer)
        with _threads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=datamodule)
            loader_ms = _loader_ms(datamodule, loader_batches) if timed else None
            forward = _forward_flops(model, datamodule)
        if timer.step < len(schedule):
            raise ConfigurationError(
                f"--config {config}: the training loader gave {timer.step} batches, {len(schedule)} needed "
                "(a dataset smaller than the batch with drop_last?)."
            )
        low = {str(p.dtype).removeprefix("torch."): 0 for p in model.parameters() if p.dtype != torch.float32}
        for p in model.parameters():
            if p.dtype != torch.float32:
                low[str(p.dtype).removeprefix("torch.")] += p.numel()
        if low and ideal_dtype == torch.float32:
            notes.append(
                "parameters kept in " + ", ".join(f"{d} ({n / 1e6:.1f} M)" for d, n in low.items()) + " as the config "
                "keeps them (the frozen block's `llm.dtype`): their matmuls run in that dtype, the ideal in float32, "
                "so the ratio reads low where the CPU has fast low-precision matmuls"
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        state = sum(
            t.numel() * t.element_size() for o in trainer.optimizers for s in o.state.values() for t in s.values()
            if torch.is_tensor(t)
        )  # fmt: skip
    timings = []
    for t in threads if timed else ():
        step_s, ideal_s = statistics.median(timer.times[t]), statistics.median(timer.ideal[t])
        timings.append({"threads": t, "step_ms": step_s * 1e3, "ideal_ms": ideal_s * 1e3, "ratio": step_s / ideal_s,
                        "step_tflops": timer.flops / step_s / 1e12})  # fmt: skip
    peak = timer.peak.peak if timer.peak is not None else None
    parallel = max(1, min(workers or 0, usable_cores()))  # the loader's processes that can run at once
    return {
        "config": str(config), "family": family, "task": parsed["model"]["class_path"],
        "datamodule": data_class, "data": data_note, "weights": "; ".join(weight_notes), "random_weights": llm_random,
        "batch": batch, "batch_source": "--batch_size" if batch_size else "config", "device": str(dev),
        "precision": precision, "params_trainable": trainable, "params_frozen": frozen, "flops_step": timer.flops,
        "flops_per_sample": timer.flops / batch, "forward_flops_per_sample": forward, "timings": timings,
        "loader_ms": loader_ms, "loader_workers": workers, "loader_parallel": parallel,
        "loader_per_step": loader_ms / parallel / timings[0]["step_ms"] if loader_ms is not None and timings else None,
        "peak_mem_mib": peak / 2**20 if peak is not None else None,
        "mem_method": timer.peak.method if timer.peak is not None else None, "weights_mib": weights / 2**20,
        "grads_mib": grads / 2**20, "optimizer_state_mib": state / 2**20,
        "activation_mib_per_sample": timer.saved_bytes / batch / 2**20,
        "step_peak_mib_per_sample": max(0, peak - grads) / batch / 2**20 if peak is not None else None, "repeats": repeats, "warmup": warmup,
        "notes": notes, "machine": machine(),
    }  # fmt: skip


def _loader_ms(datamodule, batches: int) -> float | None:
    """Median milliseconds per training batch after the first, the loader alone, in this process (no
    workers: the work of one batch, not the time to take it from workers' queue)."""
    if hasattr(datamodule, "num_workers"):
        datamodule.num_workers = 0
    loader = datamodule.train_dataloader()
    times: list[float] = []
    iterator = iter(loader)
    next(iterator)  # workers start, first batch
    epochs_untimed = 0
    while len(times) < batches:
        start = time.perf_counter()
        try:
            next(iterator)
        except StopIteration:  # a new epoch; its first batch (workers start again) is not timed
            epochs_untimed += 1
            if epochs_untimed > 1:  # epochs of one batch: restarting would never time a batch
                raise ConfigurationError(
                    "the training loader gives one batch per epoch: too few to time it (a larger dataset "
                    "or a smaller --batch_size)."
                ) from None
            iterator = iter(loader)
            next(iterator)
            continue
        epochs_untimed = 0
        times.append(time.perf_counter() - start)
    del iterator
    return statistics.median(times) * 1e3


def _forward_flops(model, datamodule) -> int | None:
    """Inference forward FLOPs of one validation sample (the sweep's count, `frozenlm.sweep.flops_per_sample`)."""
    from frozenlm.sweep import flops_per_sample

    with contextlib.suppress(Exception):
        datamodule.setup("validate")
        return flops_per_sample(model, datamodule)[0]
    return None

"""Data loading throughput of each shipped pipeline, for sizing `--data.num_workers`.

For the image (ImageNet, DeiT-S config), video (SSv2, VideoMAE-S), point-cloud (ScanObjectNN hardest,
Point-BERT) and motion (Argoverse 2, VectorNet) configs, the config's own datamodule (its transforms,
batch size and collation) reads a training epoch of data written in the real on-disk format by the test
suite's writers, with 0 workers (the main process) and with 1 .. `--workers` loader processes; the
table gives samples per second and samples per second per worker. All in one run, so the figures
compare with each other; absolute numbers depend on the CPU.

A GPU running `S` samples/s (the progress bar's it/s x the batch size) needs about `S / per-worker`
workers per process to never wait for data, plus headroom. The generated data is not real data:
JPEGs of random noise (costlier to decode than photos), SSv2-sized videos (240 x 427, 45 frames) of a
moving square (cheaper to decode than real footage), ellipsoid clouds (the decode is an array read
either way) and the test writer's small Argoverse 2 scenes (preprocessed once into the cache, as in
training; real scenes hold more agents and lanes). Point `--root-<pipeline>` at real data for
real figures::

    python benchmarks/loader_throughput.py [--workers 2] [--only image video] [--markdown docs/benchmarks/loader_throughput.md]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import Report  # noqa: E402
from tests.data.argoverse2.data import write as write_argoverse2  # noqa: E402
from tests.data.imagefolder.data import write as write_imagefolder  # noqa: E402
from tests.data.scanobjectnn.data import write as write_scanobjectnn  # noqa: E402
from tests.data.ssv2.data import write as write_ssv2  # noqa: E402

# pipeline -> (config, writer of a data root in a folder)
PIPELINES = {
    "image": ("imagenet_deit_small.yaml", lambda folder: write_imagefolder(folder, 128, 2, size=(375, 500))),
    "video": ("ssv2_videomae_small.yaml",
              lambda folder: write_ssv2(folder, {"train": 8, "validation": 1}, frames=45, size=(240, 427))),
    "point-cloud": ("scanobjectnn_hardest_pointbert.yaml", lambda folder: write_scanobjectnn(folder, 24, 1)),
    "motion": ("argoverse2_vectornet.yaml", lambda folder: write_argoverse2(folder, {"train": 192, "val": 1, "test": 1})),
}  # fmt: skip


def datamodule(config: str, root: Path, workers: int):
    """The config's datamodule, with `root` and `workers`."""
    data = yaml.safe_load((REPO / "configs" / config).read_text())["data"]
    module, name = data["class_path"].rsplit(".", 1)
    kwargs = {**data.get("init_args", {}), "root": str(root), "num_workers": workers, "pin_memory": False}
    if "repeated_augmentation" in kwargs:
        kwargs["repeated_augmentation"] = 1  # its sampler needs a trainer; the per-sample work is the same
    return getattr(importlib.import_module(module), name)(**kwargs)


def samples_per_second(config: str, root: Path, workers: int, max_batches: int) -> tuple[float, int]:
    """Training samples per second through the loader, after its first batch (worker start-up), and the batch size."""
    data = datamodule(config, root, workers)
    if hasattr(data, "dataset"):
        data.dataset("train")  # the motion cache and point-cloud arrays, built before timing
    loader = data.train_dataloader()
    batches = iter(loader)
    next(batches)
    count, start = 0, time.perf_counter()
    for index, batch in enumerate(batches, start=1):
        count += len(next(value for value in batch.values() if isinstance(value, torch.Tensor)))
        if index >= max_batches:
            break
    seconds = time.perf_counter() - start
    del batches, loader
    return count / seconds, data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="time 0 .. this many loader processes")
    parser.add_argument("--batches", type=int, default=8, help="batches timed per setting, after the first")
    parser.add_argument("--only", nargs="*", choices=list(PIPELINES), help="pipelines to time (default all)")
    for name in PIPELINES:
        parser.add_argument(f"--root-{name}", type=Path, help=f"real {name} data instead of generated")
    parser.add_argument("--markdown", type=Path, help="also write the table here (docs/benchmarks/ is what the docs include)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per process, as in loader workers
    report = Report(args.markdown)
    report.line("| pipeline | config | batch | workers | samples/s | samples/s per worker |")
    report.line("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or PIPELINES:
            config, writer = PIPELINES[name]
            root = getattr(args, f"root_{name.replace('-', '_')}") or writer(Path(scratch) / name)
            for workers in range(args.workers + 1):
                rate, batch = samples_per_second(config, root, workers, args.batches)
                per_worker = f"{rate / workers:.1f}" if workers else "-"
                report.line(f"| {name} | {config} | {batch} | {workers} | {rate:.1f} | {per_worker} |")
    report.save()


if __name__ == "__main__":
    main()
